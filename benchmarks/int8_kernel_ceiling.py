"""What INT8 can gain over FP32 per convolution on this CPU, in ONNX Runtime (issue 4's 3x).

Issue 4 asks ONNX Runtime INT8 ResNet-50 to run 3x faster than FP32 at batch 1. This script
times single convolutions, FP32 ``Conv`` against ``QLinearConv`` (u8 activations, s8
per-channel weights, the same kernels the project's INT8 QDQ engine is fused into), at the layer
shapes of torchvision's ResNet-50 on a 32x32 input (8x8 down to 1x1 feature maps) and at one
large compute-bound shape that measures the kernels' arithmetic ceiling. Each model gets its own
session with 2 intra-op threads; rounds are interleaved over all models.

Writes benchmarks/results/int8_kernel_ceiling/report.{json,md}.

    python benchmarks/int8_kernel_ceiling.py [--rounds 5] [--runs 200]
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


def session(content: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    return ort.InferenceSession(content, so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model per round")
    args = ap.parse_args()
    from compressor.environment import environment

    rng = np.random.default_rng(0)
    cases = []
    for name, cin, cout, k, stride, hw, count in LAYERS:
        fp32, int8 = conv_models(cin, cout, k, stride, hw, rng)
        x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
        cases.append({"name": name, "shape": [cin, cout, k, stride, hw], "in_resnet50": count, "x": x,
                      "sessions": {"fp32": session(fp32), "int8": session(int8)},
                      "samples": {"fp32": [], "int8": []}})
    for _ in range(args.rounds):  # interleaved: a noisy spell falls on every model alike
        for c in cases:
            for key, s in c["sessions"].items():
                for _ in range(20):
                    s.run(None, {"x": c["x"]})
                got = c["samples"][key]
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    s.run(None, {"x": c["x"]})
                    got.append(1000 * (time.perf_counter() - t0))
    rows = []
    for c in cases:
        fp, q = float(np.median(c["samples"]["fp32"])), float(np.median(c["samples"]["int8"]))
        rows.append({"layer": c["name"], "cin_cout_k_stride_hw": c["shape"], "in_resnet50": c["in_resnet50"],
                     "fp32_p50_ms": fp, "int8_p50_ms": q, "speedup": fp / q})
    weighted = [r for r in rows if r["in_resnet50"]]
    fp_sum = sum(r["fp32_p50_ms"] * r["in_resnet50"] for r in weighted)
    q_sum = sum(r["int8_p50_ms"] * r["in_resnet50"] for r in weighted)
    report = {"benchmark": "int8_kernel_ceiling", "command": " ".join(["python", "benchmarks/int8_kernel_ceiling.py",
                                                                       *sys.argv[1:]]),
              "onnxruntime": ort.__version__, "environment": environment(2), "rows": rows,
              "resnet50_layers_summed": {"fp32_ms": fp_sum, "int8_ms": q_sum, "speedup": fp_sum / q_sum}}
    dest = HERE / "results" / "int8_kernel_ceiling"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    env = report["environment"]
    lines = ["# INT8 vs FP32 per convolution in ONNX Runtime on this CPU", "",
             f"Command: `{report['command']}`; onnxruntime {ort.__version__}, 2 intra-op threads, batch 1, "
             f"{args.rounds} interleaved rounds x {args.runs} runs; CPU {env.get('cpu')}, ISA flags "
             f"{', '.join(env.get('isa_flags') or [])}.", "",
             "FP32 `Conv` against `QLinearConv` (u8 activations, s8 per-channel weights) with its Quantize/"
             "Dequantize edges, at the layer shapes of ResNet-50 on 32x32 CIFAR-10 input.", "",
             "| layer | count in ResNet-50 | FP32 p50 ms | INT8 p50 ms | INT8 speedup |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['in_resnet50'] or '-'} | {r['fp32_p50_ms']:.4f} | {r['int8_p50_ms']:.4f} | "
                     f"{r['speedup']:.2f}x |")
    s = report["resnet50_layers_summed"]
    lines += ["", f"ResNet-50's convolutions summed by count: FP32 {s['fp32_ms']:.3f} ms, INT8 {s['int8_ms']:.3f} ms, "
                  f"**{s['speedup']:.2f}x** (each op with its own session edges, so an upper bound on overheads)."]
    (dest / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
