"""quantize_ptq on every backend that runs here: NNCF -> OpenVINO IR with FakeQuantize, ONNX Runtime
static QDQ, and NVIDIA ModelOpt's QDQ ONNX for TensorRT (calibrated and run here on ONNX Runtime's
CPU provider). Each output says int8, holds quantize nodes on every conv, agrees with the FP32
model's top-1 on at least 90% of the digits test images, and calibrates on the images asked for."""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from compressor import Form, get_pass
from compressor.data import DataConfig, open_data, preprocess
from compressor.intake import load_model
from compressor.pass_base import PassContext

CALIBRATION = 48  # the data section's data.calibration.samples
AGREEMENT = 0.90

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None and importlib.util.find_spec("modelopt.onnx") is not None
BACKENDS = [
    "openvino",
    "onnxruntime",
    pytest.param("tensorrt", marks=pytest.mark.skipif(
        not HAS_MODELOPT, reason="nvidia-modelopt is not installed (pip install 'compressor[tensorrt]')")),
]


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": CALIBRATION}))


@pytest.fixture(scope="module")
def sources(model_files):
    """The FP32 input each backend takes: a torch module for NNCF, the ONNX file for the others."""
    return {"torch": load_model(model_files["pickle"], trust=True), "onnx": load_model(model_files["onnx"])}


@pytest.fixture(scope="module")
def test_set(sources, digits):
    x, _ = digits.evaluation_set((16, 16), "RGB")
    x = preprocess(x, sources["torch"].preprocessing)
    with torch.inference_mode():
        fp32 = sources["torch"].model(torch.from_numpy(x)).numpy()
    return x, fp32


def source_for(backend, sources):
    return sources["torch"] if backend == "openvino" else sources["onnx"]


def quantize(backend, sources, digits, tmp_path, **config):
    work = tmp_path / f"{backend}-{config.get('samples')}"
    work.mkdir(parents=True)
    p = get_pass("quantize_ptq")({"backend": backend, **config})
    return p(source_for(backend, sources), PassContext(work_dir=work, data=digits, threads=2))


