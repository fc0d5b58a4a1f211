"""prune_unstructured: magnitude (L1) sparsity with PyTorch's own pruning library.

``torch.nn.utils.prune`` zeroes the smallest weights of every Conv and Linear layer, either with
one threshold across all of them (``global_unstructured``) or to the same sparsity in each layer
(``l1_unstructured``); in one shot, or gradually along the polynomial schedule of Zhu & Gupta
(2017) with fine-tuning after each step. The masks are made permanent (``prune.remove``): the
output is a plain model whose weight tensors hold zeros.

Zeros do not make dense kernels faster. PyTorch, OpenVINO and ONNX Runtime on a CPU run the same
dense convolutions and matrix products whatever the weights hold, so what unstructured sparsity
buys here is a smaller *compressed* file; the report says so and gives both sizes. (OpenVINO's
``CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE`` packs sparse weights only for INT8 fully-connected
layers on Intel CPUs with AMX; convolutions, FP32 and CPUs without AMX are untouched.)
For speed, remove whole channels with ``prune_structured``.
"""

from __future__ import annotations

import copy
import logging
import zlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ..artifact import Form, ModelArtifact, state_dict_bytes
from ..environment import has_amx_int8
from ..errors import ConfigError
from ..pass_base import Pass, PassConfig, PassContext, PassResult
from ..registry import register_pass
from ..training import TrainConfig, TrainData, evaluate_top1, train, training_data

if TYPE_CHECKING:
    from torch import nn

    from ..data import DataBundle

log = logging.getLogger(__name__)


class PruneUnstructuredConfig(PassConfig):
    sparsity: float = Field(default=0.5, gt=0, lt=1)
    """share of the pruned layers' weights set to zero, between 0 and 1 (exclusive)"""
    scope: Literal["global", "layer"] = "global"
    """global: one magnitude threshold across all pruned layers; layer: every layer to the same sparsity"""
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    """oneshot: prune once; gradual: prune in `steps` steps along s_t = s * (1 - (1 - t/steps)^3)"""
    steps: int = Field(default=4, ge=1, le=100)
    """gradual: pruning steps (Zhu & Gupta 2017 polynomial schedule), fine-tuning after each"""
    finetune: TrainConfig | None = None
    """fine-tuning after each pruning step (gradual: its epochs are split across the steps); none if omitted"""
    protect_classifier: bool = True
    """keep the last Linear layer (the classifier) dense"""
    ignored_layers: list[str] = Field(default_factory=list)
    """module names never pruned (a container's name covers every layer inside it)"""

    @model_validator(mode="after")
    def _gradual_needs_training(self) -> PruneUnstructuredConfig:
        if self.schedule == "gradual" and self.finetune is None:
            raise ValueError(
                "schedule 'gradual' needs finetune: without training between the steps, magnitude pruning "
                "in steps gives exactly the one-shot result"
            )
        return self


