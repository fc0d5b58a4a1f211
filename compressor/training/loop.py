"""The training loop: the training and held-out validation images, top-1 on them, and ``train``."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import ConfigError
from ..image_source import ImageSource
from ..streaming import in_batches, timed
from .augment import augment_share
from .config import TrainConfig
from .launch import _all_finite, _sum_over_processes, synchronized_batch_norm, torch_device, world
from .losses import LossFn, cross_entropy_loss
from .probe import probe_step, set_memory_format, step_options

if TYPE_CHECKING:
    import torch

    from ..artifact import ModelArtifact
    from ..data import DataBundle
    from ..streaming import ImageSet

log = logging.getLogger(__name__)


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
    torch_device: str = "cpu"  # where it trained (torch's device), not the device profile the engines are for
    kept_initial: bool = False  # no checkpoint beat the starting model on validation: it was restored
    data_seconds: float = 0.0  # the time the steps waited for their training images (decoding, reading)

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "best_val_top1": self.best_val_top1,
                "final_val_top1": self.final_val_top1, "world_size": self.world_size,
                "skipped_steps": self.skipped_steps, "precision": self.precision,
                "memory_format": self.memory_format, "probe": self.probe, "device": self.torch_device,
                "kept_initial": self.kept_initial, "data_seconds": round(self.data_seconds, 1),
                "history": self.history}


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
    dev = torch_device()
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
                       memory_format="channels_last" if channels_last else "contiguous", probe=probe,
                       torch_device=str(dev),
                       kept_initial=initial_val is not None and best_top1 == initial_val and final is not None
                       and final < initial_val, data_seconds=waited[0])


MAX_NONFINITE_STEPS = 10
"""consecutive steps with a NaN/inf loss after which training stops with an error"""


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