def run_int8(art, x: np.ndarray) -> np.ndarray:
    """The quantized model's logits on its own runtime: OpenVINO's CPU plugin for the IR, ONNX Runtime
    for QDQ ONNX."""
    if art.form is Form.OPENVINO:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(art.path)), "CPU", {"INFERENCE_NUM_THREADS": 2})
        return compiled(x)[0]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def quantized_convs(art) -> tuple[int, int]:
    """(convolutions, those whose data and weights both come through a quantize node)."""
    if art.form is Form.OPENVINO:
        import openvino as ov

        model = ov.Core().read_model(str(art.path))
        convs = [op for op in model.get_ops() if op.get_type_name() == "Convolution"]

        def up(output, through: tuple[str, ...]):
            node = output.get_node()
            while node.get_type_name() in through:
                node = node.input_value(0).get_node()
            return node

        def data_quantized(conv) -> bool:  # a FakeQuantize before it (pooling keeps the grid)
            return up(conv.input_value(0), ("MaxPool", "Reshape")).get_type_name() == "FakeQuantize"

        def weights_int8(conv) -> bool:  # NNCF stores quantized weights as int8 constants, scaled
            const = up(conv.input_value(1), ("Multiply", "Subtract", "Convert"))
            return const.get_type_name() == "Constant" and const.get_element_type().get_type_name() in ("i8", "u8")

        return len(convs), sum(data_quantized(c) and weights_int8(c) for c in convs)
    import onnx

    graph = onnx.load(str(art.path)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return len(convs), sum(producer.get(c.input[0]) == producer.get(c.input[1]) == "DequantizeLinear" for c in convs)


def quantize_ops(art) -> dict[str, int]:
    if art.form is Form.OPENVINO:
        import openvino as ov

        names = [op.get_type_name() for op in ov.Core().read_model(str(art.path)).get_ops()]
        return {"FakeQuantize": names.count("FakeQuantize")}
    import onnx

    names = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    return {"QuantizeLinear": names.count("QuantizeLinear"), "DequantizeLinear": names.count("DequantizeLinear")}


def digest(art) -> str:
    """Hash of the weights and quantization parameters: the ONNX file, or the IR's .bin (the .xml's
    generated layer names carry OpenVINO's process-wide counters, so they differ between two
    conversions in one process)."""
    path = art.path.with_suffix(".bin") if art.form is Form.OPENVINO else art.path
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_with_quantize_nodes_that_agrees_with_fp32(backend, sources, digits, test_set, tmp_path):
    res = quantize(backend, sources, digits, tmp_path)
    art, metrics = res.artifact, res.metrics
    assert art.precision == "int8" and art.meta["precision"] == "int8"
    assert art.form is (Form.OPENVINO if backend == "openvino" else Form.ONNX)
    assert art.input_spec == sources["torch"].input_spec and art.classes == sources["torch"].classes
    assert all(n > 0 for n in quantize_ops(art).values()), quantize_ops(art)
    convs, quantized = quantized_convs(art)
    assert convs == 2 and quantized == 2, (convs, quantized)
    x, fp32 = test_set
    got = run_int8(art, x)
    assert got.shape == fp32.shape and np.isfinite(got).all()
    agreement = float((got.argmax(1) == fp32.argmax(1)).mean())
    assert agreement >= AGREEMENT, f"{backend}: INT8 agrees with FP32 on {agreement:.1%} of {len(x)} images"
    assert metrics["samples"] == CALIBRATION  # the data section's count, when the pass names none
    if backend == "tensorrt":
        assert art.meta["qdq_for"] == "tensorrt"
        assert metrics["tensorrt_qdq_rules"]["ok"], metrics["tensorrt_qdq_rules"]
    # the input artifact is not replaced: it is still FP32
    assert source_for(backend, sources).precision == "fp32"


@pytest.mark.parametrize("backend", BACKENDS)
def test_calibration_sample_count_is_honoured(backend, sources, digits, tmp_path):
    """``samples`` overrides the data section's count, and the images used change the ranges."""
    one = quantize(backend, sources, digits, tmp_path, samples=1)
    few = quantize(backend, sources, digits, tmp_path, samples=16)
    again = quantize(backend, sources, digits, tmp_path / "again", samples=16)
    assert (one.metrics["samples"], few.metrics["samples"]) == (1, 16)
    assert digest(few.artifact) == digest(again.artifact)  # the same images: the same model
    assert digest(one.artifact) != digest(few.artifact)  # other images: other scales


def test_non_openvino_backends_take_onnx_only(sources):
    from compressor import PipelineOrderError

    for backend in ("onnxruntime", "tensorrt"):
        p = get_pass("quantize_ptq")(backend=backend)
        assert p.accepts(Form.ONNX) and not p.accepts(Form.TORCH)
        with pytest.raises(PipelineOrderError, match="put export_onnx before it"):
            p.check_input(Form.TORCH, "passes[0]")


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None, reason="nvidia-modelopt (tensorrt-qdq extra) is not installed")
def test_ort_static_int8_is_the_same_after_the_tensorrt_path_ran_in_the_process(model_files, tmp_path):
    """ModelOpt patches ONNX Runtime's quantizer and deletes Relu (and more) from its QDQ registry in
    place; after a TensorRT QDQ build, ORT's own INT8 of the same model gave other bytes (the Relu after a
    Conv kept a QDQ pair of its own), so a cluster worker and the caller built different engines."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    from compressor.passes._ptq.modelopt_qdq import quantize_for_tensorrt

    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.batches, None)

    def ort_int8(name):
        quantize_static(str(model_files["onnx"]), str(tmp_path / name), Reader(), quant_format=QuantFormat.QDQ)
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    registry = dict(QDQRegistry)
    before = ort_int8("before.onnx")
    quantize_for_tensorrt(model_files["onnx"], tmp_path / "trt.onnx", x, "minmax")
    assert (tmp_path / "trt.onnx").is_file()
    assert dict(QDQRegistry) == registry and "Relu" in QDQRegistry
    assert ort_int8("after.onnx") == before
