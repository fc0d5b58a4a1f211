"""Names and kinds of layers on every graph form, mapped back to the source model's module names,
and the op-type lists that say what a layer is and what belongs to it: one definition each, used
by the taps (:mod:`compressor.fidelity`, the targets' tappers), the accuracy budget and the
TensorRT Q/DQ rules (:mod:`compressor.qdq_rules`).

Names come from what each exporter keeps:

* torch (the reference): the module's name, on the FX graph; on an ATen graph (torch.export) the
  ``nn_module_stack`` a node records (:func:`aten_layer_name`);
* ONNX (ONNX Runtime, the TensorRT QDQ graph): the weight initializer's name (``layer1.0.conv1.weight``
  -> ``layer1.0.conv1``), through any DequantizeLinear, else the TorchScript exporter's scope
  (:func:`module_name`); :class:`OnnxGraph` indexes a graph and finds each layer's tap;
* OpenVINO: the op's friendly name (``__module.layer1.0.conv1/aten::_convolution/...``,
  :data:`OV_MODULE`), else the weight constant's.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np

from .tapper import Quantizer, TapPlan

# ----------------------------------------------------------------------------- torch / ATen

TORCH_FOLLOW_MODULES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ReLU", "ReLU6", "Hardswish", "SiLU",
                         "Sigmoid", "Hardsigmoid", "LeakyReLU", "GELU", "ELU", "Identity", "Mish")
TORCH_FOLLOW_FUNCS = ("relu", "relu_", "relu6", "hardswish", "hardswish_", "silu", "silu_", "sigmoid", "hardsigmoid",
                       "leaky_relu", "gelu", "elu", "batch_norm", "mish", "hardtanh", "hardtanh_")


ATEN_LAYERS = ("conv1d", "conv2d", "conv3d", "convolution", "linear")


def fn_name(target: Any) -> str:
    """``relu`` for torch.relu, F.relu, "relu" (a method) and aten.relu.default alike."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.split(".")[0]


def stack_path(value: Any) -> str:
    """A module path as ``nn_module_stack`` records it, written as named_modules() names it:
    strict export's ``L['self'].features[0]`` / ``getattr(L['self'], '0')`` -> ``features.0``."""
    path = value[0] if isinstance(value, tuple) else str(value)
    if "L['self']" in path or "getattr(" in path:
        parts = [a or b or c for a, b, c in re.findall(r"'([^']+)'|\.([A-Za-z_]\w*)|\[(\d+)\]", path)]
        path = ".".join(p for p in parts if p != "self")
    return path


def node_module_path(node: Any) -> str | None:
    """The innermost module an ATen node came from, or None where the graph did not record it."""
    stack = node.meta.get("nn_module_stack") or {}
    return stack_path(list(stack.values())[-1]) or None if stack else None


def aten_layer_name(node: Any) -> str | None:
    """The module name of an ATen conv / linear node: the module it came from, else the one its
    weight's name tells (``lifted_tensor_self.layer1.0.conv1.weight_fused_bn`` -> ``layer1.0.conv1``,
    as a TorchScript model converted to a torch.export program names it), else None."""
    if node.op != "call_function" or fn_name(node.target) not in ATEN_LAYERS or len(node.args) < 2:
        return None
    path = node_module_path(node)
    if path:
        return path
    weight = node.args[1]
    if getattr(weight, "op", None) != "get_attr":
        return None
    name = re.sub(r"^(lifted_tensor_)?(self\.)?", "", str(weight.target))
    name = re.sub(r"\.weight(_fused_bn)?$", "", name)
    return name or None


# ----------------------------------------------------------------------------- ONNX

ONNX_LAYER_KINDS = {"Conv": "conv", "ConvTranspose": "conv", "Gemm": "linear", "MatMul": "linear"}
"""ONNX ops that are layers (tapped, ranked and kept in float by the budget, checked by the Q/DQ
rules), and their kind (a grouped Conv with one input channel per group is ``depthwise``)"""
ONNX_LAYER_OPS = frozenset(ONNX_LAYER_KINDS)
ONNX_TAP_FOLLOW = {"BatchNormalization", "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Elu",
                   "Gelu", "Mish", "Identity"}
"""ops a layer's tap moves past (its batch norm and activation), with a bias add or scale by a constant"""
TRT_EPILOGUE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Selu", "Tanh", "PRelu",
                "BatchNormalization"}
