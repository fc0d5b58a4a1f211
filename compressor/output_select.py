"""The logits of a model whose forward returns several outputs (a tuple, a list, a named tuple or
a dict, e.g. a model with an auxiliary head): the recipe's ``model.output`` says which one, and
intake wraps the model in :class:`SelectOutput` so every pass, target and runner sees one tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SelectOutput(nn.Module):
    """``module(x)[key]`` (an index of a tuple or list, a key of a dict), or ``getattr(module(x), key)``
    (a field of a named tuple) with ``attribute``: decided once, so FX, tracing and export see one op."""

    def __init__(self, module: nn.Module, key: int | str, attribute: bool = False) -> None:
        super().__init__()
        self.module = module
        self.key = key
        self.attribute = attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return getattr(out, self.key) if self.attribute else out[self.key]


def resolve(out: Any, key: int | str) -> tuple[tuple[int | str, bool] | None, str | None]:
    """((key, attribute) for :class:`SelectOutput`, None), or (None, why ``key`` names none of ``out``'s
    outputs). A digit string indexes a tuple or list (a YAML ``"0"``)."""
    if isinstance(out, dict):
        if key in out:
            return (key, False), None
        return None, f"is not one of its keys ({', '.join(map(str, out))})"
    fields = getattr(out, "_fields", None)
    if isinstance(key, str) and fields and key in fields:
        return (key, True), None
    if isinstance(key, str) and key.lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, int) and -len(out) <= key < len(out):
        return (key, False), None
    names = f"; its fields: {', '.join(fields)}" if fields else ""
    return None, f"is not an index of its {len(out)} outputs (0 to {len(out) - 1}{names})"


def describe(out: Any) -> str:
    """``a tuple of 2 outputs (0: tensor [2, 10], 1: tensor [2, 5])``, ``a dict (logits: tensor [2, 10])``."""
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor {list(value.shape)}"
        return type(value).__name__

    if isinstance(out, dict):
        items = ", ".join(f"{k}: {one(v)}" for k, v in out.items())
        return f"a {type(out).__name__} ({items})"
    if not isinstance(out, (tuple, list)):
        return f"a {type(out).__name__}" if out is not None else "None"
    fields = getattr(out, "_fields", None) or range(len(out))
    items = ", ".join(f"{k}: {one(v)}" for k, v in zip(fields, out))
    return f"a {type(out).__name__} of {len(out)} outputs ({items})"
