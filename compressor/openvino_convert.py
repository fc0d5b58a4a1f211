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
        from .ov_core import core

        return core().read_model(str(artifact.path))
    if artifact.form is Form.ONNX:
        model = ov.convert_model(str(artifact.path))
    else:
        import torch

        source = artifact.model
        example = torch.zeros(artifact.input_spec.with_batch(1))
        try:
            model = ov.convert_model(source, example_input=example)
        except Exception as exc:
            if not isinstance(source, torch.nn.Module) or isinstance(source, torch.jit.ScriptModule) \
                    or "by tracing" not in str(exc):
                raise
            model = ov.convert_model(_traced(source, example), example_input=example)
    shape = [-1, *artifact.input_spec.sample_shape]
    model.reshape({model.inputs[0]: ov.PartialShape(shape)})
    return model


def _traced(module: Any, example: Any) -> Any:
    """``module`` traced without the tracer's sanity check. OpenVINO traces a module itself and gives
    up where the check finds the graph of a second trace different: torchvision's VisionTransformer
    differs only in the names the tracer gives its values (``%w.1`` and ``%w``), so the trace is
    good; the layer scopes (``__module.encoder.layers...``) are the same as OpenVINO's own. (Swin
    converts without this.)"""
    import torch

    with torch.no_grad():
        return torch.jit.trace(module, example, check_trace=False)


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
