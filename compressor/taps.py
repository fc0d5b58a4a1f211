"""Per-layer taps: the output of every conv / linear layer (after the activation its backend fuses
into it, and as the next layer consumes it: the dequantized value where a quantizer follows) read
from each runtime its own way, and named by the source model's module names.

One rule decides where a layer's tap sits, on every graph: start at the conv / linear op, follow
the single consumer while it is a batch norm, a bias add or an activation, then take the
quantizer that follows, if any. Names come from what each exporter keeps:

* torch (the reference): the module's name, on the FX graph (an interpreter records the tap nodes);
* ONNX (ONNX Runtime, the TensorRT QDQ graph): the weight initializer's name (``layer1.0.conv1.weight``
  -> ``layer1.0.conv1``), through any DequantizeLinear; extra graph outputs on the tapped tensors
  (the QuantizeLinear output, an integer tensor, so ORT's QDQ fusion is not disturbed);
* OpenVINO: the op's friendly name (``__module.layer1.0.conv1/aten::_convolution/...``), else the
  weight constant's; extra model outputs (``Model.add_outputs``);
* LiteRT: tensor names keep only the leaf module name, so layers are matched in graph order by
  kind, weight shape and that leaf name; the interpreter runs with its tensors preserved and
  without the XNNPACK delegate (a delegate keeps no intermediate tensors).

A layer of the engine that cannot be named is reported as unmapped, never dropped."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import eval_mode
from .fidelity.tapper import LayerInfo, Quantizer, TapPlan, Tapper


# ----------------------------------------------------------------------------- torch (reference)

_TORCH_FOLLOW_MODULES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ReLU", "ReLU6", "Hardswish", "SiLU",
                         "Sigmoid", "Hardsigmoid", "LeakyReLU", "GELU", "ELU", "Identity", "Mish")
_TORCH_FOLLOW_FUNCS = ("relu", "relu_", "relu6", "hardswish", "hardswish_", "silu", "silu_", "sigmoid", "hardsigmoid",
                       "leaky_relu", "gelu", "elu", "batch_norm", "mish", "hardtanh", "hardtanh_")


_ATEN_LAYERS = ("conv1d", "conv2d", "conv3d", "convolution", "linear")


def _fn_name(target: Any) -> str:
    """``relu`` for torch.relu, F.relu, "relu" (a method) and aten.relu.default alike."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.split(".")[0]


