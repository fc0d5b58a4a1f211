"""Issue #3: ResNet-50 structured pruning to half the MACs, then fine-tuning.

Asked: top-1 within 1.0 point of the unpruned model; batch-1 latency on OpenVINO FP32 at least
1.6x lower. Both OpenVINO FP32 engines (unpruned baseline and pruned) are measured in the same
run with the same threads, on the full 10,000-image test split.
"""

from _common import SHARED, figure, publish, row, run_compress

report = run_compress("resnet50_prune", SHARED / "models" / "resnet50_cifar10.pt", "resnet50_prune_half_macs")
base, pruned = row(report, "source-openvino-fp32"), row(report, "openvino-fp32")
prune_pass = report["passes"][0]["metrics"]
figures = [
    figure("MACs reduction", prune_pass["macs_reduction"], "0.5 (half the MACs)", prune_pass["macs_reduction"] >= 0.49),
    figure("top-1 drop vs unpruned (points)", base["top1"] - pruned["top1"], "<= 1.0", base["top1"] - pruned["top1"] <= 1.0),
    figure("OpenVINO FP32 batch-1 p50 speedup", base["latency_ms"]["p50"] / pruned["latency_ms"]["p50"], ">= 1.6",
           base["latency_ms"]["p50"] / pruned["latency_ms"]["p50"] >= 1.6, "x"),
]
publish("resnet50_prune", report, figures)
