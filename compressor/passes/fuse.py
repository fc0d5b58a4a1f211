"""fuse: fold batch-norm into the preceding conv/linear and drop inference no-ops (dropout,
identity) at torch level, on the FX graph (torch.fx's own fusion utilities), on the ATen graph
that a torch.export program unpacks to (``ExportedProgram.module()``), or with
``torch.jit.freeze`` for TorchScript models (its frozen graph still exports to ONNX; no
``optimize_for_inference``, whose MKL-DNN layout ops no exporter takes)."""

from __future__ import annotations

import copy
from typing import Any

from ..artifact import Form, ModelArtifact, plain_graph_module
from ..pass_base import Pass, PassConfig, PassContext, PassResult
from ..registry import register_pass


class FuseConfig(PassConfig):
    conv_bn: bool = True
    """fold BatchNorm into the conv (and linear) before it"""
    remove_dropout: bool = True
    """drop Dropout layers (no-ops in inference)"""
    remove_identity: bool = True
    """drop Identity layers"""
    tolerance: float = 1e-3
    """largest allowed difference of logits before/after, relative to their range"""


@register_pass
class Fuse(Pass):
    name = "fuse"
    summary = "fold conv+batch-norm (and linear+bn), drop dropout/identity; torch FX graph out"
    Config = FuseConfig
    consumes = frozenset({Form.TORCH, Form.EXPORTED})
    """a torch.export program is unpacked to its FX graph module (ATen ops) and folded there"""
    produces = Form.TORCH

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        import torch

        module = artifact.torch_module()
        batch = artifact.meta.get("fixed_batch") or 2  # e.g. a torch.export program traced at batch 1
        probe = torch.randn(artifact.input_spec.with_batch(batch), generator=torch.Generator().manual_seed(ctx.seed))
        with torch.inference_mode():
            before_out = module(probe)
        if artifact.form is Form.EXPORTED:
            fused, stats = self._fuse_aten(module)
        elif isinstance(module, torch.jit.ScriptModule):
            fused, stats = self._fuse_script(module)
        else:
            fused, stats = self._fuse_fx(module)
        with torch.inference_mode():
            after_out = fused(probe)
        stats["max_abs_diff"] = float((before_out - after_out).abs().max())
        stats["logit_scale"] = float(before_out.abs().max()) or 1.0
        return PassResult(artifact.derive(Form.TORCH, model=fused, graph="fx"), stats)

    def ensures(self, before: ModelArtifact, result: PassResult, ctx: PassContext) -> None:
        """Folding changes no prediction: logits on a random probe stay within the tolerance."""
        diff, scale = result.metrics["max_abs_diff"], result.metrics["logit_scale"]
        if diff > self.config.tolerance * scale:
            raise RuntimeError(f"fused model differs from the original by {diff:.3g} (logit scale {scale:.3g})")

    def _fuse_fx(self, module: Any) -> tuple[Any, dict[str, Any]]:
        from torch import fx
        from torch.fx.experimental import optimization

        model = copy.deepcopy(module).eval()
        try:
            gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
        except Exception as exc:
            raise RuntimeError(
                f"the model cannot be traced into an FX graph ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "export it with torch.export or TorchScript, or drop the fuse pass"
            ) from exc
        before = _fx_counts(gm)
        if self.config.conv_bn:
            gm = optimization.fuse(gm, inplace=True)
        if self.config.remove_dropout:
            gm = optimization.remove_dropout(gm)
        if self.config.remove_identity:
            _remove_identity(gm)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        after = _fx_counts(gm)
        return gm, {"graph": "fx", "before": before, "after": after}

    def _fuse_script(self, module: Any) -> tuple[Any, dict[str, Any]]:
        import torch

        before = _script_counts(module)
        # freeze folds conv+BN and drops dropout; optimize_for_inference would add to_mkldnn layout
        # conversions that neither ONNX exporter nor OpenVINO takes
        fused = torch.jit.freeze(module.eval())
        return fused, {"graph": "torchscript", "before": before, "after": _script_counts(fused)}

    def _fuse_aten(self, gm: Any) -> tuple[Any, dict[str, Any]]:
        """Fold on the ATen-level graph module of a torch.export program (get_attr weights, aten ops)."""
        import torch

        aten = torch.ops.aten
        before = _aten_counts(gm)
        graph = gm.graph
        if self.config.conv_bn:
            for index, bn in enumerate(list(graph.nodes)):
                if bn.op == "call_function" and bn.target in _BN_OPS:
                    _fold_bn(gm, bn, f"_fused{index}")
        if self.config.remove_dropout:
            for node in list(graph.nodes):
                if node.op == "call_function" and node.target is aten.dropout.default and not _arg(node, 2, "train"):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
        graph.eliminate_dead_code()
        graph.lint()
        out = plain_graph_module(gm)  # keeps only the weights the graph references, and pickles
        return out, {"graph": "fx-aten", "before": before, "after": _aten_counts(out)}


