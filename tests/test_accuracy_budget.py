"""quantize_ptq under an accuracy budget (issue 12): ``max_drop`` in top-1 points on validation
images held out of the training split. A planted model, the tiny digits CNN with one outlier
channel at the second conv's input (the first conv's BN output scaled by 500, the second conv's
weights for that channel divided by 500, so FP32 is unchanged), loses most of its top-1 to plain
per-tensor INT8 activations on every backend; with ``max_drop`` the budget holds keeping at most two
layers in float, judged by the upper confidence bound of the drop (compressor.bound) on as many
validation images as the bound asks for (at least 500). A second outlier (at the classifier's input) with ``max_kept_layers: 1`` makes the
budget impossible: the pass returns the best model with ``met: false``."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from compressor import get_pass
from compressor.data import DataConfig, open_data, preprocess
from compressor.errors import ConfigError
from compressor.intake import load_model
from compressor.pass_base import PassContext

from .conftest import PREP, SHAPE
from .test_quantize_ptq import BACKENDS, run_int8

CALIBRATION = 48
VALIDATION = 200  # what test_validation_images_are_not_calibration_or_test_images draws
BUDGET = 2.0
"""points: 500 validation images prove it with up to 3 net losses (bound 1.74), so the verdict does
not hang on an image or two that INT8 kernels of another CPU round differently"""
SCALE = 500.0
OUTLIERS = {"single": [(1, 4, 0)], "double": [(1, 4, 0), (5, 10, 3)]}  # (BatchNorm, next layer, channel)


def plant(model: torch.nn.Module, outliers: list[tuple[int, int, int]]) -> torch.nn.Module:
    planted = copy.deepcopy(model)
    with torch.no_grad():
        for bn, nxt, channel in outliers:
            planted[bn].weight[channel] *= SCALE
            planted[bn].bias[channel] *= SCALE
            planted[nxt].weight[:, channel] /= SCALE
    return planted


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": CALIBRATION}))


@pytest.fixture(scope="module")
def planted(trained_tiny, tmp_path_factory):
    """{kind: {"torch": artifact, "onnx": artifact}} for the single and double outlier models."""
    d = tmp_path_factory.mktemp("planted")
    meta = {"input_shape": SHAPE, "preprocessing": PREP.model_dump(), "classes": [str(i) for i in range(10)]}
    example = torch.randn(8, *SHAPE[1:])
    out = {}
    for kind, outliers in OUTLIERS.items():
        model = plant(trained_tiny, outliers).eval()
        with torch.no_grad():  # FP32 is unchanged
            torch.testing.assert_close(model(example), trained_tiny(example), rtol=1e-4, atol=1e-4)
        torch.save(model, d / f"{kind}.pt")
        torch.onnx.export(model, (torch.zeros(SHAPE),), str(d / f"{kind}.onnx"), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}}, opset_version=17)
        for suffix in (".pt", ".onnx"):
            (d / f"{kind}{suffix}").with_suffix(".json").write_text(json.dumps(meta))
        out[kind] = {"torch": load_model(d / f"{kind}.pt", trust=True), "onnx": load_model(d / f"{kind}.onnx")}
    return out


@pytest.fixture(scope="module")
def test_split(digits):
    x, labels = digits.evaluation_set((16, 16), "RGB")
    return preprocess(x, PREP), labels


def quantize(backend, source, digits, tmp_path, **config):
    art = source["torch"] if backend == "openvino" else source["onnx"]
    work = tmp_path / backend
    work.mkdir()
    p = get_pass("quantize_ptq")({"backend": backend, **config})
    return p(art, PassContext(work_dir=work, data=digits, threads=2))


def top1(art, x, labels) -> float:
    return 100.0 * float((run_int8(art, x).argmax(1) == labels).mean())


def fp32_top1(source, x, labels) -> float:
    with torch.inference_mode():
        return 100.0 * float((source["torch"].model(torch.from_numpy(x)).argmax(1).numpy() == labels).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_ptq_loses_most_of_top1(backend, planted, digits, test_split, tmp_path):
    res = quantize(backend, planted["single"], digits, tmp_path)
    assert "accuracy_budget" not in res.metrics  # no max_drop: plain PTQ as before
    x, labels = test_split
    drop = fp32_top1(planted["single"], x, labels) - top1(res.artifact, x, labels)
    assert drop > 50, f"{backend}: plain INT8 of the planted model loses only {drop:.1f} points"


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_drop_holds_with_at_most_two_layers_in_float(backend, planted, digits, test_split, tmp_path):
    res = quantize(backend, planted["single"], digits, tmp_path, max_drop=BUDGET)
    art, budget = res.artifact, res.metrics["accuracy_budget"]
    assert art.precision == "int8"
    assert budget["met"] is True, budget
    assert budget["validation_images"] >= 500 and budget["max_drop"] == BUDGET and budget["confidence"] == 0.95
    assert budget["drop_plain"] > 50 and budget["int8_top1_plain"] < budget["float_top1"] - 50
    assert budget["drop"] == pytest.approx(budget["float_top1"] - budget["int8_top1"])
    assert budget["drop"] <= budget["drop_bound"] <= BUDGET  # met by the bound, not the point estimate
    assert budget["drop"] == pytest.approx(100 * (budget["lost"] - budget["gained"]) / budget["validation_images"])
    assert 1 <= len(budget["kept_in_float"]) <= 2, budget["kept_in_float"]
    assert budget["tries"], budget
    first = budget["kept_layers"][0]
    assert isinstance(first["latency_cost_ms"], float)  # what keeping it costs, timed
    if backend != "openvino":  # the second conv, named by its ONNX node and its torch module
        assert first["node"] == "/4/Conv" and first["source_module"] == "4"
        assert budget["tries"][-1]["met"] and budget["excluded_nodes"][0] == "/4/Conv"
    else:
        assert first["op_type"] == "Convolution"
    # the validation split decided; the test split (what the report measures) agrees
    x, labels = test_split
    test_drop = fp32_top1(planted["single"], x, labels) - top1(art, x, labels)
    assert test_drop < 3, f"{backend}: budgeted INT8 loses {test_drop:.1f} points on the test split"


def test_openvino_keep_float_loop_meets_the_budget_like_the_onnx_backends(planted, digits, test_split, tmp_path):
    """``accuracy_control: keep_float`` (the default): OpenVINO through the loop the ONNX backends run (ranked by output
    NMSE with a layer's quantizers bypassed, nncf.quantize with the kept layers ignored): the planted
    outlier's layer, the second conv, is ranked first and kept, and the budget holds."""
    res = quantize("openvino", planted["single"], digits, tmp_path, max_drop=BUDGET, accuracy_control="keep_float")
    budget = res.metrics["accuracy_budget"]
    assert budget["met"] is True and budget["method"].startswith("keep-float loop"), budget
    assert budget["drop_plain"] > 50 and budget["drop"] <= budget["drop_bound"] <= BUDGET
    assert budget["ranking"][0]["node"] == budget["kept_in_float"][0]
    assert 1 <= len(budget["kept_in_float"]) <= 2, budget["kept_layers"]
    assert {k["op_type"] for k in budget["kept_layers"]} == {"Convolution"}
    assert budget["tries"][-1]["met"] and budget["tries"][-1]["ignored_scope"] == budget["kept_in_float"]
    assert isinstance(budget["kept_layers"][0]["latency_cost_ms"], float)
    assert not (tmp_path / "openvino" / "plain").exists()  # its tries are not left in the pass's directory
    x, labels = test_split
    assert fp32_top1(planted["single"], x, labels) - top1(res.artifact, x, labels) < 3


def test_openvino_nncf_accuracy_control_meets_the_budget(planted, digits, tmp_path):
    """``accuracy_control: nncf``: NNCF's quantize_with_accuracy_control, judged by the same bound."""
    res = quantize("openvino", planted["single"], digits, tmp_path, max_drop=BUDGET, accuracy_control="nncf",
                   kept_layer_latency=False)
    budget = res.metrics["accuracy_budget"]
    assert budget["met"] is True and budget["method"] == "nncf quantize_with_accuracy_control", budget
    assert budget["drop_plain"] > 50 and budget["drop"] <= budget["drop_bound"] <= BUDGET
    assert budget["kept_in_float"] and {k["op_type"] for k in budget["kept_layers"]} == {"Convolution"}


def test_accuracy_control_is_for_openvino_only():
    with pytest.raises(ConfigError, match="accuracy_control is for backend openvino"):
        get_pass("quantize_ptq")({"backend": "onnxruntime", "max_drop": 1.0, "accuracy_control": "keep_float"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_budget_that_cannot_hold_says_so(backend, planted, digits, tmp_path):
    """Two outliers, one layer allowed in float: no setting meets the budget; the pass returns the
    best model it found, INT8, with met false (the run's exit 1 comes from that flag)."""
    res = quantize(backend, planted["double"], digits, tmp_path, max_drop=1.0, max_kept_layers=1,
                   kept_layer_latency=False)
    budget = res.metrics["accuracy_budget"]
    assert budget["met"] is False, budget
    assert budget["drop"] > 1.0 and budget["int8_top1"] >= budget["int8_top1_plain"]
    assert len(budget["kept_in_float"]) <= 2 and res.artifact.precision == "int8"
    assert res.artifact.path.exists()


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_budget_plain_ptq_meets_keeps_everything_in_int8(backend, model_files, digits, tmp_path):
    source = {"torch": load_model(model_files["pickle"], trust=True), "onnx": load_model(model_files["onnx"])}
    budget = quantize(backend, source, digits, tmp_path, max_drop=5.0).metrics["accuracy_budget"]
    assert budget["met"] is True and budget["kept_in_float"] == [] and budget["tries"] == []
    assert budget["int8_top1"] == budget["int8_top1_plain"]


def test_max_drop_is_validated():
    from compressor.errors import ConfigError

    with pytest.raises(ConfigError):
        get_pass("quantize_ptq")(max_drop=-1)
    with pytest.raises(ConfigError):
        get_pass("quantize_ptq")(max_drop=1, max_kept_layers=0)
    assert get_pass("quantize_ptq")(max_drop=0.3).config.max_drop == 0.3


def test_source_module_names():
    """One naming rule for explain's taps and the accuracy budget's kept layers."""
    from compressor.fidelity.naming import module_name as source_module
    from compressor.fidelity.naming import onnx_layer_name as _onnx_layer_name

    assert source_module("node_conv2d_3", "layer1.0.conv1.weight") == "layer1.0.conv1"  # dynamo exporter
    assert source_module("node_conv2d_1", "4.weight") == "4"
    assert source_module("/layer1/layer1.0/conv1/Conv", "onnx::Conv_28") == "layer1.0.conv1"  # TorchScript
    assert source_module("__module.features.3/aten::_convolution/Convolution") == "features.3"  # OpenVINO
    assert source_module("Multiply_2976") is None
    assert source_module("Conv_7", "features.0.0.weight_quantized") == "features.0.0"  # ORT's quantized weight
    assert _onnx_layer_name("onnx::Conv_28", "Conv_7") == "onnx::Conv_28"  # nothing says more: the weight's name


def test_validation_images_are_not_calibration_or_test_images(digits):
    """What the budget is measured on: training-split images that calibration does not use."""
    val = digits.validation_indices(VALIDATION, calibrated=CALIBRATION)
    cal = digits.calibration_source.balanced_indices(CALIBRATION, digits.config.calibration.seed)
    assert len(val) == VALIDATION and not set(val) & set(cal)
    assert np.bincount(digits.calibration_source.labels[val]).min() >= VALIDATION // 10 - 1


def test_a_budget_validates_on_the_split_data_validation_names(model_files, tmp_path):
    """data.validation.split = the test split: the budget's images are its validation share (never an
    evaluated image), and the report says where they came from."""
    data = open_data(DataConfig(source="digits", calibration={"samples": CALIBRATION},
                                validation={"split": "test", "share": 0.5}))
    source = {"torch": load_model(model_files["pickle"], trust=True), "onnx": load_model(model_files["onnx"])}
    budget = quantize("onnxruntime", source, data, tmp_path, max_drop=5.0, validation_samples=120).metrics[
        "accuracy_budget"]
    assert budget["validation_images"] == 120
    assert "of split 'test'" in budget["validation_split"] and "left out of evaluation" in budget["validation_split"]
    assert not set(data.validation_indices(120)) & set(data.evaluation_indices())
