"""Training under ``torchrun``: the process's rank and world size (torch.distributed set up on first
use: gloo on CPU, nccl on GPUs), the torch device it trains on, batch-norm layers normalised with the
whole global batch's statistics, and the collectives the loop needs (a loss finite on every process,
sums over the processes)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size); initializes torch.distributed when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def torch_device() -> Any:
    """The torch device this process trains on: its GPU under torchrun (LOCAL_RANK), else the first GPU,
    else the CPU (not the device profile the engines are for: :mod:`compressor.devices`)."""
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")


def _bn_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """A batch-norm layer's forward under torchrun: in training, the mean and variance of the global
    batch (every process's share), gathered with a differentiable all-reduce, so that the output, the
    gradients and the running statistics are those of one process with the whole batch. The
    statistics are combined exactly (count, mean and sum of squared deviations per process), in
    float32. Eval mode, and training without batch statistics, are the layer's own forward."""
    import torch
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    if not self.training:
        return super(type(self), self).forward(x)
    self._check_input_dim(x)
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(self.num_batches_tracked)
    group = self._sync_group
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    count = xf.new_full((1,), float(x.numel() // c))
    mean = xf.mean(dims)
    m2 = ((xf - mean.view(1, c, *[1] * (x.dim() - 2))) ** 2).sum(dims)
    rows = [xf.new_zeros(2 * c + 1) for _ in range(size)]
    rows[rank] = torch.cat([count, mean, m2])
    gathered = all_reduce(torch.stack(rows), group=group)  # an all-gather that gloo and autograd both take
    counts, means, m2s = gathered[:, :1], gathered[:, 1 : c + 1], gathered[:, c + 1 :]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
    g_var = g_m2 / total
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            unbiased = g_m2 / max(float(total) - 1, 1.0)
            self.running_mean.mul_(1 - momentum).add_(g_mean.detach().to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.detach().to(self.running_var.dtype), alpha=momentum)
    shape = (1, c, *[1] * (x.dim() - 2))
    y = (xf - g_mean.view(shape)) * torch.rsqrt(g_var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
    return y.to(x.dtype)


@contextlib.contextmanager
def synchronized_batch_norm(model: Any, world_size: int) -> Iterator[list[str]]:
    """Under torchrun, every batch-norm layer of ``model`` normalises with the statistics of the global
    batch while the block runs (``_bn_forward``; torch's SyncBatchNorm takes only GPUs), as one process
    does. The layers keep their modules, names and state (their class is a subclass for the block, the
    original again after it); a layer whose class has its own forward, and any layer of a model carrying
    NNCF's hooks (which key on the batch_norm call), keeps its forward. Yields the names synchronised."""
    import torch
    import torch.distributed as dist

    if world_size <= 1:
        yield []
        return
    if any("__nncf_hooks" in m._modules for m in model.modules()):
        log.info("training under torchrun: the model carries NNCF hooks; its batch-norm layers use each "
                 "process's share of the batch (freeze_bn keeps them in eval mode)")
        yield []
        return
    base = torch.nn.modules.batchnorm._BatchNorm
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, base) and type(m).forward is base.forward]
    group = dist.new_group() if layers else None  # apart from DDP's gradient buckets
    swapped: list[tuple[Any, type]] = []
    try:
        for _, m in layers:
            cls = type(m)
            m.__class__ = _sync_class(cls)
            m._sync_group = group
            swapped.append((m, cls))
        yield [name for name, _ in layers]
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            m.__dict__.pop("_sync_group", None)
        if group is not None:
            dist.destroy_process_group(group)


_SYNC_CLASSES: dict[type, type] = {}


def _sync_class(cls: type) -> type:
    if cls not in _SYNC_CLASSES:
        _SYNC_CLASSES[cls] = type(f"Synchronized{cls.__name__}", (cls,), {"forward": _bn_forward})
    return _SYNC_CLASSES[cls]


def _all_finite(loss: Any, world_size: int) -> bool:
    """Whether the loss is finite on every process (under torchrun all must skip the same step)."""
    import torch

    finite = bool(torch.isfinite(loss.detach()).all())
    if world_size == 1:
        return finite
    import torch.distributed as dist

    bad = torch.tensor([0.0 if finite else 1.0], device=loss.device if loss.device.type == "cuda" else "cpu")
    dist.all_reduce(bad)  # NCCL wants a CUDA tensor, gloo a CPU one
    return float(bad.item()) == 0.0


def _sum_over_processes(values: tuple[float, ...], world_size: int) -> tuple[float, ...]:
    """``values`` summed over the processes of a torchrun job (as they are in one process)."""
    if world_size == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=torch_device())  # NCCL takes CUDA tensors, gloo CPU ones
    dist.all_reduce(t)
    return tuple(float(v) for v in t.cpu())
