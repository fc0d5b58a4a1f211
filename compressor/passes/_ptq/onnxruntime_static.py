"""quantize_ptq backend onnxruntime: ONNX Runtime ``quantize_static`` into a QDQ ONNX graph
(per-channel signed weights; unsigned activations by default, which x86 VNNI kernels handle fastest).
Under an accuracy budget, the most sensitive layers go into ``nodes_to_exclude`` (see
:mod:`.accuracy_budget`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...artifact import Form, ModelArtifact
from ...pass_base import PassResult
from . import accuracy_budget
from .accuracy_budget import Budget

if TYPE_CHECKING:
    from ..quantize_ptq import QuantizePTQConfig


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
    if budget is None:
        _quantize_static(pre, path, x, config, reduce_range, [])
    else:
        plain = work_dir / "try-0.onnx"
        _quantize_static(pre, plain, x, config, reduce_range, [])
        path, extra["accuracy_budget"] = accuracy_budget.search_onnx(
            pre, plain, budget, lambda exclude, dst: _quantize_static(pre, dst, x, config, reduce_range, exclude),
            work_dir, producer_outputs_quantized=True, method="onnxruntime quantize_static nodes_to_exclude")
    pre.unlink(missing_ok=True)
    proto = onnx.load(str(path))
    q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)

    metrics = {"backend": "onnxruntime", "calibration": config.calibration, "samples": len(x),
               "activation_type": config.activation_type, "reduce_range": reduce_range,
               "quantize_nodes": q, "dequantize_nodes": dq, **extra}
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
        extra_options={"CalibPercentile": config.percentile, "WeightSymmetric": True,
                       "ActivationSymmetric": config.activation_type == "int8"},
    )