@register_pass
class PruneUnstructured(Pass):
    name = "prune_unstructured"
    summary = "magnitude (L1) sparsity with torch.nn.utils.prune: global or per layer, one-shot or gradual"
    Config = PruneUnstructuredConfig
    consumes = frozenset({Form.TORCH})
    produces = Form.TORCH

    def requires_data(self) -> bool:  # data only for fine-tuning (the class says "no data" in listings)
        return self.config.finetune is not None

    # ------------------------------------------------------------------ checks before any work
    def preflight(self, artifact: ModelArtifact | None, data: DataBundle | None) -> None:
        if artifact is not None and artifact.form is Form.TORCH:
            self._select(artifact.model)

    def _select(self, model: Any) -> tuple[dict[str, nn.Module], list[str]]:
        """The layers to prune by name, and the names kept dense (protected or ignored)."""
        import torch

        if isinstance(model, torch.jit.ScriptModule):
            raise ConfigError(
                f"{self.step}: TorchScript models cannot be pruned (torch.nn.utils.prune needs an nn.Module); "
                "give the pickled module or a state dict with its architecture"
            )
        modules = dict(model.named_modules())
        for name in self.config.ignored_layers:
            if name not in modules:
                raise ConfigError(f"{self.step}.ignored_layers: no module named {name!r}")
        layers = {n: m for n, m in modules.items() if _prunable(m)}
        kept = [n for n in layers if any(n == i or n.startswith(i + ".") for i in self.config.ignored_layers)]
        if self.config.protect_classifier:
            linears = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear)]
            if linears and linears[-1] not in kept:
                kept.append(linears[-1])
        chosen = {n: m for n, m in layers.items() if n not in kept}
        if not chosen:
            raise ConfigError(
                f"{self.step}: no Conv or Linear layer left to prune (kept dense: {', '.join(kept) or 'none'})"
            )
        return chosen, kept

    # ------------------------------------------------------------------ the pass
    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        from torch.nn.utils import prune

        cfg = self.config
        model = copy.deepcopy(artifact.model).eval()
        layers, kept = self._select(model)
        orders = {name: list(m._parameters) for name, m in layers.items()}
        tdata: TrainData | None = None
        if cfg.finetune is not None:
            if ctx.data is None:
                raise ConfigError(
                    f"{self.step}.finetune: fine-tuning needs training data (give the recipe a data section)"
                )
            tdata = training_data(artifact, ctx.data, cfg.finetune)
        dense_bytes, dense_zlib = _state_dict_sizes(model)

        targets = _schedule(cfg.sparsity, cfg.steps if cfg.schedule == "gradual" else 1)
        steps: list[dict[str, Any]] = []
        for t, target in enumerate(targets, start=1):
            self._prune_to(layers, target)
            record: dict[str, Any] = {"step": t, "target_sparsity": round(target, 4),
                                      "sparsity": round(_sparsity(layers.values()), 4)}
            if cfg.finetune is not None:
                assert tdata is not None
                if len(tdata.x_val):
                    record["val_top1_pruned"] = evaluate_top1(model, tdata.x_val, tdata.y_val, tdata)
                n = len(targets)
                ft = cfg.finetune.model_copy(update={
                    "epochs": cfg.finetune.epochs / n,
                    "max_steps": -(-cfg.finetune.max_steps // n) if cfg.finetune.max_steps else None,
                    "seed": cfg.finetune.seed + t - 1,
                })
                result = train(model, tdata, ft, description=f"fine-tune after pruning step {t}/{n}",
                               progress=ctx.progress)
                record["finetune"] = result.to_json()
            steps.append(record)
            log.info("prune_unstructured step %d/%d: %s", t, len(targets),
                     {k: v for k, v in record.items() if k != "finetune"})

        for name, module in layers.items():
            prune.remove(module, "weight")  # masks made permanent: plain weights holding zeros
            # remove() registers the weight anew, after the bias: restore the input's parameter
            # order so state_dict() and parameters() line up with the unpruned model's
            for key in orders[name]:
                module._parameters[key] = module._parameters.pop(key)
        model.eval()

        pruned_bytes, pruned_zlib = _state_dict_sizes(model)
        achieved = _sparsity(layers.values())
        every = {n: m for n, m in model.named_modules() if _prunable(m)}
        params = list(model.parameters())
        metrics: dict[str, Any] = {
            "sparsity": round(achieved, 4),
            "target_sparsity": cfg.sparsity,
            "zlib_bytes": {"dense": dense_zlib, "pruned": pruned_zlib},
            "bytes": {"dense": dense_bytes, "pruned": pruned_bytes},
            "scope": cfg.scope,
            "schedule": cfg.schedule,
            "sparsity_all_layers": round(_sparsity(every.values()), 4),
            "params_total": sum(p.numel() for p in params),
            "params_nonzero": sum(int(p.count_nonzero()) for p in params),
            "layer_sparsity": {n: round(_sparsity([m]), 4) for n, m in every.items()},
            "kept_dense": kept,
            "steps": steps,  # per step: sparsity, and with fine-tuning top-1 before it and its history
            "note": _speed_note(dense_zlib, pruned_zlib),
        }
        return PassResult(artifact.derive(Form.TORCH, model=model, sparsity=round(achieved, 4)), metrics)

    def _prune_to(self, layers: dict[str, nn.Module], target: float) -> None:
        """Zero more weights (L1 magnitude) until ``target`` of the layers' weights are masked.

        Amounts are counts of weights still unmasked, so a step after fine-tuning ranks only the
        weights that survived the previous steps (torch's PruningContainer does the bookkeeping).
        """
        from torch.nn.utils import prune

        if self.config.scope == "global":
            total = sum(m.weight.numel() for m in layers.values())
            masked = sum(_masked(m) for m in layers.values())
            prune.global_unstructured(
                [(m, "weight") for m in layers.values()],
                pruning_method=prune.L1Unstructured,
                importance_scores={(m, "weight"): _current_weight(m) for m in layers.values()},
                amount=max(0, round(target * total) - masked),
            )
        else:
            for m in layers.values():
                amount = max(0, round(target * m.weight.numel()) - _masked(m))
                prune.l1_unstructured(m, "weight", amount=amount, importance_scores=_current_weight(m))


# ---------------------------------------------------------------------- helpers


def _prunable(module: Any) -> bool:
    import torch

    return isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and isinstance(
        getattr(module, "weight", None), torch.Tensor)


def _schedule(final: float, steps: int) -> list[float]:
    """Zhu & Gupta (2017): s_t = s_f * (1 - (1 - t/n)^3) for t = 1..n (from zero sparsity)."""
    return [final * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def _current_weight(module: Any) -> Any:
    """The weight as the next forward pass will see it. ``module.weight`` is only recomputed by
    the pruning hook on a forward pass, so after an optimizer step (or a restored checkpoint) it
    is stale; rank by ``weight_orig * weight_mask`` instead."""
    orig = getattr(module, "weight_orig", None)
    if orig is None:
        return module.weight.detach()
    return (orig * module.weight_mask).detach()


def _masked(module: Any) -> int:
    mask = getattr(module, "weight_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def _sparsity(modules: Any) -> float:
    zeros, total = 0, 0
    for m in modules:
        w = _current_weight(m)
        zeros += w.numel() - int(w.count_nonzero())
        total += w.numel()
    return zeros / total if total else 0.0


def _state_dict_sizes(model: Any) -> tuple[int, int]:
    """Bytes of ``torch.save(state_dict)``, raw and zlib-compressed (what a zipped file would take)."""
    raw = state_dict_bytes(model)
    return len(raw), len(zlib.compress(raw, 6))


def _speed_note(dense_zlib: int, pruned_zlib: int) -> str:
    amx = has_amx_int8()
    openvino = (
        "this CPU has AMX, so OpenVINO's CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE could pack the sparse weights of "
        "INT8 fully-connected layers (this project does not set it; convolutions are not covered)"
        if amx else
        "OpenVINO's CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE (sparse INT8 fully-connected weights) needs Intel AMX, "
        "which this CPU lacks, so it does not apply here"
    )
    gain = 1 - pruned_zlib / dense_zlib if dense_zlib else 0.0
    return (
        "unstructured zeros do not speed up dense kernels: PyTorch, OpenVINO and ONNX Runtime run the same dense "
        "convolutions and matrix products on this CPU whatever the weights hold, and uncompressed engine files "
        f"keep their size; {openvino}; TensorRT's sparse kernels need the 2:4 pattern, not scattered zeros. "
        f"What sparsity buys here is compressed size: the zlib-compressed weights are {100 * gain:.0f}% smaller "
        f"({dense_zlib} -> {pruned_zlib} bytes). For speed, remove channels with prune_structured."
    )
