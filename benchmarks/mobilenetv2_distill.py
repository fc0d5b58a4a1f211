"""Issue #3: knowledge distillation ResNet-50 -> MobileNetV2.

Asked: the distilled student beats the MobileNetV2 trained from scratch (../shared/models) by
at least 1.5 points of top-1, on the full 10,000-image test split. The student is that
MobileNetV2 itself, trained on with the teacher (recipes/mobilenetv2_distill_resnet50.yaml).
"""

from _common import SHARED, figure, publish, row, run_compress

report = run_compress("mobilenetv2_distill", SHARED / "models" / "mobilenet_v2_cifar10.pt",
                      "mobilenetv2_distill_resnet50", "-v")
scratch, distilled = row(report, "source"), row(report, "openvino-fp32")
m = report["passes"][0]["metrics"]
gain = m["student_top1_after"] - scratch["top1"]
figures = [
    figure("teacher (ResNet-50) top-1 %", m["teacher_top1"], "-", True),
    figure("student before (MobileNetV2 from scratch) top-1 %", m["student_top1_before"], "-", True),
    figure("distilled student top-1 % (PyTorch)", m["student_top1_after"], "-", True),
    figure("distilled student top-1 % (OpenVINO FP32 engine)", distilled["top1"], "-", True),
    figure("gain over MobileNetV2 from scratch (points)", gain, ">= 1.5", gain >= 1.5),
]
publish("mobilenetv2_distill", report, figures)
