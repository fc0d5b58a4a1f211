"""Issue 22, part 0: two copies of one engine must time alike, whatever shares the session.

Builds every CPU engine of the real MobileNetV2 (recipes/cpu_targets_side_by_side.yaml: OpenVINO
FP32 and INT8, ONNX Runtime FP32 and INT8, TFLite FP32 and INT8, TensorRT's QDQ graph on ONNX
Runtime), adds a byte-identical copy of the TFLite INT8 file and of the ONNX Runtime INT8 file,
then times all of them in ``--sessions`` sessions (fresh runtimes each, the same timing compress
uses: evaluate.latency and evaluate.paced_latency with the default EvaluationConfig, 2 threads).
Figures: per session, the gap between the two copies of each file (loop and paced p50), and the
largest gap over the sessions (asked: within 3 %). Each session records how busy the machine was
(compressor/machine_load.py: other processes' share of the cores, steal); a session timed under load is
timed again, up to ``--redo`` times, and the report lists the sessions it set aside and why.

Usage: python benchmarks/timing.py [--sessions 5] [--model mobilenetv2|resnet50] [--reuse] [--redo 3]
(--reuse: time the engines a previous run left in benchmarks/work/ instead of building them again)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import HERE, SHARED, monitored, require_modules, run_compress, write_text

require_modules("litert_torch", "ai_edge_litert", "modelopt", "openvino", "onnxruntime")

from compressor.environment import environment  # noqa: E402
from compressor.evaluate import EvaluationConfig, latency, paced_latency  # noqa: E402
from compressor.job import engines_of_run  # noqa: E402

MODELS = {"resnet50": "resnet50_cifar10.pt", "mobilenetv2": "mobilenet_v2_cifar10.pt"}
COPIED = {"tflite-int8": "model.tflite", "ortq-onnxruntime-int8": "model.onnx"}
ASKED = 0.03


def gap(a: float, b: float) -> float:
    return max(a, b) / min(a, b) - 1.0


def one_session(engines: list, copies: dict[str, Path], x: np.ndarray, cfg: EvaluationConfig) -> dict:
    """Fresh runners for every engine and copy, timed together; p50 (ms) of each, loop and paced."""
    runners, names = [], []
    for e in engines:
        runner = e.builder.load(e, threads=2) if e.built else e.builder.load_proxy(e, threads=2)[1]
        runners.append(runner)
        names.append(e.name)
        if e.name in copies:
            copy = type(e)(e.target, e.name + "-copy", [copies[e.name]], e.precision, e.info, built=e.built,
                           builder=e.builder)
            runners.append(e.builder.load(copy, threads=2))
            names.append(e.name + " (copy)")
    try:
        (loop, paced), seconds, load = monitored(2, lambda: (latency(runners, x, cfg), paced_latency(runners, x, cfg)))
    finally:
        for r in runners:
            r.close()
    return {"seconds": round(seconds, 1), "load": load,
            "loop_p50_ms": {n: float(np.median(s)) for n, s in zip(names, loop)},
            "paced_p50_ms": {n: float(np.median(s)) for n, s in zip(names, paced)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--model", choices=list(MODELS), default="mobilenetv2")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--redo", type=int, default=3, help="times a session timed under load may be redone in all")
    args = ap.parse_args()
    name = f"timing_{args.model}"
    work = HERE / "work" / name
    if args.reuse and (work / "report.json").exists():
        report = json.loads((work / "report.json").read_text())
    else:
        report = run_compress(name, SHARED / "models" / MODELS[args.model], "cpu_targets_side_by_side",
                              "--eval-limit", "500")
    engines = [e for e in engines_of_run(work, report)]
    tmp = Path(tempfile.mkdtemp(prefix="timing-copies-"))
    copies = {}
    for e in engines:
        if e.name in COPIED:
            src = next(f for f in e.files if Path(f).name == COPIED[e.name])
            copies[e.name] = tmp / e.name / COPIED[e.name]
            copies[e.name].parent.mkdir()
            shutil.copyfile(src, copies[e.name])
    shape = report["model_input"]["shape"]
    x = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype(np.float32)
    cfg = EvaluationConfig()
    sessions, set_aside = [], []
    try:
        while len(sessions) < args.sessions:
            print(f"session {len(sessions) + 1}/{args.sessions}", flush=True)
            s = one_session(engines, copies, x, cfg)
            if s["load"]["under_load"] and len(set_aside) < args.redo:
                print("  timed under load, again: " + "; ".join(s["load"]["reasons"]), flush=True)
                set_aside.append(s)
                continue
            sessions.append(s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gaps = {f"{n} {fig}": [gap(s[f"{fig}_p50_ms"][n], s[f"{fig}_p50_ms"][n + ' (copy)']) for s in sessions]
            for n in copies for fig in ("loop", "paced")}
    worst = {k: max(v) for k, v in gaps.items()}
    env = environment(2)
    out = {"benchmark": "timing", "model": args.model, "cpu": env["cpu"], "isa_flags": env["isa_flags"],
           "timing": {k: v for k, v in cfg.model_dump().items() if k.startswith(("latency", "paced", "warmup"))},
           "sessions": sessions, "set_aside_under_load": set_aside, "copy_gaps": gaps, "largest_gap": worst, "asked": ASKED,
           "passed": all(v <= ASKED for k, v in worst.items() if k.endswith("loop")),
           "command": "python " + " ".join(["benchmarks/timing.py", *sys.argv[1:]])}
    dest = HERE / "results" / name
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "report.json", json.dumps(out, indent=1) + "\n")
    rows = list(sessions[0]["loop_p50_ms"])
    lines = [f"# Two copies of one engine, {args.sessions} sessions ({args.model})", "",
             f"- command: `{out['command']}`", f"- machine: {env['cpu']}, ISA {', '.join(env['isa_flags'])}; 2 threads",
             "- timing: evaluate.latency (warm blocks, shuffled rounds) and evaluate.paced_latency "
             f"({cfg.paced_rate_hz:g} requests per second), default EvaluationConfig",
             f"- load: other processes' share of the 2 cores during each session: "
             + ", ".join(f"{100 * s['load']['during']['others_cpu_share']:.0f} %" for s in sessions)
             + (" (over the limit in a session kept: its figures are marked)"
                if any(s["load"]["under_load"] for s in sessions) else ""),
             f"- sessions timed under load and set aside (timed again): {len(set_aside)}"
             + "".join(f"\n  - {'; '.join(s['load']['reasons'])}" for s in set_aside), "",
             "## Largest gap between the copies", "", "| file | figure | largest gap over sessions | asked |",
             "|---|---|---|---|"]
    for k, v in worst.items():
        n, fig = k.rsplit(" ", 1)
        lines.append(f"| {n} | {fig} | {100 * v:.1f} % | {'<= 3 %' if fig == 'loop' else '-'} |")
    for fig in ("loop", "paced"):
        lines += ["", f"## {fig} p50 (ms) per session", "",
                  "| engine | " + " | ".join(f"session {i + 1}" + (" (under load)" if s["load"]["under_load"] else "")
                                             for i, s in enumerate(sessions)) + " |",
                  "|---|" + "---|" * len(sessions)]
        lines += [f"| {r} | " + " | ".join(f"{s[f'{fig}_p50_ms'][r]:.4f}" for s in sessions) + " |" for r in rows]
    write_text(dest / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
