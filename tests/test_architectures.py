"""The architectures users bring (issue 23, part 4), at test size: a tiny torchvision VisionTransformer
(32x32 images, 8x8 patches, 2 layers, width 32) through PTQ with ``model_type: transformer`` on every
CPU INT8 backend, each checked against the FP32 model (output SQNR) and in its graph: NNCF's
transformer mode and ONNX Runtime's leave LayerNorm, softmax and the residual adds out of INT8
(and the CNN defaults do not, so the check can fail), SmoothQuant really runs; the TFLite PT2E
quantizer keeps them in float on its own and, with the target's ``model_type: transformer``, the
residual adds too. Bad values of the recipe fields: one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor import Form, get_pass
from compressor.data import DataConfig, open_data, preprocess
from compressor.fidelity.metrics import sqnr_db
from compressor.intake import load_model
from compressor.pass_base import PassContext

from .conftest import cli, one_error_line, write_recipe

SIZE = 32
SQNR_FLOOR_DB = 28.0  # measured: NNCF 36.0, ONNX Runtime 33.4, TFLite 31.9 (CNN defaults: 23.8, 23.8, 24.9)


def tiny_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes it: constant logits
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}))


@pytest.fixture(scope="module")
def vit(tmp_path_factory, digits):
    """The tiny ViT as the intake loads it, its ONNX export, and FP32 logits on 100 test images."""
    d = tmp_path_factory.mktemp("vit")
    model = tiny_vit()
    torch.save(model, d / "vit.pt")
    (d / "vit.json").write_text(json.dumps({"input_shape": [1, 3, SIZE, SIZE],
                                            "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    source = load_model(d / "vit.pt", trust=True)
    work = d / "export"
    work.mkdir()
    onnx = get_pass("export_onnx")()(source, PassContext(work_dir=work, data=digits, threads=2)).artifact
    xml = d / "ir" / "model.xml"  # converted once: NNCF then only calibrates and quantizes
    xml.parent.mkdir()
    import openvino as ov

    from compressor.openvino_convert import to_openvino_model

    ov.save_model(to_openvino_model(source), str(xml), compress_to_fp16=False)
    ir = source.derive(Form.OPENVINO, path=xml, precision="fp32")
    images, _ = digits.evaluation_set((SIZE, SIZE), source.preprocessing)
    x = preprocess(images, source.preprocessing)[:100]
    with torch.inference_mode():
        fp32 = model(torch.from_numpy(x)).numpy()
    return {"torch": source, "onnx": onnx, "ir": ir, "x": x, "fp32": fp32, "dir": d}


def run(art, x: np.ndarray) -> np.ndarray:
    if art.form is Form.OPENVINO:
        import openvino as ov

        return ov.Core().compile_model(str(art.path), "CPU", {"INFERENCE_NUM_THREADS": 2})(x)[0]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


_QUANTIZED: dict[tuple, object] = {}


def quantized(vit, digits, backend: str, **config):
    key = (backend, *sorted(config.items()))
    if key not in _QUANTIZED:
        work = vit["dir"] / "-".join(map(str, key)).replace(" ", "")
        work.mkdir()
        p = get_pass("quantize_ptq")({"backend": backend, **config})
        source = vit["ir"] if backend == "openvino" else vit["onnx"]
        _QUANTIZED[key] = p(source, PassContext(work_dir=work, data=digits, threads=2))
    return _QUANTIZED[key]


@pytest.mark.parametrize("backend,float_ops,layers", [
    ("openvino", ("MVN", "Add"), ("MatMul", "Convolution")),
    ("onnxruntime", ("LayerNormalization", "Softmax", "Mul"), ("MatMul", "Gemm", "Conv")),
])
def test_transformer_mode_keeps_layernorm_and_softmax_float_and_is_closer_to_fp32(vit, digits, backend, float_ops,
                                                                                   layers):
    plain = quantized(vit, digits, backend)
    res = quantized(vit, digits, backend, model_type="transformer")
    assert res.metrics["model_type"] == "transformer"
    kept, default = res.metrics["int8_inputs"], plain.metrics["int8_inputs"]
    for op in float_ops:  # [ops with an INT8 input, ops]
        assert kept[op][0] == 0 < kept[op][1], (op, kept)
    assert default["LayerNormalization" if backend == "onnxruntime" else "MVN"][0] > 0, default  # the CNN default quantizes them
    for op in layers:
        assert kept[op][0] == kept[op][1] > 0, (op, kept)
    db, db_plain = sqnr_db(vit["fp32"], run(res.artifact, vit["x"])), sqnr_db(vit["fp32"], run(plain.artifact, vit["x"]))
    assert db >= SQNR_FLOOR_DB and db > db_plain + 3.0, (db, db_plain)


def test_nncf_transformer_mode_runs_smooth_quant_where_it_helps_and_picks_the_mixed_preset(vit, digits):
    auto = quantized(vit, digits, "openvino", model_type="transformer")
    off = quantized(vit, digits, "openvino", model_type="transformer", smooth_quant="off")
    nncf_default = quantized(vit, digits, "openvino", model_type="transformer", smooth_quant=0.95)
    half = quantized(vit, digits, "openvino", model_type="transformer", smooth_quant=0.5)
    assert off.metrics["smooth_quant_alpha"] is None and half.metrics["smooth_quant_alpha"] == 0.5
    assert auto.metrics["preset"].startswith("mixed")
    # SmoothQuant scales each smoothed MatMul's input: one Multiply more per MatMul it took
    assert nncf_default.metrics["int8_inputs"]["Multiply"][1] > off.metrics["int8_inputs"]["Multiply"][1]
    bins = {a: alpha.artifact.path.with_suffix(".bin").read_bytes() for a, alpha in
            (("0.95", nncf_default), ("0.5", half), ("off", off))}
    assert len(set(bins.values())) == 3
    # auto: both quantized, the one closer to FP32 on calibration images kept, and it is that model
    choice = auto.metrics["smooth_quant_choice"]
    assert set(choice["output_sqnr_db"]) == {"0.95", "off"} and choice["images"] == 32
    best = max(choice["output_sqnr_db"], key=choice["output_sqnr_db"].get)
    assert auto.metrics["smooth_quant_alpha"] == (None if best == "off" else 0.95)
    assert auto.artifact.path.with_suffix(".bin").read_bytes() == bins[best]
    given = quantized(vit, digits, "openvino", model_type="transformer", preset="performance", smooth_quant="off")
    assert given.metrics["preset"] == "performance" and "smooth_quant_choice" not in given.metrics


def test_tflite_int8_transformer_keeps_layernorm_softmax_and_adds_float(vit, digits, tmp_path):
    from compressor.targets.tflite import TFLiteRunner, TFLiteTarget

    engine = TFLiteTarget(quantization="int8", samples=32, model_type="transformer").build(vit["torch"], tmp_path,
                                                                                         data=digits)
    assert engine.info["model_type"] == "transformer"
    dtypes = engine.info["flatbuffer"]["op_dtypes"]
    assert any(k.startswith("FULLY_CONNECTED:INT8") for k in dtypes), dtypes
    assert any(k.startswith("CONV_2D:INT8") for k in dtypes), dtypes
    # LayerNorm (decomposed: RSQRT) and softmax in float by the quantizer's own rules; the residual adds
    # by model_type (the CNN default has 5 ADD:INT8 here, and 24.9 dB)
    assert "SOFTMAX:FLOAT32->FLOAT32" in dtypes and not any(k.startswith("SOFTMAX:INT8") for k in dtypes), dtypes
    assert "RSQRT:FLOAT32->FLOAT32" in dtypes, dtypes
    assert not any(k.startswith("ADD:INT8") for k in dtypes), dtypes
    runner = TFLiteRunner(engine.path, threads=2)
    try:
        out = np.concatenate([runner(vit["x"][i : i + 1]) for i in range(len(vit["x"]))])
    finally:
        runner.close()
    assert sqnr_db(vit["fp32"], out) >= SQNR_FLOOR_DB  # measured 31.9


# ---------------------------------------------------------------------- bad recipe fields

FAST = """
name: fast
data:
  source: digits
  calibration: {samples: 32}
  evaluation: {limit: 60}