"""ops TensorRT fuses into the layer before them (no Q/DQ pair may sit between): the activations
its conv + bias + activation fusion takes. Not :data:`ONNX_TAP_FOLLOW`: TensorRT's list (the
developer guide's), kept as it is so that the rules' verdicts do not move"""
ONNX_REQUANTIZED_MOVES = {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice",
                          "Pad", "Resize", "Split", "Gather"}
"""data-movement ops whose output ONNX Runtime quantizes again with its input's scale (taking one
layer's quantizer out takes these out too)"""
ONNX_PASS_THROUGH = frozenset({"MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Relu", "LeakyRelu",
                               "Clip", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Pad",
                               "Resize"})
"""ops between a layer and the one before it whose input precision follows the layer's (the
budget keeps them in float with the layer)"""
ONNX_WEIGHT_PATH = {"DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape", "Cast", "Identity", "Unsqueeze"}
"""ops between a weight initializer and the layer that reads it"""


def _weight_base(name: str) -> str:
    """A weight's name without what exporters and quantizers add (``self.``, ``_quantized``, ...)."""
    name = name.removeprefix("self.")
    for suffix in ("_quantized", "_DequantizeLinear_Output", "_QuantizeLinear_Output"):
        name = name.removesuffix(suffix)
    return name


def weight_layer_name(name: str) -> str:
    """A layer's name from its weight's alone: ``self.layer1.0.conv1.weight_quantized`` -> ``layer1.0.conv1``."""
    return _weight_base(name).removesuffix(".weight")


OV_MODULE = re.compile(r"__module\.([^/]+)/")  # OpenVINO's names of ops converted from torch


def module_name(node: str, weight: str | None = None) -> str | None:
    """The torch module a graph node came from, where its names tell: a weight initializer named
    ``layer1.0.conv1.weight`` (the dynamo exporter; ORT's quantized ``..._quantized``), an OpenVINO
    name ``__module.layer1.0.conv1/aten::...`` (conversion from torch), or the TorchScript exporter's
    scope ``/layer1/layer1.0/conv1/Conv`` (whose weights may be anonymous, ``onnx::Conv_28``, batch
    norm folded in). None when the names say nothing."""
    if weight:
        base = _weight_base(weight)
        if re.fullmatch(r"[\w.]+\.(weight|bias)", base):
            return base.rsplit(".", 1)[0]
    match = OV_MODULE.match(node)
    if match:
        return match.group(1)
    parts = [p for p in node.split("/") if p]
    if node.startswith("/") and len(parts) >= 2:
        path = ""
        for part in parts[:-1]:
            path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
        return path
    return None


def onnx_layer_name(weight: str, node: str) -> str:
    """:func:`module_name`, else the weight's own name."""
    return module_name(node, weight) or weight_layer_name(weight)


def qrange(dtype: Any) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


