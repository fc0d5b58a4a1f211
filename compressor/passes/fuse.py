"""fuse: fold batch-norm into the preceding conv/linear and drop inference no-ops (dropout,
identity) at torch level, on the FX graph (torch.fx's own fusion utilities), or with
``torch.jit.freeze`` + ``optimize_for_inference`` for TorchScript models."""

from __future__ import annotations

import copy
from typing import Any

from ..artifact import Form, ModelArtifact
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
    consumes = frozenset({Form.TORCH})
    produces = Form.TORCH

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        import torch

        module = artifact.model
        probe = torch.randn(artifact.input_spec.with_batch(2), generator=torch.Generator().manual_seed(ctx.seed))
        with torch.inference_mode():
            before_out = module(probe)
        if isinstance(module, torch.jit.ScriptModule):
            fused, stats = self._fuse_script(module)
        else:
            fused, stats = self._fuse_fx(module)
        with torch.inference_mode():
            after_out = fused(probe)
        diff = float((before_out - after_out).abs().max())
        scale = float(before_out.abs().max()) or 1.0
        if diff > self.config.tolerance * scale:
            raise RuntimeError(f"fused model differs from the original by {diff:.3g} (logit scale {scale:.3g})")
        stats["max_abs_diff"] = diff
        return PassResult(artifact.derive(Form.TORCH, model=fused, graph="fx"), stats)

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
        frozen = torch.jit.freeze(module.eval())
        fused = torch.jit.optimize_for_inference(frozen)
        return fused, {"graph": "torchscript", "before": before, "after": _script_counts(fused)}


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
