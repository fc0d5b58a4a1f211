"""Issue #13, compound ResNet-50: pruned to a quarter of the MACs with distillation from the
unpruned model during fine-tuning, then INT8 on each CPU runtime (recipes/resnet50_quarter_macs_int8.yaml).

Asked: the fastest INT8 engine within 1.0 point of the unpruned source's top-1 on the full test
split, and its batch-1 speedup over the source in PyTorch eager, same run, same threads (goal: 40x).
Every row is timed in the same interleaved session."""

import time

from _common import SHARED, figure, publish, row, run_compress

started = time.perf_counter()
report = run_compress("resnet50_compound", SHARED / "models" / "resnet50_cifar10.pt", "resnet50_quarter_macs_int8", "-v")
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
publish("resnet50_compound", report, figures)
