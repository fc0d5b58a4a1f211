"""The executorch target on the tiny digits CNN: an XNNPACK-lowered .pte run by ExecuTorch's Python
runtime, FP32 (equal to eager) and INT8 through PT2E with ExecuTorch's XNNPACKQuantizer; the runner
at batch 1, at odd sizes and above the program's batch bound; per-layer taps of both engines (a
second program lowered with the layers as extra outputs); max_drop keeping the planted layer in
float."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from compressor import Form, get_target
from compressor.errors import ConfigError, TargetError
from compressor.intake import load_model
from compressor.targets.executorch import ExecuTorchTarget

from .conftest import build_engines, run_engine, tiny_eval_set, usable_target_mark

pytestmark = usable_target_mark("compressor.targets.executorch", "ExecuTorchTarget", "executorch is not usable")

IMAGES = 200


@pytest.fixture(scope="module")
def eval_set(tiny, digits):
    return tiny_eval_set(tiny, digits, IMAGES)


@pytest.fixture(scope="module")
def engines(tiny, digits, tmp_path_factory):
    return build_engines(ExecuTorchTarget, {q: {"quantization": q} for q in ("none", "int8")}, tiny, digits,
                         tmp_path_factory.mktemp("executorch"))


def test_registered_with_config_and_data_needs(tiny, tmp_path):
    cls = get_target("executorch")
    assert cls is ExecuTorchTarget and cls.consumes == frozenset({Form.TORCH, Form.EXPORTED})
    assert ExecuTorchTarget().requires_data() and not ExecuTorchTarget(quantization="none").requires_data()
    with pytest.raises(ConfigError, match="quantization"):
        ExecuTorchTarget(quantization="fp16")
    with pytest.raises(ConfigError, match="max_drop applies to quantization int8"):
        ExecuTorchTarget(quantization="none", max_drop=1.0)
    with pytest.raises((ConfigError, TargetError), match="calibration data"):
        ExecuTorchTarget().build(tiny, tmp_path)
    for c in ExecuTorchTarget.tune_candidates(0.5):  # every config tune would build is valid
        ExecuTorchTarget(c["config"])


def test_tune_and_devices_take_it():
    from compressor.devices import DEVICES, resolve
    from compressor.tune import search_space

    assert all("executorch" in DEVICES[d].targets for d in ("x86-avx2", "x86-avx512-vnni", "x86-amx", "arm64"))
    cands, _ = search_space(resolve("arm64"), "torch", 0.5, ("executorch",))
    assert [(c.name, c.precision) for c in cands] == [("et_fp32", "fp32"), ("et_int8", "int8"),
                                                      ("et_int8_budget", "int8")]
    assert cands[2].target_step == {"executorch": {"quantization": "int8", "max_drop": 0.5}}
    cands, left = search_space(resolve("x86-avx2"), "onnx", 0.5, ("executorch",))
    assert not cands and "takes a torch model" in left[0]["why"]


def test_fp32_engine_equals_eager(engines, eval_set):
    x, _, ref = eval_set
    got, info = run_engine(engines, "none", x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert info["threads"] == 2 and info["delegate"] == "XNNPACK" and info["batch_capacity"] == 64
    engine = engines["none"][1]
    assert engine.precision == "fp32" and engine.path.name == "model.pte"
    assert engine.info["lowering"]["xnnpack_partitions"] >= 1 and engine.info["export"] == "dynamic batch"


def test_runner_batch_sizes_and_threads(engines, eval_set):
    """Batch 1, an odd size and one above the program's bound (sliced) give the same logits."""
    x, _, _ = eval_set
    whole, _ = run_engine(engines, "int8", x[:150])
    target, engine = engines["int8"]
    runner = target.load(engine, threads=1)
    try:
        assert runner.runtime_info()["threads"] == 1
        np.testing.assert_allclose(runner(x[:1]), whole[:1], rtol=0, atol=1e-5)
        np.testing.assert_allclose(runner(x[:7]), whole[:7], rtol=0, atol=1e-5)
        np.testing.assert_allclose(runner(x[:150]), whole, rtol=0, atol=1e-5)
    finally:
        runner.close()


