"""The tflite target on the tiny digits CNN: litert-torch conversion (FP32, FP16 weights, dynamic-range
and full-integer INT8), the LiteRT interpreter runner at batch 1 and >1, and conversion errors
that name the target, the op and the pass that produced the graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor import Form, Pipeline, get_target
from compressor.errors import ConfigError, TargetError
from compressor.targets.tflite import TFLiteTarget

from .conftest import build_engines, run_engine, tiny_eval_set, usable_target_mark

pytestmark = usable_target_mark("compressor.targets.tflite", "TFLiteTarget", "litert is not importable")


@pytest.fixture(scope="module")
def eval_set(tiny, digits):
    return tiny_eval_set(tiny, digits, None)


@pytest.fixture(scope="module")
def engines(tiny, digits, tmp_path_factory):
    """One engine per quantization mode, built once for the module."""
    configs = {"none": {}, "int8": {}, "fp16": {}, "dynamic_int8": {},
               "int8-aeq": {"quantization": "int8", "int8_method": "ai_edge_quantizer", "io": "quantized"}}
    return build_engines(TFLiteTarget, {k: {"quantization": k, **extra} for k, extra in configs.items()}, tiny, digits,
                         tmp_path_factory.mktemp("tflite"))


def test_registered_with_config_and_data_needs():
    cls = get_target("tflite")
    assert cls is TFLiteTarget and cls.consumes == frozenset({Form.TORCH, Form.EXPORTED})
    assert TFLiteTarget().requires_data() and TFLiteTarget().config.quantization == "int8"
    assert not TFLiteTarget(quantization="none").requires_data()
    assert not TFLiteTarget(quantization="fp16").requires_data()
    with pytest.raises(ConfigError, match="quantization"):
        TFLiteTarget(quantization="int4")
    with pytest.raises(ConfigError, match="unknown key"):
        TFLiteTarget(nonsense=1)


def test_int8_without_data_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="needs calibration data"):  # the one data rule of passes and targets
        TFLiteTarget().build(tiny, tmp_path)


def test_fp32_engine_agrees_with_torch(engines, eval_set):
    x, labels, ref = eval_set
    target, engine = engines["none"]
    assert engine.name == "tflite-fp32" and engine.precision == "fp32" and engine.path.name == "model.tflite"
    assert engine.info["flatbuffer"]["input"] == {"type": "FLOAT32", "shape": [1, 3, 16, 16]}
    got, info = run_engine(engines, "none", x)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert info["threads"] == 2 and info["delegate"] == "XNNPACK" and info["input_dtype"] == "float32"
    assert info["undelegated_ops"] == {}, info


@pytest.mark.parametrize("key", ["none", "int8", "int8-aeq"])
def test_runner_batch_sizes(engines, eval_set, key):
    x = eval_set[0][:7]
    target, engine = engines[key]
    runner = target.load(engine, threads=1)
    try:
        runner.prepare(1)
        one = np.concatenate([runner(x[i : i + 1]) for i in range(len(x))])
        many = runner(x)  # prepared lazily
        runner.prepare(3)
        three = np.concatenate([runner(x[i : i + 3]) for i in range(0, 6, 3)])
        info = runner.runtime_info()
    finally:
        runner.close()
    assert many.shape == (7, 10) and many.dtype == np.float32
    np.testing.assert_allclose(many, one, atol=1e-6)
    np.testing.assert_allclose(three, one[:6], atol=1e-6)
    assert info["batch_sizes"] == [1, 3, 7] and info["batching"].startswith("resized")
    assert info["threads"] == 1


def test_runner_loops_at_batch_1_where_the_graph_cannot_be_resized(engines, eval_set, monkeypatch):
    from compressor.targets.tflite import TFLiteRunner

    x = eval_set[0][:5]
    target, engine = engines["int8"]
    runner = target.load(engine, threads=2)
    make = TFLiteRunner._make

    def fixed_batch(self, batch):
        if batch != 1:
            raise ValueError("cannot resize")
        return make(self, batch)

    monkeypatch.setattr(TFLiteRunner, "_make", fixed_batch)
    try:
        got = runner(x)
        info = runner.runtime_info()
    finally:
        runner.close()
    np.testing.assert_allclose(got, run_engine(engines, "int8", x)[0], atol=1e-6)
    assert info["batch_sizes"] == [1] and "batch 1 loop for batch sizes [5]" in info["batching"]


@pytest.mark.parametrize("key", ["int8", "int8-aeq"])
def test_int8_is_full_integer_and_accurate(engines, eval_set, key):
    x, labels, ref = eval_set
    target, engine = engines[key]
    assert engine.name == "tflite-int8" and engine.precision == "int8"
    info = engine.info
    assert info["calibration_samples"] == 64
    assert info["route"].startswith("pt2e" if key == "int8" else "litert_torch.convert + ai-edge-quantizer")
    fb = info["flatbuffer"]
    assert fb["op_types"]["CONV_2D"] == 2 and fb["float_compute_ops"] == 0, fb["op_dtypes"]
    assert any(k.startswith("CONV_2D:INT8,INT8,INT32->INT8") for k in fb["op_dtypes"]), fb["op_dtypes"]
    assert any(k.startswith("FULLY_CONNECTED:INT8,INT8") for k in fb["op_dtypes"]), fb["op_dtypes"]
    # the interpreter's own view of the tensors: int8 activations and weights
    from ai_edge_litert.interpreter import Interpreter

    dtypes = [np.dtype(d["dtype"]) for d in Interpreter(model_path=str(engine.path)).get_tensor_details()]
    assert dtypes.count(np.dtype(np.int8)) > dtypes.count(np.dtype(np.float32)), dtypes
    got, rt = run_engine(engines, key, x)
    if key == "int8":  # io: float, QUANTIZE / DEQUANTIZE ops inside the model
        assert rt["input_dtype"] == "float32" and rt["output_dtype"] == "float32"
        assert fb["op_dtypes"].get("QUANTIZE:FLOAT32->INT8") == 1 and fb["input"]["type"] == "FLOAT32"
    else:  # io: quantized, the runner (de)quantizes with the model's scales
        assert rt["input_dtype"] == "int8" and rt["input_quantization"]["scale"] > 0
    assert rt["undelegated_ops"] == {}, rt
    top1 = 100 * (got.argmax(1) == labels).mean()
    ref_top1 = 100 * (ref.argmax(1) == labels).mean()
    assert top1 >= ref_top1 - 3, (top1, ref_top1)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("q, weight_type, name", [("fp16", "FLOAT16", "tflite-fp16"),
                                                  ("dynamic_int8", "INT8", "tflite-dynamic_int8")])
def test_fp16_and_dynamic_int8_build_andrun_engine(engines, eval_set, q, weight_type, name):
    x, labels, ref = eval_set
    target, engine = engines[q]
    assert engine.name == name and engine.info["quantization"] == q
    fb = engine.info["flatbuffer"]
    assert weight_type in fb["tensor_types"], fb
    assert fb["input"]["type"] == "FLOAT32"
    got, info = run_engine(engines, q, x[:50])
    assert got.shape == (50, 10) and info["input_dtype"] == "float32"
    assert (got.argmax(1) == ref[:50].argmax(1)).mean() >= 0.94
    if q == "fp16":
        np.testing.assert_allclose(got, ref[:50], rtol=1e-2, atol=1e-2)
    assert engines["none"][1].size_bytes > engine.size_bytes


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = self.pool(y + self.c2(y))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def test_non_strict_capture_still_quantizes_adds_and_pools(tiny, digits, tmp_path):
    """Non-strict torch.export records no source functions; the target tags them for the quantizer."""
    art = tiny.derive(Form.TORCH, model=_Residual().eval())
    engine = TFLiteTarget(quantization="int8", export="non_strict", samples=16).build(art, tmp_path, data=digits)
    fb = engine.info["flatbuffer"]
    assert engine.info["export"] == "non_strict" and engine.info["calibration_samples"] == 16
    assert fb["op_dtypes"]["ADD:INT8,INT8->INT8"] == 1 and fb["op_dtypes"]["MAX_POOL_2D:INT8->INT8"] == 1, fb
    assert fb["float_compute_ops"] == 0, fb


class _Erfinv(nn.Module):
    """aten.erfinv has no LiteRT lowering."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        y = torch.special.erfinv(torch.tanh(self.conv(x)) * 0.5)
        return self.head(y.mean((2, 3)))


