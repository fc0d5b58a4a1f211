"""quantize_qat: NNCF QAT from PTQ calibration on the tiny digits CNN, a fraction of an epoch; the
result builds an INT8 OpenVINO engine and exports to a QDQ ONNX graph, like quantize_ptq."""

import copy

import numpy as np
import pytest
import torch

from compressor import ConfigError, Form, ModelArtifact, PassError, get_pass, get_target
from compressor.data import DataConfig, open_data, preprocess
from compressor.intake import load_model
from compressor.pass_base import PassContext
from compressor.training import TrainConfig

FAST = TrainConfig(epochs=0.3, batch_size=64, val_samples=100, lr=1e-4)


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 64}))


@pytest.fixture(scope="module")
def source(model_files):
    return load_model(model_files["pickle"], trust=True)


@pytest.fixture(scope="module")
def qat(source, digits, tmp_path_factory):
    before = copy.deepcopy(source.model.state_dict())
    p = get_pass("quantize_qat")(train=FAST)
    result = p(source, PassContext(work_dir=tmp_path_factory.mktemp("qat"), data=digits, threads=2))
    return result, before


def _test_images(digits, art):
    x, y = digits.evaluation_set((16, 16), "RGB")
    return preprocess(x, art.preprocessing), y


def _fp32_labels(source, x):
    with torch.inference_mode():
        return source.model(torch.from_numpy(x)).argmax(1).numpy()


def test_qat_gives_a_fake_quantized_torch_model(qat, source):
    result, _ = qat
    art, m = result.artifact, result.metrics
    assert art.form is Form.TORCH and art.precision == "int8" and art.meta["qat"] is True
    assert art.input_spec == source.input_spec and art.classes == source.classes
    assert m["quantizers"] == 7  # 3 weights (2 conv, 1 linear) + 4 activations
    assert m["samples"] == 64 and m["validation_images"] == 100
    assert m["train"]["steps"] >= 1 and m["train"]["history"]
    for key in ("fp32_val_top1", "ptq_val_top1", "qat_val_top1"):
        assert 80 < m[key] <= 100, (key, m)


def test_input_artifact_is_untouched(qat, source):
    _, before = qat
    assert type(source.model).__name__ == "Sequential"
    after = source.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_openvino_builds_an_int8_engine_that_agrees_with_fp32(qat, source, digits, tmp_path):
    art = qat[0].artifact
    target = get_target("openvino")()
    engine = target.build(art, tmp_path / "ov")
    runner = target.load(engine, threads=2)
    x, _ = _test_images(digits, art)
    got = np.concatenate([runner(x[i : i + 64]) for i in range(0, len(x), 64)])
    agreement = (got.argmax(1) == _fp32_labels(source, x)).mean()
    assert agreement >= 0.85, agreement
    precisions = runner.runtime_info()["layer_precisions"]
    assert any(k.startswith("Convolution:") and k.endswith(("u8", "i8")) for k in precisions), precisions


def test_exports_to_qdq_onnx_that_onnxruntime_runs(qat, source, digits, tmp_path):
    import onnx
    import openvino as ov

    art = qat[0].artifact
    fq_before = _openvino_fake_quantize_nodes(ov, art)
    out = get_pass("export_onnx")(exporter="torchscript")(art, PassContext(work_dir=tmp_path, data=digits))
    ops = [n.op_type for n in onnx.load(str(out.artifact.path)).graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == qat[0].metrics["quantizers"]
    assert "FakeQuantize" not in ops  # NNCF's OpenVINO-only custom op would not run in ORT

    runner = get_target("onnxruntime")().load(
        get_target("onnxruntime")().build(out.artifact, tmp_path / "ort"), threads=2)
    x, _ = _test_images(digits, art)
    agreement = (runner(x).argmax(1) == _fp32_labels(source, x)).mean()
    assert agreement >= 0.85, agreement
    # the export switched the quantizers to QDQ mode only for its duration
    assert _openvino_fake_quantize_nodes(ov, art) == fq_before > 0


def _openvino_fake_quantize_nodes(ov, art):
    model = ov.convert_model(art.model, example_input=torch.zeros(art.input_spec.with_batch(1)))
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def test_survives_the_pass_cache_pickle(qat, digits, tmp_path):
    art = qat[0].artifact
    art.save(tmp_path / "cached")
    loaded = ModelArtifact.load(tmp_path / "cached")
    assert loaded.precision == "int8" and loaded.meta["qat"] is True
    x, _ = _test_images(digits, art)
    with torch.inference_mode():
        assert torch.equal(loaded.model(torch.from_numpy(x)), art.model(torch.from_numpy(x)))
    assert loaded.content_hash() == art.content_hash()


def test_takes_the_fx_graph_that_fuse_makes(source, digits, tmp_path):
    fused = get_pass("fuse")()(source, PassContext(work_dir=tmp_path / "fuse", data=digits)).artifact
    assert isinstance(fused.model, torch.fx.GraphModule)
    (tmp_path / "qat").mkdir()
    cfg = {"calibration_samples": 32, "train": {"max_steps": 2, "batch_size": 32, "val_samples": 50}}
    result = get_pass("quantize_qat")(cfg)(fused, PassContext(work_dir=tmp_path / "qat", data=digits))
    assert result.artifact.precision == "int8" and result.metrics["quantizers"] == 7
    assert result.metrics["qat_val_top1"] > 80


def test_needs_data(source, tmp_path):
    with pytest.raises(ConfigError, match="needs calibration data"):
        get_pass("quantize_qat")(train=FAST)(source, PassContext(work_dir=tmp_path, data=None))


def test_rejects_torchscript_and_a_second_quantization(model_files, qat, digits, tmp_path):
    p = get_pass("quantize_qat")(train=FAST)
    scripted = load_model(model_files["torchscript"])
    with pytest.raises(PassError, match="not a TorchScript model"):
        p(scripted, PassContext(work_dir=tmp_path, data=digits))
    with pytest.raises(ConfigError, match="TorchScript"):
        p.preflight(scripted, digits)
    with pytest.raises(PassError, match="already fake-quantized"):
        p(qat[0].artifact, PassContext(work_dir=tmp_path, data=digits))


def test_config_defaults_are_a_short_gentle_fine_tune():
    cfg = get_pass("quantize_qat")().config
    assert cfg.calibration_samples is None and cfg.preset == "performance"
    assert cfg.train.epochs <= 1 and cfg.train.lr <= 1e-4 and cfg.train.weight_decay == 0
    # a partial train section keeps the QAT defaults for what it leaves out (not lr 1e-3 from scratch)
    partial = get_pass("quantize_qat")(train={"max_steps": 3}).config.train
    assert partial.max_steps == 3 and partial.lr == cfg.train.lr and partial.weight_decay == 0
    assert get_pass("quantize_qat")(train=FAST).config.train.lr == FAST.lr
    with pytest.raises(ConfigError):
        get_pass("quantize_qat")(preset="fast")
