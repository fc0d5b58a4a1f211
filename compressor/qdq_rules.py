"""Checks that a QDQ ONNX graph places Q/DQ where TensorRT's explicit quantization wants them.

The rules (TensorRT developer guide, "Q/DQ layer placement recommendations"):

* ``weights_per_channel``: every Conv / ConvTranspose / Gemm / MatMul with constant weights reads
  them through a DequantizeLinear with one scale per output channel.
* ``activations_per_tensor``: every activation Q/DQ pair has a single (scalar) scale.
* ``symmetric_int8``: zero points are 0 and of type int8 (TensorRT supports only symmetric INT8).
* ``both_operands_int8``: a quantized Conv / Gemm / MatMul has both its data input and its
  weights in INT8 (a layer with only one of them quantized runs in floating point). Layers left
  in floating point on purpose (no Q/DQ on either input, e.g. the classifier) are counted as
  ``float_layers``, not flagged.
* ``residual_add_inputs``: both inputs of a residual Add are INT8: each comes from a
  DequantizeLinear, or is the output of a weighted layer that TensorRT fuses the Add into
  (conv + residual add; the guide quantizes the residual branch and leaves the conv output
  unquantized so that the fusion can happen).
* ``no_qdq_before_activation``: no Q/DQ pair sits between a weighted layer and its bias /
  activation / batch norm, where it would block the conv + bias + activation fusion.

:func:`check` returns the violations (empty when the graph follows every rule) and counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .fidelity.naming import ONNX_LAYER_OPS as WEIGHTED
from .fidelity.naming import TRT_EPILOGUE as EPILOGUE

RULES = ("weights_per_channel", "activations_per_tensor", "symmetric_int8", "both_operands_int8",
         "residual_add_inputs", "no_qdq_before_activation")


@dataclass
class Violation:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.node}: {self.detail}"


@dataclass
class QDQReport:
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        by_rule = {r: [str(v) for v in self.violations if v.rule == r][:5] for r in RULES}
        return {"ok": self.ok, "rules": {r: "ok" if not v else v for r, v in by_rule.items()}, **self.counts}


def check(model: Any) -> QDQReport:
    """Check an ``onnx.ModelProto`` (or a path to one) against the placement rules above."""
    import onnx
    from onnx import numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    report = QDQReport()
    bad = report.violations

    def is_constant(name: str) -> bool:
        """A tensor computed from initializers only (e.g. a weight quantized on the fly)."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if t in consts or t in seen or t == "":
                continue
            seen.add(t)
            node = producer.get(t)
            if node is None:  # a graph input
                return False
            stack.extend(node.input)
        return True

    def dq_of(name: str) -> Any:
        node = producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    qdq_nodes = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    weighted = [n for n in graph.node if n.op_type in WEIGHTED]
    report.counts = {"quantize_linear": sum(n.op_type == "QuantizeLinear" for n in qdq_nodes),
                     "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in qdq_nodes),
                     "weighted_layers": len(weighted)}

    for n in qdq_nodes:
        if len(n.input) > 2 and n.input[2]:
            zp = consts.get(n.input[2])
            if zp is not None and (zp.dtype.name != "int8" or (zp != 0).any()):
                bad.append(Violation("symmetric_int8", n.name, f"zero point {zp.dtype.name} {zp.ravel()[:3]}"))
        elif n.op_type == "QuantizeLinear":
            bad.append(Violation("symmetric_int8", n.name, "no zero point: output would be uint8"))
        if n.op_type == "DequantizeLinear" and not is_constant(n.input[0]):
            scale = consts.get(n.input[1])
            if scale is not None and scale.size != 1:
                bad.append(Violation("activations_per_tensor", n.name, f"activation scale has {scale.size} values"))

    float_layers = 0
    for n in weighted:
        data_dq = dq_of(n.input[0])
        w = n.input[1] if len(n.input) > 1 else ""
        w_dq = dq_of(w) if w else None
        if data_dq is None and w_dq is None:
            float_layers += 1
            continue
        if data_dq is None or (w and w_dq is None):
            which = "data input" if data_dq is None else "weight"
            bad.append(Violation("both_operands_int8", n.name, f"{n.op_type} {which} is not INT8"))
        if w_dq is not None and is_constant(w):
            scale = consts.get(w_dq.input[1])
            if scale is None or scale.size <= 1:
                bad.append(Violation("weights_per_channel", n.name, "weight has a per-tensor scale"))
    report.counts["float_layers"] = float_layers

    for n in graph.node:
        if n.op_type == "Add" and len(n.input) == 2 and not any(is_constant(i) for i in n.input):
            for i in n.input:
                src = producer.get(i)
                if dq_of(i) is None and not (src is not None and src.op_type in WEIGHTED
                                             and len(consumers.get(i, [])) == 1):
                    what = src.op_type if src is not None else "graph input"
                    bad.append(Violation("residual_add_inputs", n.name, f"input {i!r} from {what} is not INT8"))
        if n.op_type in EPILOGUE:
            dq = dq_of(n.input[0])
            if dq is not None:
                q = producer.get(dq.input[0])
                src = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
                if src is not None and src.op_type in WEIGHTED:
                    bad.append(Violation("no_qdq_before_activation", n.name,
                                         f"Q/DQ between {src.op_type} {src.name!r} and its {n.op_type}"))
    return report
