"""What INT8 can gain over FP32 per convolution on this CPU, in ONNX Runtime and in LiteRT on
XNNPACK (issue 4's 3x and 1.5x).

Issue 4 asks ONNX Runtime INT8 ResNet-50 to run 3x faster than FP32 at batch 1. This script
times single convolutions, FP32 ``Conv`` against ``QLinearConv`` (u8 activations, s8
per-channel weights, the same kernels the project's INT8 QDQ engine is fused into), at the layer
shapes of torchvision's ResNet-50 on a 32x32 input (8x8 down to 1x1 feature maps) and at one
large compute-bound shape that measures the kernels' arithmetic ceiling. Each model gets its own
session with 2 intra-op threads; rounds are interleaved over all models.

The LiteRT part builds, with the project's own ``tflite`` target (litert-torch; FP32, and
full-integer INT8 by PT2E calibrated on CIFAR-10 training images), small classifiers made of a
1x1 stem and one MobileNetV2 inverted-residual block (1x1 expand, 3x3 depthwise, 1x1 project,
residual add) at the feature-map sizes MobileNetV2 has on a 32x32 input, plus the same block and
a dense 3x3 convolution at a compute-bound size, and times them on the XNNPACK delegate.

Writes benchmarks/results/int8_kernel_ceiling/report.{json,md}.

    python benchmarks/int8_kernel_ceiling.py [--rounds 5] [--runs 200] [--only ort|tflite]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import SHARED, require_modules, write_text  # noqa: E402

# (name, in channels, out channels, kernel, stride, input height = width, how many in ResNet-50)
LAYERS = [
    ("layer1 1x1 64->64", 64, 64, 1, 1, 8, 1),
    ("layer1 3x3 64->64", 64, 64, 3, 1, 8, 3),
    ("layer1 1x1 256->64", 256, 64, 1, 1, 8, 2),
    ("layer1 1x1 64->256", 64, 256, 1, 1, 8, 4),
    ("layer2 3x3 128->128", 128, 128, 3, 1, 4, 3),
    ("layer2 1x1 512->128", 512, 128, 1, 1, 4, 3),
    ("layer2 1x1 128->512", 128, 512, 1, 1, 4, 4),
    ("layer3 3x3 256->256", 256, 256, 3, 1, 2, 5),
    ("layer3 1x1 1024->256", 1024, 256, 1, 1, 2, 5),
    ("layer3 1x1 256->1024", 256, 1024, 1, 1, 2, 6),
    ("layer4 3x3 512->512 (1x1 map)", 512, 512, 3, 1, 1, 2),
    ("layer4 1x1 2048->512 (1x1 map)", 2048, 512, 1, 1, 1, 2),
    ("layer4 1x1 512->2048 (1x1 map)", 512, 2048, 1, 1, 1, 3),
    ("compute-bound 3x3 256->256 @32x32", 256, 256, 3, 1, 32, 0),
]


def conv_models(cin: int, cout: int, k: int, stride: int, hw: int, rng: np.random.Generator) -> tuple[bytes, bytes]:
    w = (rng.standard_normal((cout, cin, k, k)) * 0.05).astype(np.float32)
    pad = [k // 2] * 4
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, (hw - 1) // stride + 1, (hw - 1) // stride + 1])
    fp32 = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=pad, strides=[stride] * 2)], "fp32", [x_info], [y_info],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(cout, np.float32), "b")])
    w_scale = (np.abs(w).reshape(cout, -1).max(1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(w_q, "wq"), numpy_helper.from_array(w_scale, "ws"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ys"), numpy_helper.from_array(np.array(128, np.uint8), "yz"),
             numpy_helper.from_array(np.zeros(cout, np.int32), "bq")]
    int8 = helper.make_graph([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"], ["yq"], pads=pad,
                         strides=[stride] * 2),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])], "int8", [x_info], [y_info], inits)

    def model(g: onnx.GraphProto) -> bytes:
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m)
        return m.SerializeToString()

    return model(fp32), model(int8)


# (name, stem/block channels, expansion, input height = width, how many such blocks in MobileNetV2)
BLOCKS = [
    ("MNv2 block c24 t6 @8x8", 24, 6, 8, 1),
    ("MNv2 block c32 t6 @4x4", 32, 6, 4, 2),
    ("MNv2 block c64 t6 @2x2", 64, 6, 2, 3),
    ("MNv2 block c96 t6 @2x2", 96, 6, 2, 2),
    ("MNv2 block c160 t6 @1x1", 160, 6, 1, 2),
    ("compute-bound MNv2 block c32 t6 @64x64", 32, 6, 64, 0),
    ("compute-bound dense 3x3 256->256 @32x32", 256, 0, 32, 0),
]


import torch  # noqa: E402
from torch import nn  # noqa: E402


class Block(nn.Module):
    def __init__(self, c: int, t: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 1), nn.ReLU6())
        if t:
            h = c * t
            self.body = nn.Sequential(nn.Conv2d(c, h, 1), nn.ReLU6(), nn.Conv2d(h, h, 3, padding=1, groups=h),
                                      nn.ReLU6(), nn.Conv2d(h, c, 1))
        else:
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.residual = bool(t)
        self.pool = nn.AdaptiveAvgPool2d(1)  # as torchvision's heads: the converter keeps it in NHWC
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.body(x)
        y = x + y if self.residual else y
        return self.head(self.pool(y).flatten(1))


def tflite_rows(args: argparse.Namespace, work: Path) -> list[dict]:
    """FP32 and INT8 .tflite files of each BLOCKS case built by the project's tflite target, timed
    on XNNPACK with 2 threads in interleaved rounds."""
    import torch

    from compressor.data import DataConfig, open_data
    from compressor.intake import load_model
    from compressor.targets.tflite import TFLiteTarget

    meta = json.loads((SHARED / "models" / "mobilenet_v2_cifar10.json").read_text())
    data = open_data(DataConfig(source="cifar10", root=str(SHARED / "datasets" / "cifar10"),
                                calibration={"samples": 64}))
    torch.manual_seed(0)
    cases = []
    for name, c, t, hw, count in BLOCKS:
        d = work / name.replace(" ", "_").replace("@", "").replace(">", "")
        d.mkdir(parents=True, exist_ok=True)
        path = d / "model.pt"
        torch.save(Block(c, t).eval(), path)
        path.with_suffix(".json").write_text(json.dumps({**meta, "input_shape": [1, 3, hw, hw]}))
        art = load_model(path, trust=True)
        runners = {}
        for key, quant in (("fp32", "none"), ("int8", "int8")):
            target = TFLiteTarget({"quantization": quant, "samples": 64})
            engine = target.build(art, d / key, data=data if target.needs_data else None)
            runners[key] = target.load(engine, threads=2)
        x = np.random.default_rng(0).standard_normal((1, 3, hw, hw)).astype(np.float32)
        cases.append({"name": name, "c_t_hw": [c, t, hw], "count": count,
                      "calls": {key: (lambda r=r, x=x: r(x)) for key, r in runners.items()}})
    p50 = interleaved_p50(cases, args)
    rows = []
    for case, (fp, q) in zip(cases, p50):
        rows.append({"layer": case["name"], "c_t_hw": case["c_t_hw"], "in_mobilenetv2": case["count"],
                     "fp32_p50_ms": fp, "int8_p50_ms": q, "speedup": fp / q})
    return rows


def interleaved_p50(cases: list[dict], args: argparse.Namespace) -> list[tuple[float, float]]:
    """(FP32, INT8) batch-1 p50 in ms of each case's two ``calls``, timed in rounds interleaved over
    every case (20 warm-up calls before each block), so a noisy spell falls on every model alike."""
    samples: list[dict[str, list[float]]] = [{key: [] for key in c["calls"]} for c in cases]
    for _ in range(args.rounds):
        for c, got in zip(cases, samples):
            for key, call in c["calls"].items():
                for _ in range(20):
                    call()
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    call()
                    got[key].append(1000 * (time.perf_counter() - t0))
    return [(float(np.median(got["fp32"])), float(np.median(got["int8"]))) for got in samples]


def session(content: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    return ort.InferenceSession(content, so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model per round")
    ap.add_argument("--only", choices=["ort", "tflite"])
    args = ap.parse_args()
    if args.only != "ort":  # the LiteRT part: the project's tflite target
        require_modules("litert_torch", "ai_edge_litert", "torchao")
    from compressor.environment import environment

    dest = HERE / "results" / "int8_kernel_ceiling"
    previous = json.loads((dest / "report.json").read_text()) if args.only and (dest / "report.json").is_file() else {}
    report = {"benchmark": "int8_kernel_ceiling", "command": " ".join(["python", "benchmarks/int8_kernel_ceiling.py",
                                                                       *sys.argv[1:]]),
              "onnxruntime": ort.__version__, "environment": environment(2)}
    if args.only != "ort":
        report["tflite_rows"] = tflite_rows(args, HERE / "work" / "int8_kernel_ceiling")
    elif "tflite_rows" in previous:
        report["tflite_rows"] = previous["tflite_rows"]
    if args.only == "tflite":
        for key in ("rows", "resnet50_layers_summed"):
            if key in previous:
                report[key] = previous[key]
    else:
        report.update(ort_rows(args))
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "report.json", json.dumps(report, indent=1) + "\n")
    write_markdown(report, args, dest)


def ort_rows(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    cases = []
    for name, cin, cout, k, stride, hw, count in LAYERS:
        fp32, int8 = conv_models(cin, cout, k, stride, hw, rng)
        x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
        sessions = {"fp32": session(fp32), "int8": session(int8)}
        cases.append({"name": name, "shape": [cin, cout, k, stride, hw], "in_resnet50": count,
                      "calls": {key: (lambda s=s, x=x: s.run(None, {"x": x})) for key, s in sessions.items()}})
    p50 = interleaved_p50(cases, args)
    rows = []
    for c, (fp, q) in zip(cases, p50):
        rows.append({"layer": c["name"], "cin_cout_k_stride_hw": c["shape"], "in_resnet50": c["in_resnet50"],
                     "fp32_p50_ms": fp, "int8_p50_ms": q, "speedup": fp / q})
    weighted = [r for r in rows if r["in_resnet50"]]
    fp_sum = sum(r["fp32_p50_ms"] * r["in_resnet50"] for r in weighted)
    q_sum = sum(r["int8_p50_ms"] * r["in_resnet50"] for r in weighted)
    return {"rows": rows, "resnet50_layers_summed": {"fp32_ms": fp_sum, "int8_ms": q_sum, "speedup": fp_sum / q_sum}}


def write_markdown(report: dict, args: argparse.Namespace, dest: Path) -> None:
    env = report["environment"]
    lines = ["# INT8 vs FP32 per layer on this CPU: ONNX Runtime and LiteRT/XNNPACK", "",
             f"Command: `{report['command']}`; 2 threads, batch 1, {args.rounds} interleaved rounds x {args.runs} "
             f"runs; CPU {env.get('cpu')}, ISA flags {', '.join(env.get('isa_flags') or [])}.", ""]
    if "rows" in report:
        lines += ["## ONNX Runtime", "",
                  f"onnxruntime {report['onnxruntime']}: FP32 `Conv` against `QLinearConv` (u8 activations, s8 "
                  "per-channel weights) with its Quantize/Dequantize edges, at the layer shapes of ResNet-50 on "
                  "32x32 CIFAR-10 input.", "",
                  "| layer | count in ResNet-50 | FP32 p50 ms | INT8 p50 ms | INT8 speedup |", "|---|---|---|---|---|"]
        for r in report["rows"]:
            lines.append(f"| {r['layer']} | {r['in_resnet50'] or '-'} | {r['fp32_p50_ms']:.4f} | "
                         f"{r['int8_p50_ms']:.4f} | {r['speedup']:.2f}x |")
        s = report["resnet50_layers_summed"]
        lines += ["", f"ResNet-50's convolutions summed by count: FP32 {s['fp32_ms']:.3f} ms, INT8 {s['int8_ms']:.3f} "
                      f"ms, **{s['speedup']:.2f}x** (each op with its own session edges).", ""]
    if "tflite_rows" in report:
        lines += ["## LiteRT on XNNPACK", "",
                  "The project's `tflite` target, FP32 against full-integer INT8 (PT2E, per-channel weights, 64 "
                  "CIFAR-10 calibration images), of a 1x1 stem + one block + pooling and a 10-way head.", "",
                  "| model | such blocks in MobileNetV2 | FP32 p50 ms | INT8 p50 ms | INT8 speedup |",
                  "|---|---|---|---|---|"]
        for r in report["tflite_rows"]:
            lines.append(f"| {r['layer']} | {r['in_mobilenetv2'] or '-'} | {r['fp32_p50_ms']:.4f} | "
                         f"{r['int8_p50_ms']:.4f} | {r['speedup']:.2f}x |")
    write_text(dest / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