class _AtenOps:
    """A set of ATen overloads by name, resolved on first use (so importing this module needs no torch)."""

    def __init__(self, *names: str) -> None:
        self.names: tuple[str, ...] = names
        self.ops: set[Any] | None = None

    def __contains__(self, op: Any) -> bool:
        if self.ops is None:
            import torch

            self.ops = set()
            for name in self.names:
                packet, _, overload = name.partition(".")
                op_packet = getattr(torch.ops.aten, packet, None)
                if op_packet is not None and hasattr(op_packet, overload):
                    self.ops.add(getattr(op_packet, overload))
        return op in self.ops


_CONV_OPS = _AtenOps("conv1d.default", "conv2d.default", "conv3d.default")
_FOLDS_INTO = _AtenOps("conv1d.default", "conv2d.default", "conv3d.default", "linear.default")
_BN_OPS = _AtenOps("batch_norm.default", "_native_batch_norm_legit_no_training.default")
_BN_LEGIT = _AtenOps("_native_batch_norm_legit_no_training.default")  # (input, w, b, mean, var, momentum, eps)


def _arg(node: Any, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _fold_bn(gm: Any, bn: Any, prefix: str) -> bool:
    """Fold one eval-mode batch norm into the conv/linear that feeds it (and nothing else); True if done."""
    import operator

    import torch

    legit = bn.target in _BN_LEGIT
    src = bn.args[0]
    if src.op != "call_function" or src.target not in _FOLDS_INTO or len(src.users) != 1:
        return False
    if not legit and _arg(bn, 5, "training"):
        return False
    users = list(bn.users)
    if legit and not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
        return False  # the saved mean/invstd are used: not an inference-only batch norm
    bn_nodes = [_arg(bn, i, name) for i, name in enumerate(("weight", "bias", "running_mean", "running_var"), 1)]
    w_node, b_node = src.args[1], _arg(src, 2, "bias")
    attrs = [n for n in [w_node, b_node, *bn_nodes] if n is not None]
    if bn_nodes[2] is None or bn_nodes[3] is None or any(n.op != "get_attr" for n in attrs):
        return False
    eps = _arg(bn, 6, "eps", 1e-5) if legit else _arg(bn, 7, "eps", 1e-5)
    weight, bias, gamma, beta, mean, var = (None if n is None else _get_attr(gm, n.target)
                                            for n in [w_node, b_node, *bn_nodes])
    with torch.no_grad():
        scale = torch.rsqrt(var.float() + eps) * (gamma.float() if gamma is not None else 1.0)
        new_w = (weight.float() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
        b = bias.float() if bias is not None else torch.zeros_like(mean, dtype=torch.float32)
        new_b = ((b - mean.float()) * scale + (beta.float() if beta is not None else 0.0)).to(weight.dtype)
    gm.register_parameter(f"{prefix}_weight", torch.nn.Parameter(new_w, requires_grad=False))
    gm.register_parameter(f"{prefix}_bias", torch.nn.Parameter(new_b, requires_grad=False))
    with gm.graph.inserting_before(src):
        w_new, b_new = gm.graph.get_attr(f"{prefix}_weight"), gm.graph.get_attr(f"{prefix}_bias")
    args = list(src.args)
    args[1] = w_new
    if len(args) > 2:
        args[2] = b_new
    else:
        args.append(b_new)
    src.args = tuple(args)
    src.kwargs = {k: v for k, v in src.kwargs.items() if k != "bias"}
    for u in users if legit else [bn]:
        u.replace_all_uses_with(src)
    for u in users if legit else []:
        gm.graph.erase_node(u)
    gm.graph.erase_node(bn)
    return True


def _get_attr(gm: Any, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _aten_counts(gm: Any) -> dict[str, int]:
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return {
        "nodes": len(gm.graph.nodes),
        "batch_norm": sum(t in _BN_OPS for t in calls),
        "conv": sum(t in _CONV_OPS for t in calls),
    }


def _remove_identity(gm: Any) -> None:
    import torch

    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _fx_counts(gm: Any) -> dict[str, int]:
    import torch

    modules = dict(gm.named_modules())
    leaf = [m for name, m in modules.items() if name and not list(m.children())]
    return {
        "nodes": len(gm.graph.nodes),
        "layers": len(leaf),
        "batch_norm": sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in leaf),
        "conv": sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in leaf),
    }


def _script_counts(module: Any) -> dict[str, int]:
    graph = module.inlined_graph if hasattr(module, "inlined_graph") else module.graph
    kinds = [n.kind() for n in graph.nodes()]
    return {
        "nodes": len(kinds),
        "batch_norm": sum("batch_norm" in k for k in kinds),
        "conv": sum("conv" in k for k in kinds),
    }