def test_unconvertible_op_names_target_op_and_pass(tiny, tmp_path):
    art = tiny.derive(Form.TORCH, model=_Erfinv().eval())
    art.lineage = [{"pass": "fuse", "step": "passes[0]", "config": {}}]
    with pytest.raises(TargetError) as err:
        TFLiteTarget(quantization="none", step="targets[0]").build(art, tmp_path)
    msg = str(err.value)
    assert "targets[0]" in msg and "'tflite'" in msg and "aten.erfinv" in msg and "pass 'fuse'" in msg, msg
    assert not list(tmp_path.iterdir())  # no half-built engine left behind


def test_pipeline_reports_the_failure_and_still_builds_the_other_targets(tiny, tmp_path):
    art = tiny.derive(Form.TORCH, model=_Erfinv().eval())  # OpenVINO converts erfinv, LiteRT cannot
    targets = [TFLiteTarget(quantization="none", step="targets[0]"), get_target("openvino")(step="targets[1]")]
    result = Pipeline([], targets).run(art, out_dir=tmp_path)
    assert [(f.target, f.step, f.unavailable) for f in result.failures] == [("tflite", "targets[0]", False)]
    assert "aten.erfinv" in result.failures[0].reason and "source model" in result.failures[0].reason
    assert [e.target for e in result.engines] == ["openvino"]