passes:
  - export_onnx
  - quantize_ptq: QPTQ
targets:
  - onnxruntime
"""


@pytest.mark.parametrize("config,words", [
    ("{backend: onnxruntime, model_type: vit}", ("model_type", "'cnn' or 'transformer'")),
    ("{backend: onnxruntime, model_type: transformer, smooth_quant: 1.5}", ("smooth_quant", "alpha in 0..1")),
    ("{backend: onnxruntime, model_type: transformer, smooth_quant: on}", ("smooth_quant", "not a switch")),
    ("{backend: onnxruntime, model_type: transformer, smooth_quant: most}", ("smooth_quant takes an alpha in 0..1, auto or off; got 'most'",)),
    ("{backend: onnxruntime, smooth_quant: 0.5}", ("smooth_quant applies with model_type transformer",)),
    ("{backend: tensorrt, model_type: transformer, smooth_quant: 0.5}", ("ModelOpt", "no SmoothQuant")),
])
def test_bad_model_type_and_smooth_quant_are_refused(tmp_path, capsys, config, words):
    recipe = write_recipe(tmp_path / "r.yaml", FAST.replace("QPTQ", config))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert "passes[1].quantize_ptq" in line, line
    for w in words:
        assert w in line, line


def test_tflite_model_type_without_pt2e_int8_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", FAST.replace("  - export_onnx\n  - quantize_ptq: QPTQ\n", "  - fuse\n").replace(
        "  - onnxruntime\n", "  - tflite: {quantization: dynamic_int8, model_type: transformer}\n"))
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert "targets[0].tflite" in line and "model_type transformer applies to quantization int8" in line, line


def test_yaml_off_means_off(tmp_path):
    from compressor.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", FAST.replace(
        "QPTQ", "{backend: onnxruntime, model_type: transformer, smooth_quant: off}"))
    config = load_recipe(recipe)[0].passes[1]
    assert config == {"quantize_ptq": {"backend": "onnxruntime", "model_type": "transformer", "smooth_quant": False}}
    assert get_pass("quantize_ptq")(config["quantize_ptq"]).config.smooth_quant == "off"


def test_onnxruntime_smooth_quant_without_neural_compressor_is_refused_before_the_run(tmp_path, capsys, vit):
    from compressor.passes._ptq import transformer

    if transformer.ort_smooth_quant_missing() is None:
        pytest.skip("neural-compressor 2.x is installed: ONNX Runtime's SmoothQuant can run")
    recipe = write_recipe(tmp_path / "r.yaml", FAST.replace(
        "QPTQ", "{backend: onnxruntime, model_type: transformer, smooth_quant: 0.5}"))
    out = tmp_path / "out"
    line = one_error_line(*cli(capsys, vit["dir"] / "vit.pt", "--recipe", recipe, "--trust-model", "--out", out))
    assert "neural-compressor" in line and "smooth_quant" in line, line
    assert not out.exists()
