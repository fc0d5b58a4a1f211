"""Conversion of any form OpenVINO reads (torch module, FX/exported graph, ONNX, IR) into an
``ov.Model``: used by the openvino target and by quantize_ptq's NNCF backend, so it sits below both."""

from __future__ import annotations

from typing import Any

from .artifact import Form, ModelArtifact


def to_openvino_model(artifact: ModelArtifact) -> Any:
    """An ``ov.Model`` with a dynamic batch dimension, from any form OpenVINO can read."""
    import openvino as ov

    if artifact.form is Form.OPENVINO:
        return ov.Core().read_model(str(artifact.path))
    if artifact.form is Form.ONNX:
        model = ov.convert_model(str(artifact.path))
    else:
        import torch

        source = artifact.model
        example = torch.zeros(artifact.input_spec.with_batch(1))
        model = ov.convert_model(source, example_input=example)
    shape = [-1, *artifact.input_spec.sample_shape]
    model.reshape({model.inputs[0]: ov.PartialShape(shape)})
    return model
