"""The one training loop every training pass shares (fine-tuning after pruning, distillation, QAT).

Optimizer and schedule, epochs or steps, bf16 autocast and channels-last memory (on GPUs bf16 where
supported; on CPUs each is measured on the model's own training step before training, and kept
only where it is faster: see ``probe_step``), a rich progress bar with loss and accuracy, best
checkpoint by top-1 on a class-balanced validation subset held out of the training split, seeded.
Launched under ``torchrun`` it trains with DistributedDataParallel (gloo on CPU, nccl on GPUs)
with no change of code and takes the steps one process takes: every process draws the same
epoch permutation and cuts the same global batches (``batch_size`` images; the last partial one
dropped, as in one process), takes every size-th image of each, draws the augmentation of the
whole batch and applies its share, weighs its loss by its share of the batch (gradients averaged
by DDP are then the global batch's), and normalises batch-norm layers with the statistics of the
whole global batch (see ``synchronized_batch_norm``). Same step count, same learning-rate
schedule, validation on the whole held-out set; only dropout masks differ (each process draws
its own).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .data import ImageSource
from .environment import has_native_bf16
from .errors import ConfigError
from .streaming import in_batches, timed

if TYPE_CHECKING:
    import torch

    from .artifact import ModelArtifact
    from .data import DataBundle
    from .streaming import ImageSet

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    epochs: float = Field(default=1.0, gt=0)
    """passes over the training images (fractions allowed)"""
    max_steps: int | None = Field(default=None, ge=1)
    """stop after this many optimizer steps (overrides epochs)"""
    batch_size: int = Field(default=128, ge=1)
    """global batch size (split across processes under torchrun)"""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """SGD momentum"""
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    """linear warm-up share of the steps (cosine schedule)"""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: bool = True
    """random crop (padding 4) and horizontal flip"""
    bf16: Literal["auto", "on", "off"] = "auto"
    """bf16 autocast; auto: on GPUs with bf16; on CPUs with native bf16 (AVX512-BF16/AMX) where the
    probe of this model's training step measures it faster than fp32 (on an AMX Xeon it was 1.7x
    slower for MobileNetV2 and 5 % faster for ResNet-50), and switched off for the rest of the run
    at the first loss that is not finite; fp32 on other CPUs"""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """channels-last (NHWC) weights and batches; auto: where the probe of this model's training step
    measures it faster (on an AMX Xeon, MobileNetV2 trained 2.2x faster in fp32)"""
    train_samples: int | None = Field(default=None, ge=1)
    """train on a class-balanced subset of this size (default: the whole split minus validation)"""
    val_samples: int = Field(default=2000, ge=0)
    """class-balanced images held out of the training split to pick the best checkpoint"""
    evals_per_epoch: int = Field(default=1, ge=1)
    seed: int = 0


@dataclass
class TrainResult:
    steps: int
    seconds: float
    best_val_top1: float | None
    final_val_top1: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    skipped_steps: int = 0  # steps whose loss was not finite: no update
    precision: str = "fp32"  # bf16 autocast or fp32
    memory_format: str = "contiguous"  # or channels_last
    probe: dict[str, Any] | None = None  # probe_step's timings and choice, where it ran
    device: str = "cpu"
    kept_initial: bool = False  # no checkpoint beat the starting model on validation: it was restored
    data_seconds: float = 0.0  # the time the steps waited for their training images (decoding, reading)

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "best_val_top1": self.best_val_top1,
                "final_val_top1": self.final_val_top1, "world_size": self.world_size,
                "skipped_steps": self.skipped_steps, "precision": self.precision,
                "memory_format": self.memory_format, "probe": self.probe, "device": self.device,
                "kept_initial": self.kept_initial, "data_seconds": round(self.data_seconds, 1),
                "history": self.history}


# ---------------------------------------------------------------------- distributed


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


def device() -> Any:
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


def use_bf16(setting: str, dev: Any) -> bool | None:
    """True/False, or None where ``probe_step`` decides (auto on a CPU with native bf16)."""
    if setting == "on":
        if dev.type == "cpu" and not has_native_bf16():
            log.warning("train.bf16: on, but this CPU has no native bf16 (AVX512-BF16/AMX): autocast emulates it")
        return True
    if setting == "off":
        return False
    if dev.type == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return None if has_native_bf16() else False


PROBE_MIN_STEP_S = 0.05
"""a default step shorter than this is not probed: the layout or precision could not save much"""
PROBE_MARGIN = 0.05
"""an option is taken over fp32 contiguous only when its step is this share faster"""


@dataclass(frozen=True)
class StepOption:
    bf16: bool
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{'bf16' if self.bf16 else 'fp32'} {'channels_last' if self.channels_last else 'contiguous'}"


def step_options(cfg: TrainConfig, dev: Any, model: Any) -> list[StepOption]:
    """The (precision, memory format) pairs to probe; the first is the default."""
    bf16 = use_bf16(cfg.bf16, dev)
    has_conv = any(getattr(p, "dim", lambda: 0)() == 4 for p in model.parameters())
    layouts = [cfg.channels_last == "on"] if cfg.channels_last != "auto" or not has_conv else [False, True]
    precisions = [False, True] if bf16 is None else [bf16]
    return [StepOption(b, c) for c in layouts for b in precisions]


def set_memory_format(model: Any, channels_last: bool) -> None:
    import torch

    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def probe_step(model: Any, loss_fn: LossFn, xb: Any, yb: Any, ix: Any, dev: Any, options: list[StepOption],
               steps: int = 3) -> tuple[StepOption, dict[str, Any]]:
    """Time this model's forward and backward on one batch under each option (one warm-up, then the
    median of ``steps``), leaving parameters, buffers and the random state as they were. The first
    option is the default; another wins only when it is ``PROBE_MARGIN`` faster. An option that
    fails (an op without a bf16 or channels-last kernel) is left out with its error."""
    import torch

    began = time.perf_counter()
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if dev.type == "cuda" else None
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    was_training = model.training
    model.train()
    try:
        for opt in options:
            set_memory_format(model, opt.channels_last)
            x = xb.contiguous(memory_format=torch.channels_last) if opt.channels_last else xb
            times = []
            try:
                for i in range(steps + 1):
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t = time.perf_counter()
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=opt.bf16):
                        loss, _ = loss_fn(model, x, yb, ix)
                    loss.backward()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if i:
                        times.append(time.perf_counter() - t)
                    model.zero_grad(set_to_none=True)
            except Exception as exc:  # noqa: BLE001 - an option this model cannot train under is not an error
                failed[opt.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                model.zero_grad(set_to_none=True)
                continue
            seconds[opt.name] = float(np.median(times))
            if opt is options[0] and seconds[opt.name] < PROBE_MIN_STEP_S:
                break  # too short a step to matter
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)
    default = options[0]
    chosen = default
    if default.name in seconds:
        for opt in options[1:]:
            if opt.name in seconds and seconds[opt.name] < (1 - PROBE_MARGIN) * seconds[chosen.name] \
                    and seconds[opt.name] < (1 - PROBE_MARGIN) * seconds[default.name]:
                chosen = opt
    elif seconds:
        chosen = next(o for o in options if o.name == min(seconds, key=seconds.__getitem__))
    set_memory_format(model, chosen.channels_last)
    return chosen, {"s_per_step": {k: round(v, 4) for k, v in seconds.items()}, "failed": failed,
                    "chosen": chosen.name, "batch": int(len(xb)), "seconds": round(time.perf_counter() - began, 2),
                    "note": None if len(seconds) > 1 or failed else
                    f"step {1000 * next(iter(seconds.values()), 0):.0f} ms: too short to probe further"}


# ---------------------------------------------------------------------- data


@dataclass
class TrainData:
    """uint8 training and validation images (N, H, W, C) + labels, and how to normalise them. The
    images are arrays or :class:`compressor.streaming.ImageSet` s (a run's: read batch by batch by
    decoding workers, never held whole); both index as ``x_train[ix]``."""

    x_train: np.ndarray | ImageSet
    y_train: np.ndarray
    x_val: np.ndarray | ImageSet
    y_val: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    scale: float

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW with the model's preprocessing."""
        import torch

        x = images.permute(0, 3, 1, 2).float() * self.scale
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def training_data(artifact: ModelArtifact, data: DataBundle, cfg: TrainConfig) -> TrainData:
    src = data.calibration_source  # the training split
    size = tuple(artifact.input_spec.sample_shape[1:])
    all_idx = np.arange(len(src))
    n_val = min(cfg.val_samples, len(src) // 5)  # never more than a fifth of the split
    val_idx = src.balanced_indices(n_val, seed=cfg.seed + 1) if n_val else np.array([], int)
    train_idx = np.setdiff1d(all_idx, val_idx)
    if cfg.train_samples is not None and cfg.train_samples < len(train_idx):
        sub = ImageSource(name="train", classes=src.classes, labels=src.labels[train_idx])
        train_idx = train_idx[sub.balanced_indices(cfg.train_samples, seed=cfg.seed)]
    if len(train_idx) == 0:
        raise ConfigError("train.val_samples leaves no training images")
    # the whole split, streamed: training and validation images share one decoded-image store of it
    images = data.split_images("train", size, artifact.preprocessing)  # type: ignore[arg-type]
    prep = artifact.preprocessing
    channels = images.shape[-1]
    return TrainData(
        x_train=images.subset(train_idx), y_train=src.labels[train_idx],
        x_val=images.subset(val_idx), y_val=src.labels[val_idx],
        mean=np.asarray(prep.mean[:channels], np.float32), std=np.asarray(prep.std[:channels], np.float32),
        scale=prep.scale,
    )


AUGMENT_PAD = 4
"""random-crop padding of the training augmentation"""


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = AUGMENT_PAD) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, on a uint8 NHWC batch."""
    return augment_share(images, gen, images.shape[0], 0, 1, pad)


def augment_share(images: torch.Tensor, gen: torch.Generator, batch: int, rank: int, size: int,
                  pad: int = AUGMENT_PAD) -> torch.Tensor:
    """``augment`` of a global batch of ``batch`` images, applied to this process's share (every
    size-th image from ``rank``): the same draws as one process makes for the whole batch."""
    import torch

    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    flip = torch.rand(batch, generator=gen) < 0.5
    return crop_flip(images, dy[rank::size], dx[rank::size], flip[rank::size], pad)


def crop_flip(images: torch.Tensor, dy: Any, dx: Any, flip: Any, pad: int = AUGMENT_PAD) -> torch.Tensor:
    """The crop at offsets (dy, dx) of the zero-padded image, mirrored where ``flip``: one view per image."""
    import torch

    n, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out[i] = crop.flip(1) if bool(flip[i]) else crop
    return out


# ---------------------------------------------------------------------- the loop

LossFn = Callable[[Any, "torch.Tensor", "torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(model: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing), logits

    return loss


def evaluate_top1(model: Any, x: np.ndarray, y: np.ndarray, data: TrainData, batch: int = 256) -> float:
    """top-1 % of ``model`` on uint8 images, sharded across processes under torchrun."""
    import torch

    rank, size = world()
    dev = next(model.parameters()).device
    shard = np.arange(rank, len(x), size)
    correct, seen = 0.0, 0.0
    was_training = model.training
    model.eval()
    order = [shard[i : i + batch] for i in range(0, len(shard), batch)]
    with torch.inference_mode():
        for images, ix in zip(in_batches(x, order), order):  # the reader first: zip lets it finish
            logits = model(data.normalise(torch.from_numpy(images)).to(dev))
            correct += float((logits.argmax(1).cpu().numpy() == y[ix]).sum())
            seen += len(ix)
    correct, seen = _sum_over_processes((correct, seen), size)  # the whole held-out set
    model.train(was_training)
    return 100.0 * correct / max(seen, 1)


def train(
    model: Any,
    data: TrainData,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    description: str = "training",
    augment_fn: Callable[[Any, np.ndarray, int], Any] | None = None,
    initial_val: float | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place; it ends with the best validation checkpoint loaded. ``initial_val``:
    the model's validation top-1 before training, which makes the starting point a checkpoint too
    (training that never beats it leaves the model as it was)."""
    import torch

    rank, size = world()
    dev = device()
    torch.manual_seed(cfg.seed + rank)  # dropout: each process its own masks (the model is rank 0's under DDP)
    model.to(dev)
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
    n = len(data.x_train)
    if size > 1 and min(cfg.batch_size, n) < size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} ({n} training images) is less than one image for "
                          f"each of the {size} processes")
    per_rank_batch = max(1, cfg.batch_size // size)
    options = step_options(cfg, dev, model)
    probe = None
    if len(options) > 1:
        ix0 = np.sort(np.random.default_rng(cfg.seed).permutation(n)[rank : rank + per_rank_batch * size : size])
        option, probe = probe_step(model, loss_fn, data.normalise(torch.from_numpy(data.x_train[ix0])).to(dev),
                                   torch.from_numpy(data.y_train[ix0]).to(dev), torch.from_numpy(ix0), dev, options)
        if size > 1:  # every process trains alike: rank 0's measurement decides
            import torch.distributed as dist

            box = [option, probe]
            dist.broadcast_object_list(box, src=0)
            option, probe = box
            set_memory_format(model, option.channels_last)
        log.info("%s: %s (probe of one batch-%d step: %s)", description, option.name, probe["batch"],
                 ", ".join(f"{k} {v:.3f} s" for k, v in probe["s_per_step"].items()))
    else:
        option = options[0]
        set_memory_format(model, option.channels_last)
    bf16, channels_last = option.bf16, option.channels_last
    bf16_probed = len({o.bf16 for o in options}) > 1  # bf16 was the probe's choice, not the recipe's
    net = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    sched = _schedule(opt, cfg, total)
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    bf16_off_at = None
    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process: augment_share draws the global batch's

    best_top1, best_state, history = None, None, []
    if initial_val is not None and len(data.x_val):
        best_top1, best_state = initial_val, copy.deepcopy(model.state_dict())
    started = time.perf_counter()
    waited = [0.0]  # seconds the steps waited for images
    step, epoch = 0, 0
    bar_display = _progress(progress and rank == 0)
    running_loss, running_correct, running_seen = 0.0, 0, 0
    skipped, nonfinite_run = 0, 0
    # a step whose loss is not finite must leave the model as it was, batch-norm statistics included
    buffers = dict(model.named_buffers())
    last_good = {k: b.detach().clone() for k, b in buffers.items()}
    with bar_display as bar, synchronized_batch_norm(model, size):
        task = bar.add_task(description, total=total, loss=float("nan"), acc=float("nan"))
        while step < total:
            # every process: the same permutation and global batches as one process; each takes every
            # size-th image of a batch, so the processes' shares make up the batch one process takes
            perm = np.random.default_rng(cfg.seed + epoch).permutation(n)
            usable = (n // cfg.batch_size) * cfg.batch_size or n
            net.train()
            batches = [np.sort(perm[i : min(i + cfg.batch_size, usable)]) for i in range(0, usable, cfg.batch_size)]
            batches = batches[: total - step]  # the steps left
            # this process's share of every batch, read in order by the decoding workers ahead of the steps
            shares = [batch[rank::size] for batch in batches]
            reader = timed(in_batches(data.x_train, shares), waited)
            for uint8, batch, ix in zip(reader, batches, shares):  # the reader first: zip lets it finish
                if step >= total:
                    break
                images = torch.from_numpy(uint8)
                if cfg.augment:  # augment_fn(images, indices, epoch): e.g. the stored views a cached teacher saw
                    images = augment_fn(images, ix, epoch) if augment_fn is not None else \
                        augment_share(images, gen, len(batch), rank, size)
                xb = data.normalise(images).to(dev)
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yb = torch.from_numpy(data.y_train[ix]).to(dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, logits = loss_fn(net, xb, yb, torch.from_numpy(ix))
                share = len(ix) * size / len(batch)  # DDP averages over processes: weigh by the share of the batch
                opt.zero_grad(set_to_none=True)
                if not _all_finite(loss, size):  # skip the update (every process alike), as AMP's GradScaler does
                    with torch.no_grad():
                        for k, b in buffers.items():
                            b.copy_(last_good[k])
                    skipped += 1
                    nonfinite_run += 1
                    if bf16 and bf16_probed:  # bf16 was this loop's own choice: fall back to fp32
                        bf16, bf16_off_at = False, step + 1
                        log.warning("%s: loss not finite under bf16 autocast at step %d: fp32 from here on",
                                    description, step + 1)
                    if nonfinite_run >= MAX_NONFINITE_STEPS:
                        raise RuntimeError(
                            f"training diverged: the loss was not finite for {nonfinite_run} steps in a row (at step "
                            f"{step + 1} of {total}); lower train.lr{' or set train.bf16: off' if bf16 else ''}")
                    sched.step()
                    step += 1
                    continue
                nonfinite_run = 0
                (loss if share == 1 else loss * share).backward()
                opt.step()
                sched.step()
                step += 1
                with torch.no_grad():
                    for k, b in buffers.items():
                        last_good[k].copy_(b)
                running_loss += float(loss.detach()) * len(ix)
                running_correct += int((logits.detach().argmax(1) == yb).sum())
                running_seen += len(ix)
                bar.update(task, advance=1, loss=running_loss / running_seen, acc=100 * running_correct / running_seen)
                if step % eval_every == 0 or step == total:
                    val = evaluate_top1(model, data.x_val, data.y_val, data) if len(data.x_val) else None
                    running_loss, running_correct, running_seen = _sum_over_processes(
                        (running_loss, running_correct, running_seen), size)  # the global batches' figures
                    history.append({"step": step, "epoch": round(step / steps_per_epoch, 2),
                                    "train_loss": round(running_loss / running_seen, 4),
                                    "train_top1": round(100 * running_correct / running_seen, 2), "val_top1": val,
                                    "seconds": round(time.perf_counter() - started, 1)})
                    log.info("%s step %d/%d: %s", description, step, total, history[-1])
                    running_loss, running_correct, running_seen = 0.0, 0, 0
                    if val is not None and (best_top1 is None or val > best_top1):
                        best_top1, best_state = val, copy.deepcopy(model.state_dict())
                    net.train()
            epoch += 1
    final = history[-1]["val_top1"] if history else None
    if best_state is not None and best_top1 is not None and final is not None and best_top1 > final:
        model.load_state_dict(best_state)
    set_memory_format(model, False)
    model.to("cpu").eval()
    if skipped:
        log.warning("%s: %d of %d steps skipped for a loss that was not finite", description, skipped, step)
    return TrainResult(steps=step, seconds=time.perf_counter() - started, best_val_top1=best_top1,
                       final_val_top1=final, history=history, world_size=size, skipped_steps=skipped,
                       precision=("bf16 autocast" if bf16 else "fp32") if bf16_off_at is None else
                       f"bf16 autocast, fp32 from step {bf16_off_at} (a loss not finite)",
                       memory_format="channels_last" if channels_last else "contiguous", probe=probe, device=str(dev),
                       kept_initial=initial_val is not None and best_top1 == initial_val and final is not None
                       and final < initial_val, data_seconds=waited[0])


MAX_NONFINITE_STEPS = 10
"""consecutive steps with a NaN/inf loss after which training stops with an error"""


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

    t = torch.tensor(values, dtype=torch.float64, device=device())  # NCCL takes CUDA tensors, gloo CPU ones
    dist.all_reduce(t)
    return tuple(float(v) for v in t.cpu())


def _schedule(opt: Any, cfg: TrainConfig, total: int) -> Any:
    import torch

    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    warm = int(cfg.warmup_fraction * total)

    def cosine(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1f}%"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
