"""The reference's taps: an ``nn.Module`` (or a torch.export / fused ATen graph) read through its FX
graph, each conv / linear layer after the batch norm and activation that follow it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..artifact import eval_mode
from .naming import TORCH_FOLLOW_FUNCS, TORCH_FOLLOW_MODULES, aten_layer_name, fn_name, node_module_path
from .tapper import LayerInfo, TapPlan, Tapper


def _get_attr(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
            if fn_name(node.target) == "linear":
                kind = "linear"
            else:
                groups = node.args[-1] if fn_name(node.target) == "convolution" else (
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
            return type(modules[node.target]).__name__ in TORCH_FOLLOW_MODULES
        if node.op in ("call_function", "call_method"):
            return fn_name(node.target) in TORCH_FOLLOW_FUNCS
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
