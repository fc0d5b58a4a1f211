"""bf16 autocast and channels-last memory: which to train with. On a GPU bf16 where supported; on a
CPU each is measured on the model's own training step before training (:func:`probe_step`) and kept
only where it is faster."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..environment import has_native_bf16

if TYPE_CHECKING:
    from .config import TrainConfig
    from .losses import LossFn

log = logging.getLogger(__name__)


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
