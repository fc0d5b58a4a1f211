"""Measure the engines of a finished benchmark run again, all in one session with batch-1
latency timed in interleaved rounds (compressor.evaluate.measure_all), on the full test split.

Used for issue #3's pruning figure: its first run timed the unpruned and the pruned OpenVINO
FP32 engines one after the other while other jobs shared the 2 cores, and the ratio moved from
1.3x to 2.2x between back-to-back timings of the same two files.

Usage: python benchmarks/remeasure.py RUN_NAME   (engines in benchmarks/work/RUN_NAME)
"""

import json
import sys
from pathlib import Path

from _common import HERE, SHARED, figure, publish

from compressor.data import DataConfig, open_data, preprocess
from compressor.evaluate import EvaluationConfig, ResultRow, measure_all
from compressor.intake import load_model
from compressor.registry import get_target
from compressor.target_base import Engine

name = sys.argv[1] if len(sys.argv) > 1 else "resnet50_prune"
work = HERE / "work" / name
report = json.loads((work / "report.json").read_text())
data = open_data(DataConfig(source="cifar10", root=str(SHARED / "datasets" / "cifar10")))

source = load_model(Path(report["model"]), trust=True)
images, labels = data.evaluation_set(tuple(source.input_spec.sample_shape[1:]), source.preprocessing)
x = preprocess(images, source.preprocessing)
subjects = []
for e in report["engines"]:
    target = get_target(e["target"])(json.loads(Path(e["files"][0]).parent.joinpath("engine.json").read_text()).get("config") or {})
    engine = Engine(e["target"], e["name"], [Path(f) for f in e["files"]], e["precision"], e["info"])
    subjects.append(ResultRow(e["name"], e["target"], e["precision"], target.load(engine, threads=2), engine.size_bytes,
                            engine=str(engine.path)))
cfg = EvaluationConfig(threads=2, latency_runs=600, latency_min_seconds=6, latency_rounds=20)
rows = measure_all(subjects, x=x, labels=labels, cfg=cfg, threads=2, progress=print)
out = {**report, "results": [m.to_json() for m in rows], "remeasured_from": str(work),
       "command": f"python benchmarks/remeasure.py {name}"}
base, pruned = rows[0], rows[1]
speed = base.latency_ms["p50"] / pruned.latency_ms["p50"]
publish(f"{name}_remeasured", out, [
    figure("top-1 drop vs unpruned (points)", base.top1 - pruned.top1, "<= 1.0", base.top1 - pruned.top1 <= 1.0),
    figure("OpenVINO FP32 batch-1 p50 speedup (interleaved timing)", speed, ">= 1.6", speed >= 1.6, "x"),
])
