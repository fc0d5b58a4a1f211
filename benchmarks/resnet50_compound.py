"""Issue #13, compound ResNet-50: pruned to a quarter of the MACs with distillation from the
unpruned model during fine-tuning, then INT8 on each CPU runtime (recipes/resnet50_quarter_macs_int8.yaml).

Asked: the fastest INT8 engine within 1.0 point of the unpruned source's top-1 on the full test
split, and its batch-1 speedup over the source in PyTorch eager, same run, same threads (goal: 40x).
Every row is timed in the same interleaved session. Then a second session times the source and
every INT8 engine again at each thread count (1, half and all cores), all in one interleaved
session with the machine's load recorded, so the speedup "same threads" is given at each count.

    .venv/bin/python benchmarks/resnet50_compound.py [--sweep-only]

--sweep-only: no new run; the thread sweep on the engines of the last one (benchmarks/work/resnet50_compound)."""

import json
import sys
import time

import numpy as np
from _common import HERE, SHARED, figure, publish, row, run_compress

MODEL = SHARED / "models" / "resnet50_cifar10.pt"
WORK = HERE / "work" / "resnet50_compound"


def one_test_image() -> np.ndarray:
    """The first test image of the first class, preprocessed as the model's .json says: [1, 3, H, W]."""
    from PIL import Image

    meta = json.loads(MODEL.with_suffix(".json").read_text())
    pre, (_, _, h, w) = meta["preprocessing"], meta["input_shape"]
    first = sorted(sorted((SHARED / "datasets" / "cifar10" / "test").iterdir())[0].iterdir())[0]
    x = np.asarray(Image.open(first).convert("RGB").resize((w, h)), dtype=np.float32) * pre["scale"]
    x = (x - np.array(pre["mean"], dtype=np.float32)) / np.array(pre["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def thread_sweep(report: dict) -> tuple[dict, list[str]]:
    """Batch-1 p50 of the source (PyTorch eager) and every INT8 engine at each thread count, one
    interleaved session (compressor.evaluate.latency), load recorded (compressor.machine_load.LoadMonitor)."""
    from compressor.environment import default_threads
    from compressor.evaluate import EvaluationConfig, TorchRunner
    from compressor.intake import load_model
    from compressor.job import engines_of_run
    from compressor.tune import p50_at_threads, thread_counts

    counts = thread_counts(default_threads())
    int8 = {r["name"] for r in report["results"] if r["precision"] == "int8"}
    engines = [e for e in engines_of_run(WORK, report) if e.built and e.name in int8]
    module = load_model(MODEL, trust=True).model
    loaders = {"source": lambda n: TorchRunner(module, threads=n, name=f"source@{n}")}
    loaders |= {e.name: (lambda n, e=e: e.builder.load(e, threads=n)) for e in engines}
    p50, load = p50_at_threads(loaders, counts, one_test_image(), EvaluationConfig())
    names = list(loaders)
    rows = [{"name": nm, "p50_ms": {str(n): round(p50[(nm, n)], 4) for n in counts},
             "speedup": {str(n): round(p50[("source", n)] / p50[(nm, n)], 2) for n in counts}} for nm in names]
    lines = ["", "## Thread sweep: the same threads on both sides", "",
             f"A second interleaved session: the source in PyTorch eager and every INT8 engine at {counts} thread(s); "
             f"speedup is the source's p50 at that thread count over the engine's at the same count. Timing under "
             f"load: {'**yes**: ' + '; '.join(load.get('reasons', [])) if load.get('under_load') else 'no'}.", "",
             "| row | " + " | ".join(f"p50 ms @{n}" for n in counts) + " | "
             + " | ".join(f"speedup @{n}" for n in counts) + " |", "|---|" + "---|" * (2 * len(counts))]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['p50_ms'][str(n)]:.3f}" for n in counts) + " | "
                     + " | ".join(f"{r['speedup'][str(n)]:.2f}x" for n in counts) + " |")
    return {"counts": counts, "rows": rows, "timing_load": load}, lines


def sweep_figures(sweep: dict) -> list[dict]:
    out = []
    for n in sweep["counts"]:
        best = max((r for r in sweep["rows"] if r["name"] != "source"), key=lambda r: r["speedup"][str(n)])
        out.append(figure(f"thread sweep, {n} thread(s) on both sides: fastest INT8 ({best['name']}, "
                          f"{best['p50_ms'][str(n)]:.3f} ms) over the source in eager", best["speedup"][str(n)],
                          "reported (goal 40)", True, "x"))
    return out


if "--sweep-only" in sys.argv[1:]:
    from compressor.report import render_markdown  # noqa: F401 - fail here, not after the sweep

    report = json.loads((HERE / "results" / "resnet50_compound" / "report.json").read_text())
    sweep, lines = thread_sweep(report)
    report["thread_sweep"] = sweep
    figures = [f for f in report.pop("figures", []) if not f["figure"].startswith("thread sweep")]
    publish("resnet50_compound", report, figures + sweep_figures(sweep), lines)
    sys.exit(0)

started = time.perf_counter()
report = run_compress("resnet50_compound", MODEL, "resnet50_quarter_macs_int8", "-v")
wall = time.perf_counter() - started
source = row(report, "source")
prune = next(p for p in report["passes"] if p["name"] == "prune_structured")["metrics"]
int8 = [r for r in report["results"] if r["precision"] == "int8"]
if not int8:
    raise SystemExit("no INT8 engine in the report")
fastest = min(int8, key=lambda r: r["latency_ms"]["p50"])
drop = source["top1"] - fastest["top1"]
speedup = source["latency_ms"]["p50"] / fastest["latency_ms"]["p50"]
figures = [
    figure(f"MACs reduction (asked {prune['macs_reduction_target']})", prune["macs_reduction"], "0.75 +- 0.02",
           abs(prune["macs_reduction"] - 0.75) <= 0.02),
]
figures += [figure(f"{r['name']}: top-1 % (source {source['top1']:.2f}), p50 {r['latency_ms']['p50']:.3f} ms",
                   r["top1"], "reported", True) for r in report["results"] if r["name"] != "source"]
figures += [
    figure(f"fastest INT8 engine ({fastest['name']}): top-1 drop vs unpruned source (points)", drop, "<= 1.0",
           drop <= 1.0),
    figure(f"fastest INT8 engine ({fastest['name']}): batch-1 p50 speedup over the source in PyTorch eager",
           speedup, ">= 40 (goal)", speedup >= 40, "x"),
]
figures += [figure(f"pass {p['index']} {p['name']}: seconds", p["seconds"], "reported", True, "s")
            for p in report["passes"]]
figures.append(figure("whole run (passes, engines, evaluation): seconds", wall, "<= 3600", wall <= 3600, "s"))
sweep, lines = thread_sweep(report)
report["thread_sweep"] = sweep
publish("resnet50_compound", report, figures + sweep_figures(sweep), lines)
