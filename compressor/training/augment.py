"""The training augmentation: random crop with zero padding and random horizontal flip, on uint8
NHWC batches, drawn for the whole global batch under torchrun and applied to each process's share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


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
