"""The training losses: cross-entropy, and the logit-distillation terms (kd, dkd, dist) that distill
and prune_structured's fine-tuning share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

LossFn = Callable[[Any, "torch.Tensor", "torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(model: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing), logits

    return loss


class LogitLoss(BaseModel):
    """The logit-distillation term's settings, shared by distill and by prune_structured's
    fine-tuning (one loss function, logit_loss, for both)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(default=4.0, gt=0)
    """softening temperature of student and teacher logits (the term is scaled by its square)"""
    loss: Literal["kd", "dkd", "dist"] = "kd"
    """the logit loss: kd (Hinton: KL of softened outputs), dkd (decoupled KD, Zhao et al. 2022:
    target-class and non-target-class terms weighted apart), dist (Huang et al. 2022: Pearson
    correlation of class probabilities within each image and of each class across the batch)"""
    dkd_alpha: float = Field(default=1.0, ge=0)
    """dkd: weight of the target-class term (TCKD)"""
    dkd_beta: float = Field(default=8.0, ge=0)
    """dkd: weight of the non-target-class term (NCKD)"""
    dist_beta: float = Field(default=1.0, ge=0)
    """dist: weight of the inter-class relation (within each image)"""
    dist_gamma: float = Field(default=1.0, ge=0)
    """dist: weight of the intra-class relation (across the batch)"""


def logit_loss(cfg: LogitLoss, s: Any, t: Any, y: Any) -> Any:
    """The distillation term on student and teacher logits (float32), scaled by T^2 where it softens."""
    import torch
    import torch.nn.functional as F

    temp = cfg.temperature
    if cfg.loss == "kd":
        return F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), reduction="batchmean",
                        log_target=True) * temp * temp
    if cfg.loss == "dkd":  # Zhao et al., Decoupled Knowledge Distillation (CVPR 2022), as in mdistiller
        gt = F.one_hot(y, s.shape[1]).bool()
        ps, pt = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
        bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1).clamp_min(1e-8)
        bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1).clamp_min(1e-8)
        tckd = F.kl_div(bs.log(), bt, reduction="batchmean") * temp * temp
        nckd = F.kl_div(F.log_softmax(s / temp - 1000.0 * gt, 1), F.softmax(t / temp - 1000.0 * gt, 1),
                        reduction="batchmean") * temp * temp
        return cfg.dkd_alpha * tckd + cfg.dkd_beta * nckd
    # dist: Huang et al., Knowledge Distillation from A Stronger Teacher (NeurIPS 2022)
    ps, pt = F.softmax(s / temp, 1), F.softmax(t / temp, 1)

    def pearson(a: Any, b: Any) -> Any:  # along the last dimension
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)

    inter = (1 - pearson(ps, pt)).mean()
    intra = (1 - pearson(ps.t(), pt.t())).mean()
    return temp * temp * (cfg.dist_beta * inter + cfg.dist_gamma * intra)
