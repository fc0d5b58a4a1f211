"""quantize_ptq backend onnxruntime: ONNX Runtime ``quantize_static`` into a QDQ ONNX graph
(per-channel signed weights; unsigned activations by default, which x86 VNNI kernels handle fastest)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...artifact import Form, ModelArtifact
from ...environment import has_int8_dot_product, widest_int8_isa
from ...pass_base import PassResult

if TYPE_CHECKING:
    from ..quantize_ptq import QuantizePTQConfig


def quantize(artifact: ModelArtifact, x: np.ndarray, config: QuantizePTQConfig, work_dir: Path,
             step: str) -> PassResult:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    assert artifact.path is not None
    pre = work_dir / "preprocessed.onnx"
    quant_pre_process(str(artifact.path), str(pre), skip_symbolic_shape=False)
    input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name

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
    path = work_dir / "model.onnx"
    reduce_range = config.reduce_range if config.reduce_range != "auto" else not has_int8_dot_product()
    quantize_static(
        str(pre),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=config.per_channel,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=methods[config.calibration],
        nodes_to_exclude=config.ignored_nodes or None,
        extra_options={"CalibPercentile": config.percentile, "WeightSymmetric": True,
                       "ActivationSymmetric": config.activation_type == "int8"},
    )
    pre.unlink(missing_ok=True)
    proto = onnx.load(str(path))
    q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)

    metrics = {"backend": "onnxruntime", "calibration": config.calibration, "samples": len(x),
               "activation_type": config.activation_type, "reduce_range": reduce_range, "cpu_isa": widest_int8_isa(),
               "quantize_nodes": q, "dequantize_nodes": dq}
    return PassResult(artifact.derive(Form.ONNX, path=path, precision="int8"), metrics)
