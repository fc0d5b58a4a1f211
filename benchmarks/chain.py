"""Issue #3: the whole chain in one recipe (recipes/resnet50_to_mobilenetv2_int8.yaml):
ResNet-50 FP32 -> distil into MobileNetV2 -> prune -> QAT -> OpenVINO INT8, every stage's row
reported against the ResNet-50 FP32 source (latency ratio and accuracy difference)."""

from _common import SHARED, figure, publish, row, run_compress

report = run_compress("resnet50_to_mobilenetv2_int8", SHARED / "models" / "resnet50_cifar10.pt",
                      "resnet50_to_mobilenetv2_int8", "-v")
source, final = row(report, "source"), row(report, "openvino-int8")
figures = [figure(f"{r['name']}: top-1 % (vs ResNet-50 FP32 {source['top1']:.2f})", r["top1"], "-", True)
           for r in report["results"]]
figures += [
    figure("OpenVINO INT8 MobileNetV2 vs ResNet-50 FP32 eager: batch-1 p50 speedup",
           source["latency_ms"]["p50"] / final["latency_ms"]["p50"], "reported", True, "x"),
    figure("OpenVINO INT8 MobileNetV2 vs ResNet-50 FP32: top-1 difference (points)",
           final["top1"] - source["top1"], "reported", True),
    figure("size ratio (ResNet-50 file / engine)", source["size_bytes"] / final["size_bytes"], "reported", True, "x"),
]
publish("resnet50_to_mobilenetv2_int8", report, figures)
