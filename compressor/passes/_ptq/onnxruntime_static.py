"""quantize_ptq backend onnxruntime: ONNX Runtime ``quantize_static`` into a QDQ ONNX graph
(per-channel signed weights; unsigned activations by default, which x86 VNNI kernels handle fastest).
Under an accuracy budget, the most sensitive layers go into ``nodes_to_exclude`` (see
:mod:`.accuracy_budget`).

``calibration: entropy`` searches each activation's histogram for the clipping threshold of least
KL divergence. ``quantize_static`` gives ORT's entropy calibrator its defaults, 128 histogram bins
and 128 quantized bins, which leave a single candidate threshold, the whole range: the engine was
byte for byte the minmax one. So the ranges are calibrated here with :data:`ENTROPY_BINS` and
:data:`ENTROPY_QUANTIZED_BINS` (ORT's ``create_calibrator``, the calibrator quantize_static itself
uses) and handed to ``quantize_static`` as its calibration cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...artifact import Form, ModelArtifact
from ...hooks import library_output
from ...pass_base import PassResult
from . import accuracy_budget, transformer
from .accuracy_budget import Budget

if TYPE_CHECKING:
    from ..quantize_ptq.config import QuantizePTQConfig

ENTROPY_BINS = 2048
"""histogram bins over [-max|x|, max|x|] per activation (TensorRT's entropy calibration uses 2048 too)"""
ENTROPY_QUANTIZED_BINS = 256
"""the 8-bit levels the KL search compares each clipped histogram with; candidate thresholds run from
this many bins about zero to the whole histogram, so 1 + (ENTROPY_BINS - ENTROPY_QUANTIZED_BINS) / 2"""


def quantize(artifact: ModelArtifact, x: np.ndarray, config: QuantizePTQConfig, work_dir: Path,
             step: str, budget: Budget | None = None) -> PassResult:
    """Plain static quantization; with ``budget``, the layers the search picks stay in float
    (ONNX Runtime's ``nodes_to_exclude``, see :mod:`.accuracy_budget`)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    assert artifact.path is not None
    pre = work_dir / "preprocessed.onnx"
    quant_pre_process(str(artifact.path), str(pre), skip_symbolic_shape=False)
    assert config.reduce_range != "auto", "quantize_ptq resolves reduce_range for the device before this"
    reduce_range = bool(config.reduce_range)
    path = work_dir / "model.onnx"
    extra: dict[str, Any] = {}
    try:
        if budget is None:
            _quantize_static(pre, path, x, config, reduce_range, [])
        else:
            plain = work_dir / "try-0.onnx"
            _quantize_static(pre, plain, x, config, reduce_range, [])
            path, extra["accuracy_budget"] = accuracy_budget.search_onnx(
                pre, plain, budget, lambda exclude, dst: _quantize_static(pre, dst, x, config, reduce_range, exclude),
                work_dir, producer_outputs_quantized=True, method="onnxruntime quantize_static nodes_to_exclude")
    finally:  # the entropy ranges hold for these images only (a calibration sweep calls again with others)
        pre.unlink(missing_ok=True)
        _ranges_cache(pre).unlink(missing_ok=True)
    proto = onnx.load(str(path))
    q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)

    metrics = {"backend": "onnxruntime", "calibration": config.calibration, "samples": len(x),
               "activation_type": config.activation_type, "reduce_range": reduce_range,
               "quantize_nodes": q, "dequantize_nodes": dq,
               **transformer.record(config, int8_inputs=transformer.onnx_int8_inputs(proto)), **extra}
    if config.calibration == "entropy":
        metrics["entropy_bins"] = {"histogram": ENTROPY_BINS, "quantized": ENTROPY_QUANTIZED_BINS}
    return PassResult(artifact.derive(Form.ONNX, path=path, precision="int8"), metrics)


def _quantize_static(src: Path, dst: Path, x: np.ndarray, config: QuantizePTQConfig, reduce_range: bool,
                     exclude: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(len(x)))

        def get_next(self) -> dict[str, Any] | None:
            i = next(self._it, None)
            return None if i is None else {input_name: x[i : i + 1]}

        def rewind(self) -> None:
            self._it = iter(range(len(x)))

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    cache = None
    with library_output("ONNX Runtime"):  # its calibrators print(): only with -v
        if config.calibration == "entropy":  # quantize_static cannot set the bins: calibrate here, hand it the ranges
            cache = _ranges_cache(src)
            if not cache.is_file():  # the same for every try of an accuracy budget: excluded nodes change no range
                _entropy_ranges(src, Reader(), cache)
        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[config.calibration],
            nodes_to_exclude=[*config.ignored_nodes, *exclude] or None,
            op_types_to_quantize=transformer.ort_op_types(config),
            extra_options={"CalibPercentile": config.percentile, "WeightSymmetric": True,
                           "ActivationSymmetric": config.activation_type == "int8",
                           **transformer.ort_extra_options(config)},
            calibration_cache_path=str(cache) if cache is not None else None,
        )


def _ranges_cache(src: Path) -> Path:
    return src.with_name(f"{src.stem}.entropy-ranges.json")


def _entropy_ranges(src: Path, reader: Any, dst: Path) -> None:
    """Calibrate the activations of ``src`` as quantize_static does (the same calibrator, the same
    tensors), with the histogram set by ENTROPY_BINS / ENTROPY_QUANTIZED_BINS; write the ranges
    as ORT's calibration cache ``dst``."""
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(prefix="ort.quant.", dir=dst.parent) as tmp:
        calibrator = create_calibrator(
            src, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
            augmented_model_path=str(Path(tmp) / "augmented_model.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
        )
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, dst)
