"""Issue 24, the proof: ExecuTorch INT8 on the real MobileNetV2 and ResNet-50 (full CIFAR-10 test split),
its top-1 drop and batch-1 p50 against TFLite INT8 and PyTorch eager, in one interleaved session.

Per model, two steps:

1. ``compress MODEL --recipe int8_executorch`` (recipes/int8_executorch.yaml): the ExecuTorch INT8 .pte
   (PT2E with ExecuTorch's XNNPACKQuantizer, lowered to XNNPACK), the FP32 .pte and the TFLite INT8
   flatbuffer, each evaluated on the 10,000 test images; the report's top-1 rows and its paired
   per-image outcomes against the source (lost, gained) give the drop and its two-sided 95 % interval
   (compressor.bound.drop_interval).
2. One timing session in this process: fresh runners for the eager source, every engine of the run, and
   a byte-identical copy of the ExecuTorch INT8 .pte and of the TFLite INT8 file, timed together by
   evaluate.latency (warm blocks, shuffled rounds; the default EvaluationConfig, 2 threads). The copies
   say how far two runs of one file read apart in this session (asked: within 3 %); a speed ratio
   smaller than that gap is not a difference.

Usage: python benchmarks/executorch_int8.py [mobilenetv2|resnet50 ...] [--reuse]
(--reuse: time the engines a previous run left in benchmarks/work/executorch_MODEL)
Writes benchmarks/results/executorch/report.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import HERE, SHARED, monitored, require_modules, row, run_compress, write_text

require_modules("executorch", "litert_torch", "ai_edge_litert")

from compressor.bound import drop_interval  # noqa: E402
from compressor.environment import environment  # noqa: E402
from compressor.evaluate import EvaluationConfig, TorchRunner, latency  # noqa: E402
from compressor.intake import load_model  # noqa: E402
from compressor.run_dir import engines_of_run  # noqa: E402

MODELS = {"mobilenetv2": "mobilenet_v2_cifar10.pt", "resnet50": "resnet50_cifar10.pt"}
LABELS = {"source": "PyTorch eager FP32 (source)", "executorch-int8": "ExecuTorch INT8 (XNNPACK)",
          "executorch-fp32": "ExecuTorch FP32 (XNNPACK)", "tflite-int8": "TFLite INT8 (XNNPACK)"}
COPIED = {"executorch-int8": "model.pte", "tflite-int8": "model.tflite"}
ASKED_GAP = 0.03


def gap(a: float, b: float) -> float:
    return max(a, b) / min(a, b) - 1.0


def accuracy_rows(report: dict) -> list[dict]:
    out = []
    for r in report["results"]:
        b = r.get("top1_drop_bound")
        lo, hi = drop_interval(b["images"], b["lost"], b["gained"]) if b else (None, None)
        out.append({"engine": r["name"], "top1": r["top1"], "drop": b["point"] if b else None,
                    "interval95": [lo, hi] if b else None, "lost": b and b["lost"], "gained": b and b["gained"],
                    "images": b["images"] if b else r.get("images")})
    return out


def timing_session(key: str, work: Path, report: dict, threads: int) -> dict:
    """Fresh runners for the source, every engine and the copies, timed together."""
    engines = engines_of_run(work, report)
    art = load_model(SHARED / "models" / MODELS[key], trust=True)
    tmp = Path(tempfile.mkdtemp(prefix="executorch-copies-"))
    runners, names = [TorchRunner(art.torch_module(), threads=threads, name="source")], ["source"]
    try:
        for e in engines:
            runners.append(e.builder.load(e, threads=threads))
            names.append(e.name)
            if e.name in COPIED:
                src = next(Path(f) for f in e.files if Path(f).name == COPIED[e.name])
                (tmp / e.name).mkdir()
                files = []
                for f in e.files:  # every file of the engine (the .pte's program.pt2 beside it), byte for byte
                    shutil.copyfile(f, tmp / e.name / Path(f).name)
                    files.append(tmp / e.name / Path(f).name)
                assert (tmp / e.name / src.name).read_bytes() == src.read_bytes()
                twin = type(e)(e.target, e.name + "-copy", files, e.precision, e.info, built=e.built, builder=e.builder)
                runners.append(e.builder.load(twin, threads=threads))
                names.append(e.name + " (copy)")
        shape = report["model_input"]["shape"]
        x = np.random.default_rng(0).standard_normal((4, *shape[1:])).astype(np.float32)
        cfg = EvaluationConfig()
        samples, seconds, load = monitored(threads, lambda: latency(runners, x, cfg))
    finally:
        for r in runners:
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)
    p50 = {n: float(np.median(s)) for n, s in zip(names, samples)}
    p90 = {n: float(np.percentile(s, 90)) for n, s in zip(names, samples)}
    return {"seconds": round(seconds, 1), "load": load, "p50_ms": p50, "p90_ms": p90,
            "runs": {n: len(s) for n, s in zip(names, samples)},
            "copy_gaps": {n: gap(p50[n], p50[n + " (copy)"]) for n in COPIED if n + " (copy)" in p50}}


def model_figures(key: str, acc: list[dict], t: dict) -> list[dict]:
    p50 = t["p50_ms"]
    by = {a["engine"]: a for a in acc}
    figs = []
    for n in ("executorch-int8", "executorch-fp32", "tflite-int8"):
        a = by[n]
        lo, hi = a["interval95"]
        figs.append({"model": key, "figure": f"{LABELS[n]} top-1 drop vs the source (points)",
                     "value": f"{a['drop']:.2f} [{lo:.2f}, {hi:.2f}]", "asked": "<= 0.5 (point)" if n != "executorch-fp32"
                     else "-", "passed": a["drop"] <= 0.5})
    for other in ("tflite-int8", "source", "executorch-fp32"):
        ratio = p50[other] / p50["executorch-int8"]
        figs.append({"model": key, "figure": f"batch-1 p50: {LABELS[other]} / ExecuTorch INT8", "value": f"{ratio:.2f}x",
                     "asked": "reported", "passed": None})
    for n, g in t["copy_gaps"].items():
        figs.append({"model": key, "figure": f"two copies of {LABELS[n]}: p50 gap", "value": f"{100 * g:.1f} %",
                     "asked": "<= 3 %", "passed": g <= ASKED_GAP})
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help=f"of {', '.join(MODELS)} [all]")
    ap.add_argument("--reuse", action="store_true", help="time the engines of a previous run again")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if unknown := [m for m in args.models if m not in MODELS]:
        ap.exit(2, f"executorch_int8.py: unknown model {', '.join(unknown)} (have: {', '.join(MODELS)})\n")
    env = environment(args.threads)
    cpu = f"{env['cpu']} [{', '.join(env['isa_flags'])}]"
    out: dict = {"benchmark": "executorch", "cpu": env["cpu"], "isa_flags": env["isa_flags"], "threads": args.threads,
                 "command": "python " + " ".join(["benchmarks/executorch_int8.py", *sys.argv[1:]]), "models": {}}
    dest = HERE / "results" / "executorch"
    if dest.joinpath("report.json").exists():  # one model at a time: keep the other's figures
        out["models"] = json.loads(dest.joinpath("report.json").read_text()).get("models", {})
    for key in args.models or list(MODELS):
        name = f"executorch_{key}"
        work = HERE / "work" / name
        if args.reuse and (work / "report.json").exists():
            report = json.loads((work / "report.json").read_text())
            report["command"] = "(reused) " + report.get("command", "")
        else:
            report = run_compress(name, SHARED / "models" / MODELS[key], "int8_executorch")
        acc = accuracy_rows(report)
        print(f"{key}: timing session", flush=True)
        t = timing_session(key, work, report, args.threads)
        cli_p50 = {r["name"]: row(report, r["name"])["latency_ms"]["p50"] for r in report["results"]}
        out["models"][key] = {"compress_command": report.get("command"), "accuracy": acc, "timing": t,
                              "compress_run_p50_ms": cli_p50, "cpu": cpu,
                              "figures": model_figures(key, acc, t)}
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "report.json", json.dumps(out, indent=1) + "\n")
    lines = ["# ExecuTorch INT8 against TFLite INT8 and eager PyTorch (issue 24)", "",
             f"- command: `{out['command']}`", f"- CPU: {cpu}; {args.threads} threads",
             "- data: ../shared/datasets/cifar10, the full test split (10,000 images), the models' own 32x32 "
             "preprocessing", "- drop: points below the source on the same images, with its two-sided 95 % interval "
             "from the paired per-image outcomes (compressor.bound.drop_interval)",
             "- timing: one session per model in benchmarks/executorch_int8.py (evaluate.latency, warm blocks in "
             "shuffled rounds, batch 1), every engine beside a byte-identical copy of the two INT8 files", "",
             "## Figures", "", "| model | figure | value | asked | verdict | CPU |", "|---|---|---|---|---|---|"]
    for key, m in out["models"].items():
        for f in m["figures"]:
            verdict = "-" if f["passed"] is None else "pass" if f["passed"] else "**FAIL**"
            lines.append(f"| {key} | {f['figure']} | {f['value']} | {f['asked']} | {verdict} | {m['cpu']} |")
    lines += ["", "## Every engine", "", "| model | engine | top-1 % | drop (points) [95 % interval] | lost / gained | "
              "p50 ms (session) | p90 ms | p50 ms (compress run) | load during session |", "|---|---|---|---|---|---|---|---|---|"]
    for key, m in out["models"].items():
        t = m["timing"]
        share = f"{100 * t['load']['during']['others_cpu_share']:.0f} % others"
        for a in m["accuracy"]:
            n = a["engine"]
            drop = "-" if a["drop"] is None else f"{a['drop']:.2f} [{a['interval95'][0]:.2f}, {a['interval95'][1]:.2f}]"
            lg = "-" if a["drop"] is None else f"{a['lost']} / {a['gained']}"
            lines.append(f"| {key} | {LABELS.get(n, n)} | {a['top1']:.2f} | {drop} | {lg} | {t['p50_ms'][n]:.3f} | "
                         f"{t['p90_ms'][n]:.3f} | {m['compress_run_p50_ms'][n]:.3f} | {share} |")
            if n + " (copy)" in t["p50_ms"]:
                c = n + " (copy)"
                lines.append(f"| {key} | {LABELS.get(n, n)} (byte-identical copy) | - | - | - | {t['p50_ms'][c]:.3f} | "
                             f"{t['p90_ms'][c]:.3f} | - | {share} |")
    lines += ["", "The compress run's p50 comes from its own interleaved session (`compress_command` in report.json); "
              "the figures above use this script's session, where the copies are timed too."]
    write_text(dest / "report.md", "\n".join(lines) + "\n")
    print(f"wrote {dest.relative_to(HERE.parent)}/report.md")
    for key, m in out["models"].items():
        for f in m["figures"]:
            print(f"  {key}: {f['figure']}: {f['value']} (asked {f['asked']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
