"""The CPU targets, openvino and onnxruntime: available here, build an engine from an FP32 and an INT8
artifact, run batches of any size, give the source's logits (FP32) or its top-1 (INT8), and report
what the runtime really used: threads, the instruction set, and per layer the precision (OpenVINO)
or the kernels (ONNX Runtime, whose QLinearConv is the INT8 convolution)."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
import torch

from compressor import Form, Pipeline, get_pass, get_target
from compressor.data import DataConfig, open_data, preprocess
from compressor.evaluate import EvaluationConfig
from compressor.intake import load_model
from compressor.pass_base import PassContext

THREADS = 2
FAST_EVAL = EvaluationConfig(batch_size=64, warmup=1, latency_runs=10, latency_min_seconds=0, latency_rounds=2,
                             throughput_batch=4, throughput_seconds=0.05, threads=THREADS)


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}, evaluation={"limit": 200}))


@pytest.fixture(scope="module")
def fp32(model_files):
    return {Form.TORCH: load_model(model_files["pickle"], trust=True), Form.ONNX: load_model(model_files["onnx"])}


@pytest.fixture(scope="module")
def images(fp32, digits):
    x, _ = digits.evaluation_set((16, 16), "RGB")
    x = preprocess(x, fp32[Form.TORCH].preprocessing)
    with torch.inference_mode():
        want = fp32[Form.TORCH].model(torch.from_numpy(x)).numpy()
    return x, want


@pytest.fixture(scope="module")
def int8(fp32, digits, tmp_path_factory):
    """INT8 artifacts as each target gets them: NNCF's IR for openvino, ORT's QDQ ONNX for onnxruntime."""
    out = {}
    for target, backend, source in (("openvino", "openvino", Form.TORCH), ("onnxruntime", "onnxruntime", Form.ONNX)):
        work = tmp_path_factory.mktemp(f"int8-{backend}")
        out[target] = get_pass("quantize_ptq")(backend=backend)(
            fp32[source], PassContext(work_dir=work, data=digits, threads=THREADS)).artifact
    return out


def build_and_run(name, art, tmp_path, x):
    target = get_target(name)()
    engine = target.build(art, tmp_path / "engines")
    runner = target.load(engine, threads=THREADS)
    try:
        outs = {batch: np.concatenate([runner(x[i : i + batch]) for i in range(0, len(x), batch)]) for batch in (1, 7)}
        info = runner.runtime_info()
    finally:
        runner.close()
    assert np.array_equal(outs[1].argmax(1), outs[7].argmax(1))
    np.testing.assert_allclose(outs[1], outs[7], rtol=1e-4, atol=1e-4)  # the batch size does not change results
    return engine, outs[7], info


def assert_common(engine, info, name, precision, tmp_path):
    assert engine.target == name and engine.precision == precision and engine.built
    assert engine.name == f"{name}-{precision}" and engine.path.parent == tmp_path / "engines" / engine.name
    assert all(f.is_file() for f in engine.files) and engine.size_bytes > 0
    meta = json.loads((engine.path.parent / "engine.json").read_text())
    assert meta["target"] == name and meta["precision"] == precision
    assert info["threads"] == THREADS
    assert isinstance(info["isa"], str) and info["isa"]
    assert info["runtime"].startswith(name)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the ISA names checked are x86's")
@pytest.mark.parametrize("name, precision", [
    ("openvino", "fp32"), ("openvino", "int8"),
    ("onnxruntime", "fp32"), ("onnxruntime", "int8")])
def test_runtime_info_names_the_isa(name, precision, fp32, int8, images, tmp_path):
    """Every engine's row names the instruction set the runtime used (avx2, avx512_core, amx, ...)."""
    art = int8[name] if precision == "int8" else fp32[Form.ONNX]
    _, _, info = build_and_run(name, art, tmp_path, images[0][:8])
    assert info["isa"] != "unknown", info


def test_openvino_inference_precision_is_a_plain_name(fp32, images, tmp_path):
    _, _, info = build_and_run("openvino", fp32[Form.ONNX], tmp_path, images[0][:8])
    assert info["inference_precision"] in ("f32", "float32"), info["inference_precision"]


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_available_here(name):
    avail = get_target(name).availability()
    assert avail.ok, avail.reason
    assert avail.reason  # says which runtime it found


@pytest.mark.parametrize("name, form", [("openvino", Form.TORCH), ("openvino", Form.ONNX), ("onnxruntime", Form.ONNX)])
def test_fp32_engine_gives_the_source_logits(name, form, fp32, images, tmp_path):
    x, want = images
    engine, got, info = build_and_run(name, fp32[form], tmp_path, x)
    assert_common(engine, info, name, "fp32", tmp_path)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert (got.argmax(1) == want.argmax(1)).all()
    if name == "openvino":
        assert "f32" in info["inference_precision"] or "float32" in info["inference_precision"], info
        assert info["layer_precisions"] and all(k.endswith("f32") for k in info["layer_precisions"]), info
    else:
        assert info["providers"][0] == "CPUExecutionProvider"
        assert not any(k.startswith("QLinear") or "Integer" in k for k in info["kernels"]), info["kernels"]


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_int8_engine_runs_int8_kernels_and_agrees(name, int8, images, tmp_path):
    x, want = images
    engine, got, info = build_and_run(name, int8[name], tmp_path, x)
    assert_common(engine, info, name, "int8", tmp_path)
    assert np.isfinite(got).all()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    if name == "openvino":
        convs = {k: n for k, n in info["layer_precisions"].items() if k.startswith("Convolution:")}
        assert convs and all(k.endswith(("u8", "i8")) for k in convs), info["layer_precisions"]
    else:  # ORT fuses each DequantizeLinear -> Conv -> QuantizeLinear into an integer convolution
        assert info["kernels"].get("QLinearConv", 0) == 2 and "Conv" not in info["kernels"], info["kernels"]


def test_openvino_compress_to_fp16_halves_the_weights(fp32, images, tmp_path):
    x, want = images
    full = get_target("openvino")().build(fp32[Form.TORCH], tmp_path / "a")
    half_target = get_target("openvino")(compress_to_fp16=True)
    half = half_target.build(fp32[Form.TORCH], tmp_path / "b")
    bins = [next(f for f in e.files if f.suffix == ".bin").stat().st_size for e in (full, half)]
    assert bins[1] < 0.6 * bins[0], bins
    runner = half_target.load(half, threads=THREADS)
    np.testing.assert_allclose(runner(x), want, rtol=1e-2, atol=1e-2)  # FP16 weights, FP32 arithmetic
    runner.close()


def test_a_torch_model_on_both_targets_side_by_side(fp32, digits, tmp_path):
    """Through the pass manager, an FP32 torch model gets both CPU engines; each row agrees fully
    with the source and ran on the threads asked for."""
    pipe = Pipeline([], [get_target("openvino")(), get_target("onnxruntime")()])
    result = pipe.run(fp32[Form.TORCH], data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    rows = {m.name: m for m in result.measurements}
    assert set(rows) == {"source", "openvino-fp32", "onnxruntime-fp32"}, list(rows)
    assert not result.failures
    for name in ("openvino-fp32", "onnxruntime-fp32"):
        m = rows[name]
        assert m.agreement == 100.0 and m.top1 == rows["source"].top1
        assert m.threads == THREADS and m.runtime["threads"] == THREADS
        assert m.latency_ms["p50"] > 0 and m.throughput_ips > 0