def test_int8_agrees_with_fp32(engines, eval_set):
    x, labels, ref = eval_set
    got, _ = run_engine(engines, "int8", x)
    fp32, _ = run_engine(engines, "none", x)
    agree = float((got.argmax(1) == fp32.argmax(1)).mean())
    assert agree >= 0.95, f"INT8 agrees with FP32 on {agree:.1%}"
    assert float((got.argmax(1) == labels).mean()) >= float((ref.argmax(1) == labels).mean()) - 0.05
    info = engines["int8"][1].info
    assert engines["int8"][1].precision == "int8" and info["calibration_samples"] == 64
    assert info["weights"] == "int8 symmetric per-channel" and info["lowering"]["xnnpack_partitions"] >= 1


def _sqnr(want, got):
    return 10 * np.log10(float((want.astype(np.float64) ** 2).sum()) / max(float(((want - got) ** 2).sum()), 1e-30))


def test_taps_per_layer(engines, tiny, eval_set):
    """FP32 taps equal torch's (above 60 dB on every layer); INT8 taps are the dequantized int8
    tensors, with each layer's activation range in plan.quantizers."""
    from compressor.fidelity.torch_tapper import TorchTapper

    x, _, _ = eval_set
    ref = TorchTapper(tiny.torch_module())
    want = ref(x[:10])
    for q, floor in (("none", 60.0), ("int8", 20.0)):
        target, engine = engines[q]
        tap = target.tapper(engine, ref.layers, threads=2)
        try:
            got = tap(x[:10])  # 10: one full slice of the tap program's batch and a padded one
        finally:
            tap.close()
        assert tap.plan.layers == ref.plan.layers and not tap.plan.unmapped, tap.plan
        for layer in ref.plan.layers:
            assert got[layer].shape == want[layer].shape and got[layer].dtype == np.float32, layer
            assert _sqnr(want[layer], got[layer]) > floor, (q, layer, _sqnr(want[layer], got[layer]))
        assert bool(tap.plan.quantizers) == (q == "int8")


def test_exported_program_input(model_files, tmp_path):
    """A .pt2 (Form.EXPORTED) builds and runs like the module it unpacks to."""
    art = load_model(model_files["exported"])
    target = ExecuTorchTarget(quantization="none")
    engine = target.build(art, tmp_path)
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    runner = target.load(engine, threads=2)
    try:
        got = runner(x)
    finally:
        runner.close()
    with torch.inference_mode():
        want = art.torch_module()(torch.from_numpy(x[:1])).numpy()
    np.testing.assert_allclose(got[:1], want, rtol=1e-4, atol=1e-4)


PLANT = 300.0


@pytest.mark.slow
def test_max_drop_keeps_the_planted_layer_in_float(trained_tiny, digits, tmp_path):
    """The first conv's output carries a 300x outlier channel (FP32 unchanged), which ruins per-tensor
    INT8 activations; ranked by the SQNR each layer loses, it is kept in float and the budget holds."""
    from .conftest import PREP, SHAPE

    model = copy.deepcopy(trained_tiny).eval()
    with torch.no_grad():
        model[1].weight[3] *= PLANT
        model[1].bias[3] *= PLANT
        model[4].weight[:, 3] /= PLANT
    path = tmp_path / "planted.pt"
    torch.save(model, path)
    path.with_suffix(".json").write_text(json.dumps({"input_shape": SHAPE, "preprocessing": PREP.model_dump()}))
    art = load_model(path, trust=True)
    target = ExecuTorchTarget(quantization="int8", max_drop=2.0, kept_layer_latency=False)
    engine = target.build(art, tmp_path / "out", data=digits)
    budget = engine.info["accuracy_budget"]
    assert budget["drop_plain"] > 10, budget  # the plant is not marginal: plain INT8 loses it
    assert budget["ranking"] and budget["ranking"][0]["layer"] == "0", budget["ranking"]
    assert budget["met"] and budget["kept_in_float"][0] == "0" and len(budget["kept_in_float"]) <= 2, budget
