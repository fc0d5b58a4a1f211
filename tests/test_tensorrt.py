"""TensorRT path: QDQ ONNX from NVIDIA ModelOpt placed per TensorRT's rules, checked on the graph;
where TensorRT cannot build, the engine directory still holds the QDQ ONNX and the build command,
the report says "not built here" and the same graph is measured on ONNX Runtime as a proxy."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from compressor import qdq_rules
from compressor.cli import main
from compressor.passes._ptq.modelopt_qdq import quantize_for_tensorrt
from compressor.targets.tensorrt import TensorRTTarget

from .conftest import SHAPE, write_recipe

modelopt = pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is not installed")
TRT_HERE = TensorRTTarget.availability()

JETSON_RECIPE = """
name: tiny_jetson
data:
  source: digits
  calibration: {samples: 64}
  evaluation: {limit: 300}
passes:
  - fuse
  - export_onnx
  - quantize_ptq: {backend: tensorrt, calibration: minmax}
targets:
  - tensorrt: {min_batch: 1, opt_batch: 4, max_batch: 16, workspace_mb: 256, dla_core: 0}
evaluation:
  batch_size: 50
  warmup: 1
  latency_runs: 10
  latency_min_seconds: 0
  throughput_batch: 4
  throughput_seconds: 0.05
"""


class Residual(nn.Module):
    """conv-bn-relu, conv-bn, + skip, relu: the block whose Add TensorRT fuses into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(torch.relu(self.body(y) + y))


def _quantize(tmp_path, model: nn.Module) -> onnx.ModelProto:
    src, out = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(SHAPE),), str(src), dynamo=False, input_names=["input"],
                      opset_version=17)
    calib = np.random.default_rng(0).normal(size=(16, *SHAPE[1:])).astype(np.float32)
    quantize_for_tensorrt(src, out, calib, "minmax")
    return onnx.load(str(out))


def test_modelopt_graph_follows_tensorrt_placement_rules(tmp_path):
    torch.manual_seed(0)
    proto = _quantize(tmp_path, Residual())
    report = qdq_rules.check(proto)
    assert report.ok, [str(v) for v in report.violations]
    assert report.counts["quantize_linear"] > 0 and report.counts["weighted_layers"] == 4
    adds = [n for n in proto.graph.node if n.op_type == "Add"]
    assert adds, "the residual Add must survive export"


def test_rules_catch_qdq_that_blocks_fusion_and_per_tensor_weights(tmp_path):
    torch.manual_seed(0)
    proto = _quantize(tmp_path, Residual())
    graph = proto.graph
    # 1. a Q/DQ pair between the first conv and its ReLU (blocks conv + bias + ReLU fusion)
    relu = next(n for n in graph.node if n.op_type == "Relu")
    conv_out = relu.input[0]
    graph.initializer.extend([numpy_helper.from_array(np.array(0.1, np.float32), "s_bad"),
                              numpy_helper.from_array(np.array(0, np.int8), "z_bad")])
    graph.node.extend([helper.make_node("QuantizeLinear", [conv_out, "s_bad", "z_bad"], ["q_bad"], name="Q_bad"),
                       helper.make_node("DequantizeLinear", ["q_bad", "s_bad", "z_bad"], ["dq_bad"], name="DQ_bad")])
    relu.input[0] = "dq_bad"
    # 2. per-tensor weight scale on one conv
    conv = next(n for n in graph.node if n.op_type == "Conv")
    producer = {o: n for n in graph.node for o in n.output}
    w_dq = producer[conv.input[1]]
    scale = next(i for i in graph.initializer if i.name == w_dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(np.array(numpy_helper.to_array(scale).max(), np.float32), scale.name))
    report = qdq_rules.check(proto)
    rules = {v.rule for v in report.violations}
    assert {"no_qdq_before_activation", "weights_per_channel"} <= rules, report.violations