def _get_attr(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    if node.op != "call_function" or _fn_name(node.target) not in _ATEN_LAYERS or len(node.args) < 2:
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


def _leaf_kind(mod: Any) -> tuple[str, tuple[int, ...]] | None:
    from torch import nn

    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        return ("depthwise" if depthwise else "conv"), tuple(mod.weight.shape)
    if isinstance(mod, nn.Linear):
        return "linear", tuple(mod.weight.shape)
    return None


class TorchTapper(Tapper):
    """Taps an ``nn.Module`` through its FX graph; without one (not traceable), forward hooks on
    the conv / linear modules themselves (no activation), said in ``plan.note``."""

    def __init__(self, module: Any, *, threads: int | None = None) -> None:
        import torch
        import torch.fx

        self.torch = torch
        self.threads = threads
        self.module = eval_mode(module)
        self.layers: list[LayerInfo] = []
        self.plan = TapPlan()
        try:
            gm = module if isinstance(module, torch.fx.GraphModule) else torch.fx.symbolic_trace(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: fall back to hooks
            gm = None
            self.plan.note = f"not traceable by torch.fx ({type(exc).__name__}); taps are the layers' own outputs"
        self.gm = gm
        self.tap_nodes: dict[Any, str] = {}
        modules = dict(module.named_modules()) if gm is None else dict(gm.named_modules())
        if gm is not None:
            for node in gm.graph.nodes:
                if node.op != "call_module":
                    continue
                kind = _leaf_kind(modules[node.target])
                if kind is None:
                    continue
                end = node
                covered = [node.target]
                while len(end.users) == 1:
                    user = next(iter(end.users))
                    if not self._follows(user, modules):
                        break
                    end = user
                    if user.op == "call_module":
                        covered.append(user.target)
                self.tap_nodes[end] = node.target
                self.layers.append(LayerInfo(node.target, *kind, modules=tuple(covered)))
            if not self.layers:  # an ATen graph (torch.export, or fuse of one): layers are call_function nodes
                self._aten_layers(gm)
        else:
            for name, mod in modules.items():
                kind = _leaf_kind(mod)
                if kind is not None:
                    self.layers.append(LayerInfo(name, *kind))
        self.plan.layers = [layer.name for layer in self.layers]

    def _aten_layers(self, gm: Any) -> None:
        """Layers of a graph whose convolutions and linears are ATen calls (``aten.conv2d``,
        ``aten.linear``, ...), named by the module they came from (``nn_module_stack``, which
        torch.export keeps, and which fuse and a re-export keep too); unnamed ones are skipped."""
        for node in gm.graph.nodes:
            name = aten_layer_name(node)
            if name is None or name in self.plan.layers or getattr(node.args[1], "op", None) != "get_attr":
                continue
            weight = node.args[1]
            shape = tuple(_get_attr(gm, weight.target).shape)
            if _fn_name(node.target) == "linear":
                kind = "linear"
            else:
                groups = node.args[-1] if _fn_name(node.target) == "convolution" else (
                    node.args[6] if len(node.args) > 6 else 1)
                kind = "depthwise" if isinstance(groups, int) and groups > 1 and shape[1] == 1 and shape[0] == groups \
                    else "conv"
            end, covered = node, [name]
            while len(end.users) == 1:
                user = next(iter(end.users))
                if not self._follows(user, {}):
                    break
                end = user
                path = node_module_path(user)
                if path and path not in covered:
                    covered.append(path)
            self.tap_nodes[end] = name
            self.layers.append(LayerInfo(name, kind, shape, modules=tuple(covered)))
            self.plan.layers.append(name)

    @staticmethod
    def _follows(node: Any, modules: dict[str, Any]) -> bool:
        if node.op == "call_module":
            return type(modules[node.target]).__name__ in _TORCH_FOLLOW_MODULES
        if node.op in ("call_function", "call_method"):
            return _fn_name(node.target) in _TORCH_FOLLOW_FUNCS
        return False

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        if self.threads:
            torch.set_num_threads(self.threads)
        got: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            if self.gm is not None:
                taps = self.tap_nodes

                parts: dict[str, list[np.ndarray]] = defaultdict(list)

                class Recorder(torch.fx.Interpreter):
                    def run_node(self, n: Any) -> Any:
                        out = super().run_node(n)
                        if n in taps:
                            parts[taps[n]].append(out.detach().float().numpy().copy())
                        return out

                # a torch.export program's module guards its exported (static) batch: one sample at a time
                guarded = any(n.op == "call_module" and n.target == "_guards_fn" for n in self.gm.graph.nodes)
                step = 1 if guarded else max(1, len(x))
                for i in range(0, len(x), step):
                    Recorder(self.gm).run(torch.from_numpy(x[i : i + step]))
                got.update((name, np.concatenate(p)) for name, p in parts.items())
            else:
                handles = []
                for name, mod in self.module.named_modules():
                    if _leaf_kind(mod) is not None:
                        handles.append(mod.register_forward_hook(
                            lambda _m, _i, out, name=name: got.__setitem__(name, out.detach().float().numpy().copy())))
                try:
                    self.module(torch.from_numpy(x))
                finally:
                    for h in handles:
                        h.remove()
        return got


# ----------------------------------------------------------------------------- ONNX

_ONNX_LAYERS = {"Conv": "conv", "ConvTranspose": "conv", "Gemm": "linear", "MatMul": "linear"}
_ONNX_FOLLOW = {"BatchNormalization", "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Elu",
                "Gelu", "Mish", "Identity"}
_ONNX_MOVES = {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Pad",
               "Resize", "Split", "Gather"}
_ONNX_WEIGHT_PATH = {"DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape", "Cast", "Identity", "Unsqueeze"}


def _weight_layer_name(name: str) -> str:
    for suffix in ("_quantized", "_DequantizeLinear_Output", "_QuantizeLinear_Output"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.startswith("self."):
        name = name[5:]
    return name[: -len(".weight")] if name.endswith(".weight") else name


_MODULE = re.compile(r"__module\.([^/]+)/")  # OpenVINO's names of ops converted from torch


def module_name(node: str, weight: str | None = None) -> str | None:
    """The torch module a graph node came from, where its names tell: a weight initializer named
    ``layer1.0.conv1.weight`` (the dynamo exporter; ORT's quantized ``..._quantized``), an OpenVINO
    name ``__module.layer1.0.conv1/aten::...`` (conversion from torch), or the TorchScript exporter's
    scope ``/layer1/layer1.0/conv1/Conv`` (whose weights may be anonymous, ``onnx::Conv_28``, batch
    norm folded in). None when the names say nothing."""
    if weight:
        base = weight.removeprefix("self.")
        for suffix in ("_quantized", "_DequantizeLinear_Output", "_QuantizeLinear_Output"):
            base = base.removesuffix(suffix)
        if re.fullmatch(r"[\w.]+\.(weight|bias)", base):
            return base.rsplit(".", 1)[0]
    match = _MODULE.match(node)
    if match:
        return match.group(1)
    parts = [p for p in node.split("/") if p]
    if node.startswith("/") and len(parts) >= 2:
        path = ""
        for part in parts[:-1]:
            path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
        return path
    return None


def _onnx_layer_name(weight: str, node: str) -> str:
    """:func:`module_name`, else the weight's own name."""
    return module_name(node, weight) or _weight_layer_name(weight)


def _qrange(dtype: Any) -> tuple[int, int]:
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
            kind = _ONNX_LAYERS.get(n.op_type)
            if kind is None or len(n.input) < 2:
                continue
            weight = self._weight(n.input[1])
            if weight is None:
                continue
            name = _onnx_layer_name(weight, n.name)
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
                lo, hi = _qrange(zp_arr.dtype)
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
            if p.op_type not in _ONNX_WEIGHT_PATH:
                return None
            tensor, seen = p.input[0], seen + 1
        return tensor

    def _walk(self, tensor: str) -> str:
        while True:
            cons = self.consumers.get(tensor, [])
            if len(cons) != 1:
                return tensor
            c = cons[0]
            if c.op_type in _ONNX_FOLLOW:
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
                    if c.op_type in _ONNX_MOVES:
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


def _ort_session(proto: Any, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class OnnxTapper(Tapper):
    can_bypass = True

    def __init__(self, path: Path, *, threads: int) -> None:
        import onnx

        self.threads = threads
        self.graph = OnnxGraph(onnx.load(str(path)))
        self.plan = self.graph.plan
        self.session = _ort_session(self.graph.tapped(), threads)
        self.input = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed = batch if isinstance(batch, int) and batch > 0 else None
        self.names = [o.name for o in self.session.get_outputs()]

    def _run(self, session: Any, x: np.ndarray) -> list[list[np.ndarray]]:
        step = self.fixed or len(x)
        return [session.run(None, {self.input: x[i : i + step]}) for i in range(0, len(x), step)]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        parts = self._run(self.session, x)
        index = {n: i for i, n in enumerate(self.names)}
        got = {}
        for layer in self.plan.layers:
            arr = np.concatenate([p[index[self.graph.taps[layer]]] for p in parts])
            if layer in self.graph.dequant:
                scale, zp = self.graph.dequant[layer]
                arr = (arr.astype(np.float32) - zp) * scale
            got[layer] = arr.astype(np.float32, copy=False)
        return got

    def bypassed(self, layer: str) -> Any:
        session = _ort_session(self.graph.without_quantizer(layer), self.threads)
        return lambda x: np.concatenate([p[0] for p in self._run(session, x)])


# ----------------------------------------------------------------------------- OpenVINO

_OV_LAYERS = {"Convolution": "conv", "GroupConvolution": "depthwise", "ConvolutionBackpropData": "conv",
              "MatMul": "linear"}
_OV_FOLLOW = {"Relu", "Clamp", "HSwish", "Swish", "Sigmoid", "HSigmoid", "Gelu", "Elu", "Mish", "PRelu",
              "BatchNormInference"}
_OV_CONST_PATH = {"Constant", "Convert", "Multiply", "Subtract", "Reshape", "Transpose", "FakeQuantize", "Unsqueeze"}


def _ov_const(output: Any, depth: int = 0) -> Any:
    """The Constant an op input comes from (through converts / dequantization), or None."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return node
    if kind not in _OV_CONST_PATH or depth > 6:
        return None
    return _ov_const(node.input_value(0), depth + 1)


class OpenVINOTapper(Tapper):
    can_bypass = True

    def __init__(self, xml: Path, *, threads: int, precision_hint: str = "f32", reference: list[LayerInfo] = ()) -> None:
        import openvino as ov

        # a conv whose batch norm OpenVINO folded in may carry the batch norm's module name
        alias = {m: layer.name for layer in reference for m in layer.modules}

        self.core = ov.Core()
        self.xml = Path(xml)
        self.threads = threads
        self.config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision_hint}
        model = self.core.read_model(str(xml))
        self.plan = TapPlan()
        self.tap_ops: dict[str, str] = {}  # layer -> friendly name of the tapped op
        self.fq: dict[str, str] = {}
        for op in model.get_ordered_ops():
            kind = op.get_type_name()
            if kind not in _OV_LAYERS or op.get_input_size() < 2:
                continue
            weight = _ov_const(op.input_value(1))
            if weight is None:
                continue
            end = op
            chain = [op]
            while True:
                targets = list(end.output(0).get_target_inputs())
                if len(targets) != 1:
                    break
                nxt = targets[0].get_node()
                t = nxt.get_type_name()
                if t in _OV_FOLLOW or (t in ("Add", "Multiply", "Subtract") and any(
                        _ov_const(nxt.input_value(i)) is not None for i in range(nxt.get_input_size()))):
                    end = nxt
                    chain.append(nxt)
                else:
                    break
            names = [n for c in chain for n in (c.get_friendly_name(), *sorted(c.output(0).get_names()))]
            m = next((hit for n in names if (hit := _MODULE.search(n))), None)
            # converted from ONNX: the ONNX node's scoped name, on the op or (bias split off) the next one
            scoped = next((n.replace("/WithoutBiases", "").removesuffix("_output_0") for n in names[:4] if "/" in n),
                          op.get_friendly_name())
            name = m.group(1) if m else _onnx_layer_name(weight.get_friendly_name(), scoped)
            name = alias.get(name, name)
            if name in self.tap_ops or (not m and re.fullmatch(r"[A-Za-z]+_c?\d+", name)):
                self.plan.unmapped.append(op.get_friendly_name())
                continue
            fq = next((ti.get_node() for ti in end.output(0).get_target_inputs()
                       if ti.get_node().get_type_name() == "FakeQuantize"), None)
            if fq is not None:
                lo = _ov_const(fq.input_value(1)).get_data()
                hi = _ov_const(fq.input_value(2)).get_data()
                self.plan.quantizers[name] = Quantizer(float(np.min(lo)), float(np.max(hi)))
                self.fq[name] = fq.get_friendly_name()
                end = fq
            self.tap_ops[name] = end.get_friendly_name()
            self.plan.layers.append(name)
        self._compiled: dict[int, Any] = {}

    def _model(self, batch: int, *, taps: bool, bypass: str | None = None) -> Any:
        import openvino as ov

        model = self.core.read_model(str(self.xml))
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        if bypass is not None:
            fq = ops[self.fq[bypass]]
            for ti in list(fq.output(0).get_target_inputs()):
                ti.replace_source_output(fq.input_value(0))
        index: dict[str, int] = {}
        if taps:
            wanted = {self.tap_ops[name] for name in self.plan.layers}
            have = {r.input_value(0).get_node().get_friendly_name() for r in model.get_results()}
            model.add_outputs([ops[op].output(0) for op in sorted(wanted - have)])
            where = {r.input_value(0).get_node().get_friendly_name(): i for i, r in enumerate(model.get_results())}
            index = {name: where[self.tap_ops[name]] for name in self.plan.layers}
        shape = list(model.inputs[0].get_partial_shape())
        shape[0] = ov.Dimension(batch)
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
        return self.core.compile_model(model, "CPU", self.config), index

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if len(x) not in self._compiled:
            self._compiled[len(x)] = self._model(len(x), taps=True)
        compiled, index = self._compiled[len(x)]
        res = compiled.create_infer_request().infer({0: x})
        return {name: np.asarray(res[compiled.outputs[index[name]]], np.float32) for name in self.plan.layers}

    def bypassed(self, layer: str) -> Any:
        compiled: dict[int, Any] = {}

        def run(x: np.ndarray) -> np.ndarray:
            if len(x) not in compiled:
                compiled[len(x)] = self._model(len(x), taps=False, bypass=layer)
            model = compiled[len(x)][0]
            return np.asarray(model.create_infer_request().infer({0: x})[model.outputs[0]])
        return run

    def close(self) -> None:
        self._compiled.clear()


# ----------------------------------------------------------------------------- LiteRT

_TFL_LAYERS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise", "FULLY_CONNECTED": "linear",
               "TRANSPOSE_CONV": "conv"}
_TFL_FOLLOW = {"HARD_SWISH", "LOGISTIC", "RELU", "RELU6", "LEAKY_RELU", "GELU", "ELU", "RELU_N1_TO_1"}


def _tfl_shape_fits(kind: str, shape: tuple[int, ...], ref: LayerInfo) -> bool:
    w = ref.weight_shape
    if kind != ref.kind:
        return False
    if kind == "conv" and len(shape) == 4 and len(w) == 4:  # TFLite OHWI, torch OIHW
        return (shape[0], shape[3], shape[1], shape[2]) == w
    if kind == "depthwise" and len(shape) == 4 and len(w) == 4:  # TFLite 1HWO
        return (shape[3], shape[1], shape[2]) == (w[0], w[2], w[3])
    if kind == "linear" and len(shape) == 2:
        return tuple(shape) == w
    return False


class TFLiteTapper(Tapper):
    """Matches the reference's layers to the flatbuffer's conv / FC ops (kind, weight shape, leaf
    name, order) and reads their outputs with the tensors preserved, sample by sample."""

    def __init__(self, path: Path, reference: list[LayerInfo], *, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.interp = Interpreter(model_path=str(path), num_threads=threads, experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        tensors = {d["index"]: d for d in self.interp.get_tensor_details()}
        ops = [o for o in self.interp._get_ops_details()]
        consumers: dict[int, list[dict]] = defaultdict(list)
        for o in ops:
            for t in o["inputs"]:
                consumers[int(t)].append(o)
        layer_ops = [o for o in ops if o["op_name"] in _TFL_LAYERS and len(o["inputs"]) > 1]
        used: set[int] = set()
        self.plan = TapPlan(note="LiteRT built-in kernels with tensors preserved (no XNNPACK delegate)")
        self.taps: dict[str, dict] = {}
        pos = 0
        for ref in reference:
            leaf = ref.name.rsplit(".", 1)[-1]
            best = None
            for j, o in enumerate(layer_ops):
                if j in used:
                    continue
                shape = tuple(int(s) for s in tensors[int(o["inputs"][1])]["shape"])
                if not _tfl_shape_fits(_TFL_LAYERS[o["op_name"]], shape, ref):
                    continue
                names = tensors[int(o["outputs"][0])]["name"] + tensors[int(o["inputs"][1])]["name"]
                score = (0 if re.search(rf"_{re.escape(leaf)}(;|$)", names) else 1, abs(j - pos))
                if best is None or score < best[0]:
                    best = (score, j)
            if best is None:
                continue
            j = best[1]
            used.add(j)
            pos = j + 1
            out = int(layer_ops[j]["outputs"][0])
            cons = consumers.get(out, [])
            if len(cons) == 1 and cons[0]["op_name"] in _TFL_FOLLOW:
                out = int(cons[0]["outputs"][0])
            detail = tensors[out]
            self.taps[ref.name] = detail
            scale, zp = detail["quantization"]
            if np.issubdtype(detail["dtype"], np.integer) and scale:
                lo, hi = _qrange(detail["dtype"])
                self.plan.quantizers[ref.name] = Quantizer((lo - zp) * scale, (hi - zp) * scale)
            self.plan.layers.append(ref.name)
        order = {name: i for i, name in enumerate(r.name for r in reference)}
        self.plan.layers.sort(key=order.__getitem__)
        self.plan.unmapped = [tensors[int(o["outputs"][0])]["name"] for j, o in enumerate(layer_ops) if j not in used]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        from .targets.tflite import _quantize

        got: dict[str, list[np.ndarray]] = {name: [] for name in self.plan.layers}
        for i in range(len(x)):
            self.interp.set_tensor(self.inp["index"], _quantize(x[i : i + 1], self.inp))
            self.interp.invoke()
            for name in self.plan.layers:
                d = self.taps[name]
                arr = self.interp.get_tensor(d["index"])
                scale, zp = d["quantization"]
                if np.issubdtype(arr.dtype, np.integer) and scale:
                    arr = (arr.astype(np.float32) - zp) * scale
                if arr.ndim == 4:
                    arr = arr.transpose(0, 3, 1, 2)
                got[name].append(arr.astype(np.float32, copy=True))
        return {name: np.concatenate(parts) for name, parts in got.items()}
