"""Issues #3 and #13: the whole chain in one recipe (recipes/resnet50_to_mobilenetv2_int8.yaml):
ResNet-50 FP32 -> distil into MobileNetV2 -> prune (30 % fewer MACs) -> QAT -> OpenVINO INT8, every
stage's row reported against the ResNet-50 FP32 source (latency ratio and accuracy difference).
Issue #13's figure: the final INT8 engine within 1.0 point of the distilled student's FP32 top-1,
with the MACs reduction asked for met within 2 %; each pass's seconds."""

import time

from _common import SHARED, figure, publish, row, run_compress

started = time.perf_counter()
report = run_compress("resnet50_to_mobilenetv2_int8", SHARED / "models" / "resnet50_cifar10.pt",
                      "resnet50_to_mobilenetv2_int8", "-v")
wall = time.perf_counter() - started
source, student, final = row(report, "source"), row(report, "stage0-distill"), row(report, "openvino-int8")
prune = next(p for p in report["passes"] if p["name"] == "prune_structured")["metrics"]
asked = prune["macs_reduction_target"]
figures = [figure(f"{r['name']}: top-1 % (vs ResNet-50 FP32 {source['top1']:.2f})", r["top1"], "-", True)
           for r in report["results"]]
figures += [
    figure("OpenVINO INT8 engine - distilled student FP32 (points)", final["top1"] - student["top1"], ">= -1.0",
           final["top1"] - student["top1"] >= -1.0),
    figure(f"MACs reduction (asked {asked})", prune["macs_reduction"], f"{asked} +- 0.02",
           abs(prune["macs_reduction"] - asked) <= 0.02),
    figure("OpenVINO INT8 MobileNetV2 vs ResNet-50 FP32 eager: batch-1 p50 speedup",
           source["latency_ms"]["p50"] / final["latency_ms"]["p50"], "reported", True, "x"),
    figure("OpenVINO INT8 MobileNetV2 vs ResNet-50 FP32: top-1 difference (points)",
           final["top1"] - source["top1"], "reported", True),
    figure("size ratio (ResNet-50 file / engine)", source["size_bytes"] / final["size_bytes"], "reported", True, "x"),
]
figures += [figure(f"pass {p['index']} {p['name']}: seconds", p["seconds"], "reported", True, "s")
            for p in report["passes"]]
figures.append(figure("whole run (passes, engines, evaluation): seconds", wall, "<= 3600", wall <= 3600, "s"))
publish("resnet50_to_mobilenetv2_int8", report, figures)
