"""quantize_ptq backend openvino: NNCF ``nncf.quantize`` on an OpenVINO model (converted from torch
or ONNX), producing an IR with FakeQuantize nodes that the CPU plugin runs as INT8 (VNNI/AMX)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...artifact import Form, ModelArtifact
from ...openvino_convert import to_openvino_model
from ...pass_base import PassResult
from .._nncf import nncf_quantize_arguments

if TYPE_CHECKING:
    from ..quantize_ptq import QuantizePTQConfig


def quantize(artifact: ModelArtifact, x: np.ndarray, config: QuantizePTQConfig, work_dir: Path,
             step: str) -> PassResult:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    model = to_openvino_model(artifact)
    estimators = {
        "minmax": RangeEstimatorParametersSet.MINMAX,
        "mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX,
        "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE,
        "histogram": RangeEstimatorParametersSet.HISTOGRAM,
    }
    dataset = nncf.Dataset([x[i : i + 1] for i in range(len(x))])
    ignored = nncf.IgnoredScope(names=config.ignored_nodes, validate=True) if config.ignored_nodes else None
    quantized = nncf.quantize(
        model,
        dataset,
        ignored_scope=ignored,
        **nncf_quantize_arguments(
            config,
            len(x),
            activations_range_estimator_params=estimators[config.calibration],
            weights_quantization_params=None if config.per_channel else QuantizationParameters(per_channel=False),
        ),
    )
    path = work_dir / "model.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    metrics = {"backend": "nncf/openvino", "calibration": config.calibration, "samples": len(x),
               "fake_quantize_nodes": fq}
    return PassResult(artifact.derive(Form.OPENVINO, path=path, precision="int8"), metrics)
