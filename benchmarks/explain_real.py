"""Issue 12: `compress explain` on a real model across every CPU backend, and what it costs.

Runs recipes/cpu_targets_side_by_side.yaml (OpenVINO FP32 + NNCF INT8, ONNX Runtime FP32 + INT8,
TFLite FP32 + INT8, the TensorRT QDQ graph on its ONNX Runtime proxy) on the model, then times
`compress explain RUN --images 64` (per-layer taps on every engine, per-pass rows, the
quantizer-removal sensitivity ranking) and writes benchmarks/results/explain_MODEL/report.json +
report.md with the seconds, each engine's output SQNR, its worst layer and the layers mapped.

    .venv/bin/python benchmarks/explain_real.py resnet50 [--eval-limit 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMPRESS, HERE, SHARED, run_compress, scrub, write_text  # noqa: E402

MODELS = {"resnet50": "resnet50_cifar10.pt", "mobilenetv2": "mobilenet_v2_cifar10.pt"}


def cpu() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(isa)})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    name = f"explain_{args.model}"
    started = time.perf_counter()
    report = run_compress(name, SHARED / "models" / MODELS[args.model], "cpu_targets_side_by_side",
                          "--eval-limit", str(args.eval_limit), "-q")
    run_s = time.perf_counter() - started
    work = HERE / "work" / name
    cmd = [str(COMPRESS), "explain", str(work), "--trust-model", "--model", str(SHARED / "models" / MODELS[args.model]),
           "--images", str(args.images), "--threads", "2", "--overwrite"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd)
    explain_s = time.perf_counter() - t0
    if code != 0:
        return code
    exp = json.loads((work / "explain.json").read_text())
    out = HERE / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    from compressor.fidelity.explain import worst_layer
    from compressor.fidelity.render import render_markdown

    rows = []
    for engine, e in exp["engines"].items():
        layers = e.get("layers", [])
        mapped = sum("status" not in layer for layer in layers)
        w = worst_layer(e)
        rows.append({"engine": engine, "precision": e["precision"], "output_sqnr_db": e.get("output_sqnr_db"),
                     "layers_mapped": mapped, "layers_in_reference": len(layers), "unmapped": len(e.get("unmapped", [])),
                     "worst": None if w is None else f"{w['name']} ({w['why']})",
                     "sensitivity_measured": len(e.get("sensitivity", []))})
    figures = {"model": args.model, "cpu": cpu(), "threads": 2, "images": exp["images"], "run_seconds": round(run_s, 1),
               "explain_seconds": round(explain_s, 1), "explain_internal_seconds": exp["seconds"], "engines": rows,
               "command": scrub(" ".join(cmd)), "run_command": scrub(report["command"])}
    write_text(out / "report.json", json.dumps(figures, indent=1))
    md = [f"# compress explain on {args.model}", "", f"CPU: {figures['cpu']}, 2 threads. `compress explain` took "
          f"**{explain_s:.0f} s** for {len(rows)} engines on {exp['images']['count']} held-out images "
          f"(the run before it: {run_s:.0f} s, evaluated on {args.eval_limit} test images).", "",
          "| engine | precision | output SQNR dB | layers mapped | unmapped engine layers | sensitivity rows | worst layer |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['engine']} | {r['precision']} | {r['output_sqnr_db']} | {r['layers_mapped']}/{r['layers_in_reference']} "
                  f"| {r['unmapped']} | {r['sensitivity_measured']} | {r['worst'] or '-'} |")
    md += ["", f"Commands: `{figures['run_command']}`, then `{figures['command']}`.", "",
           render_markdown(exp, heading="##", limit=8)]
    if (work / "explain.png").is_file():
        shutil.copy2(work / "explain.png", out / "explain.png")
        md.insert(3, "![SQNR per layer, one line per engine](explain.png)\n")
    write_text(out / "report.md", "\n".join(md) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