PLANT = 300.0


@pytest.mark.parametrize("form", ["exported", "torchscript"])
def test_budget_keeps_and_rebuilds_layers_on_every_torch_form(form, trained_tiny, tmp_path, capsys):
    """max_drop on a torch.export program and on TorchScript ranks, keeps and rebuilds layers as it
    does for an nn.Module (tests/test_explain.py): the first conv's output carries a 300x outlier
    channel (FP32 unchanged), which ruins per-tensor INT8 on any CPU; kept in float, the budget holds.
    Before, an ATen graph gave the budget no layers to rank and it tried nothing."""
    import copy
    import json

    from .conftest import PREP, SHAPE, cli, write_recipe

    model = copy.deepcopy(trained_tiny).eval()
    with torch.no_grad():
        model[1].weight[3] *= PLANT
        model[1].bias[3] *= PLANT
        model[4].weight[:, 3] /= PLANT
    example = torch.zeros(SHAPE)
    path = tmp_path / ("planted.pt2" if form == "exported" else "planted_ts.pt")
    if form == "exported":
        torch.export.save(torch.export.export(model, (example,)), str(path))
    else:
        torch.jit.save(torch.jit.trace(model, example), str(path))
    path.with_suffix(".json").write_text(json.dumps({"input_shape": SHAPE, "preprocessing": PREP.model_dump()}))
    recipe = write_recipe(tmp_path / "tfl.yaml", """
name: planted
data: {source: digits, calibration: {samples: 64}, evaluation: {limit: 100}}
passes: [fuse]
targets:
  - tflite: {quantization: int8, max_drop: 2.0, kept_layer_latency: false}
evaluation: {batch_size: 64, warmup: 1, latency_runs: 10, latency_min_seconds: 0, latency_rounds: 1,
             throughput_batch: 4, throughput_seconds: 0.01, threads: 2}
""")
    code, out, err = cli(capsys, path, "--recipe", recipe, "--out", tmp_path / "out", "-q")
    assert (tmp_path / "out" / "report.json").is_file(), (code, err[-2000:])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    budget = report["engines"][0]["info"]["accuracy_budget"]
    assert budget["drop_plain"] > 10, budget  # the plant is not marginal: plain INT8 loses it
    assert budget["ranking"] and budget["ranking"][0]["layer"] == "0", budget["ranking"]
    assert budget["met"] and budget["kept_in_float"][0] == "0" and len(budget["kept_in_float"]) <= 2, budget
    assert code == 0, err[-2000:]