class OnnxGraph:
    """Where each layer of an ONNX graph is tapped, and how to take one quantizer out."""

    def __init__(self, proto: Any) -> None:
        from onnx import numpy_helper

        g = proto.graph
        self.proto = proto
        self.init = {i.name: i for i in g.initializer}
        self.const = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.taps: dict[str, str] = {}  # layer -> tensor read
        self.dequant: dict[str, tuple[float, int]] = {}  # layer -> (scale, zero point) of an integer tap
        self.quantize_node: dict[str, Any] = {}
        self.plan = TapPlan()
        self.kinds: dict[str, tuple[str, tuple[int, ...]]] = {}
        for n in g.node:
            kind = ONNX_LAYER_KINDS.get(n.op_type)
            if kind is None or len(n.input) < 2:
                continue
            weight = self._weight(n.input[1])
            if weight is None:
                continue
            name = onnx_layer_name(weight, n.name)
            if name in self.taps:
                self.plan.unmapped.append(n.name or n.output[0])
                continue
            dims = tuple(self.init[weight].dims) if weight in self.init else ()
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if kind == "conv" and group > 1 and dims and dims[1] == 1:
                kind = "depthwise"
            self.kinds[name] = (kind, dims)
            tensor = self._walk(n.output[0])
            q = next((c for c in self.consumers[tensor] if c.op_type == "QuantizeLinear"), None)
            if q is not None:
                scale = float(numpy_helper.to_array(self._value(q.input[1])).reshape(-1)[0])
                zp_arr = numpy_helper.to_array(self._value(q.input[2])) if len(q.input) > 2 and q.input[2] else \
                    np.zeros((), np.uint8)
                zp = int(zp_arr.reshape(-1)[0]) if zp_arr.size else 0
                lo, hi = qrange(zp_arr.dtype)
                self.taps[name] = q.output[0]
                self.dequant[name] = (scale, zp)
                self.quantize_node[name] = q
                self.plan.quantizers[name] = Quantizer((lo - zp) * scale, (hi - zp) * scale)
            else:
                self.taps[name] = tensor
            self.plan.layers.append(name)

    def _value(self, name: str) -> Any:
        return self.init[name] if name in self.init else next(a.t for a in self.const[name].attribute if a.name == "value")

    def _weight(self, tensor: str) -> str | None:
        seen = 0
        while tensor not in self.init:
            p = self.producer.get(tensor)
            if p is None or seen > 8:
                return None
            if p.op_type == "Constant":
                return p.output[0]
            if p.op_type not in ONNX_WEIGHT_PATH:
                return None
            tensor, seen = p.input[0], seen + 1
        return tensor

    def _walk(self, tensor: str) -> str:
        while True:
            cons = self.consumers.get(tensor, [])
            if len(cons) != 1:
                return tensor
            c = cons[0]
            if c.op_type in ONNX_TAP_FOLLOW:
                tensor = c.output[0]
            elif c.op_type in ("Add", "Mul", "Sub", "Div") and len(c.input) == 2 and \
                    self._weight(c.input[1 if c.input[0] == tensor else 0]) is not None:
                tensor = c.output[0]
            else:
                return tensor

    def tapped(self) -> Any:
        """A copy of the graph with every tap as an extra output."""
        import onnx
        from onnx import helper

        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        have = {o.name for o in proto.graph.output}
        for name in self.plan.layers:
            tensor = self.taps[name]
            if tensor not in have:
                proto.graph.output.append(helper.make_empty_tensor_value_info(tensor))
                have.add(tensor)
        return proto

    def without_quantizer(self, layer: str) -> Any:
        """A copy of the graph with ``layer``'s activation QuantizeLinear and its DequantizeLinear
        nodes taken out (their consumers read the float tensor), and with them the quantizers that
        only re-quantize the same values after a data-movement op (ONNX Runtime quantizes a MaxPool's
        or a Reshape's output again with the input's scale)."""
        import onnx

        quantizers, todo = [], [self.quantize_node[layer]]
        while todo:
            q = todo.pop()
            quantizers.append(q)
            for dq in (c for c in self.consumers[q.output[0]] if c.op_type == "DequantizeLinear"):
                for c in self.consumers[dq.output[0]]:
                    if c.op_type in ONNX_REQUANTIZED_MOVES:
                        todo += [n for n in self.consumers[c.output[0]] if n.op_type == "QuantizeLinear"]
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        g = proto.graph
        replace: dict[str, str] = {}
        relus = []
        for q in quantizers:
            source = q.input[0]
            if self._clamps_at_zero(q):  # ORT drops a ReLU its uint8 quantizer's range makes redundant: keep it
                source = f"{q.input[0]}__relu_kept"
                relus.append(onnx.helper.make_node("Relu", [q.input[0]], [source], name=f"{q.name}__relu_kept"))
            replace[q.output[0]] = source
            for dq in (n for n in g.node if n.op_type == "DequantizeLinear" and n.input and n.input[0] == q.output[0]):
                replace[dq.output[0]] = source
        for n in g.node:
            for i, name in enumerate(n.input):
                if name in replace and n.op_type != "DequantizeLinear":
                    n.input[i] = replace[name]
        for o in g.output:
            if o.name in replace:
                o.name = replace[o.name]
        keep = []
        for n in g.node:
            if n.output and n.output[0] in replace:
                continue
            keep.append(n)
            keep += [r for r in relus if r.input[0] in n.output]
        keep = [r for r in relus if r.input[0] not in self.producer] + keep  # a graph input
        del g.node[:]
        g.node.extend(keep)
        return proto

    def _clamps_at_zero(self, q: Any) -> bool:
        from onnx import numpy_helper

        if len(q.input) < 3 or not q.input[2]:
            return True  # default zero point 0 of uint8
        zp = numpy_helper.to_array(self._value(q.input[2]))
        return zp.dtype == np.uint8 and int(zp.reshape(-1)[0]) == 0 or \
            (zp.dtype == np.int8 and int(zp.reshape(-1)[0]) == -128)