def test_onnxruntime_uint8_graph_is_not_tensorrt_ready(model_files):
    """ORT's QDQ with unsigned activations breaks the symmetric-INT8 rule, and the check says so."""
    from compressor import Pipeline, get_pass
    from compressor.data import DataConfig, open_data
    from compressor.intake import load_model

    data = open_data(DataConfig(source="digits", calibration={"samples": 16}))
    ptq = get_pass("quantize_ptq")(backend="onnxruntime", activation_type="uint8")
    result = Pipeline([ptq], []).run(load_model(model_files["onnx"]), data=data)
    report = qdq_rules.check(result.artifacts[-1].path)
    assert not report.ok and "symmetric_int8" in {v.rule for v in report.violations}


@pytest.mark.skipif(TRT_HERE.ok, reason="TensorRT is available here: the engine is built, not proxied")
def test_jetson_recipe_writes_qdq_and_build_command_and_measures_proxy(tmp_path, capsys, model_files):
    recipe = write_recipe(tmp_path / "jetson.yaml", JETSON_RECIPE)
    out = tmp_path / "out"
    code = main([str(model_files["pickle"]), "-r", str(recipe), "--trust-model", "-o", str(out), "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    engine_dir = out / "engines" / "tensorrt-int8"
    script = (engine_dir / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.onnx" in script and "--int8" in script and "--fp16" in script
    assert "--minShapes=input:1x3x16x16" in script.replace("'", "") or "x3x16x16" in script
    assert "--maxShapes=" in script and ":16x3x16x16" in script and "--useDLACore=0" in script
    assert "--memPoolSize=workspace:256M" in script and "compress build-engine" in script
    assert os.stat(engine_dir / "build_engine.sh").st_mode & stat.S_IXUSR
    assert qdq_rules.check(engine_dir / "model.onnx").ok
    assert [f["target"] for f in report["failures"]] == ["tensorrt"]
    assert report["failures"][0]["unavailable"] and TRT_HERE.reason in report["failures"][0]["reason"]
    rows = {r["name"]: r for r in report["results"]}
    proxy = rows["tensorrt-int8-proxy-onnxruntime"]
    assert proxy["top1"] > rows["source"]["top1"] - 5 and proxy["agreement"] > 90
    assert "proxy" in proxy["runtime"] and proxy["runtime"]["runtime"].startswith("onnxruntime")
    assert report["passes"][-1]["metrics"]["tensorrt_qdq_rules"]["ok"] is True
    assert "not built here" in (out / "report.md").read_text()

    # the project's own build verb: on a machine without TensorRT, one line and exit 2
    code = main(["build-engine", str(engine_dir)])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().startswith("error: target 'tensorrt' is not available here")
    assert not (engine_dir / "model.engine").exists()

    # --require-targets turns the unbuilt engine into an error before any work
    out2 = tmp_path / "strict"
    code = main([str(model_files["pickle"]), "-r", str(recipe), "--trust-model", "-o", str(out2), "-q",
                 "--require-targets"])
    _, err = capsys.readouterr()
    assert code == 2 and "--require-targets" in err and len(err.strip().splitlines()) == 1
    assert not out2.exists()


@pytest.mark.skipif(not TRT_HERE.ok, reason=f"TensorRT engine build needs TensorRT and a CUDA device: {TRT_HERE.reason}")
def test_tensorrt_engine_builds_and_runs(tmp_path, capsys, model_files):  # pragma: no cover - needs a GPU
    recipe = write_recipe(tmp_path / "jetson.yaml", JETSON_RECIPE.replace(", dla_core: 0", ""))
    out = tmp_path / "out"
    code = main([str(model_files["pickle"]), "-r", str(recipe), "--trust-model", "-o", str(out), "-q",
                 "--require-targets"])
    assert code == 0, capsys.readouterr()
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["results"]}
    assert rows["tensorrt-int8"]["agreement"] > 90
    assert (out / "engines" / "tensorrt-int8" / "model.engine").stat().st_size > 0
