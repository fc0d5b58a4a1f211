"""Conversion of any form OpenVINO reads (torch module, FX/exported graph, ONNX, IR) into an
``ov.Model``: used by the openvino target and by quantize_ptq's NNCF backend, so it sits below both."""

from __future__ import annotations

import re
from typing import Any

from .artifact import Form, ModelArtifact

_AUTO_NAME = re.compile(r"(?<![\w.])([A-Z][A-Za-z]*)_(\d+)(?![\w.])")


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


def canonical_names(model: Any) -> Any:
    """Rename the nodes OpenVINO and NNCF named from process-wide counters (``Constant_26084``,
    ``Multiply_2966/fq_weights_1``) by their order in the graph instead, so that an IR is the same
    bytes whatever ran before in the process (an engine for a device is the same on any build
    machine). Names taken from the source (``__module.layer1.0.conv1/...``, ONNX node names) stay."""
    model.set_friendly_name("model")
    numbers: dict[str, str] = {}

    def renumber(m: re.Match[str]) -> str:
        key = f"{m.group(1)}_{m.group(2)}"
        if key not in numbers:
            numbers[key] = f"{m.group(1)}_c{len(numbers)}"
        return numbers[key]

    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if name.startswith("__module.") or "/" in name and not _AUTO_NAME.match(name):
            continue
        new = _AUTO_NAME.sub(renumber, name)
        if new != name:
            op.set_friendly_name(new)
    return model
