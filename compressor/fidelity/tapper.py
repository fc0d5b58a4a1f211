"""The per-layer contract: what a target's :meth:`compressor.target_base.Target.tapper` returns.

A layer is a conv / linear op of the source model, named by the source's module name
(``layer1.0.conv1``), and its tap is its output after the activation its backend fuses into it, as
the next layer consumes it: the dequantized value where a quantizer follows. One rule decides where
a layer's tap sits, on every graph: start at the conv / linear op, follow the single consumer while
it is a batch norm, a bias add or an activation, then take the quantizer that follows, if any. A
layer of the engine that cannot be named is reported as unmapped (:attr:`TapPlan.unmapped`), never
dropped."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class LayerInfo:
    """A conv / linear layer of the reference model, in graph order."""

    name: str
    kind: str  # conv, depthwise, linear
    weight_shape: tuple[int, ...]  # torch layout: [O, I/groups, kh, kw] or [O, I]
    modules: tuple[str, ...] = ()  # the modules its tap covers (conv, its batch norm, its activation)


@dataclass
class Quantizer:
    """The activation quantizer on a layer's tap: its integer range mapped back to floats."""

    low: float
    high: float


@dataclass
class TapPlan:
    layers: list[str] = field(default_factory=list)  # mapped reference names, graph order
    unmapped: list[str] = field(default_factory=list)  # the engine's own names of layers not mapped
    quantizers: dict[str, Quantizer] = field(default_factory=dict)
    note: str = ""


Logits = Callable[[np.ndarray], np.ndarray]
"""x (float32 NCHW batch) -> logits (numpy, one row per sample)"""


class Tapper(ABC):
    """Reads one engine's (or the reference's) per-layer tensors.

    * :attr:`plan`: the layers it taps (reference names, graph order), the engine's layers it could
      not name, each tapped layer's activation :class:`Quantizer` (INT8 engines), and a note on how
      the taps are read;
    * ``tapper(x)``: float32 NCHW batch -> ``{layer: float32 array}``, one entry per name of
      ``plan.layers``, channels on axis 1 (NCHW, whatever the runtime's own layout), batch on axis 0,
      dequantized where the tap is an integer tensor;
    * :meth:`bypassed` (sensitivity): where :attr:`can_bypass`, a runner of the same engine with
      one layer's activation quantizer taken out, so the output SQNR it wins back can be measured;
    * :meth:`close`: frees the runtime's sessions."""

    plan: TapPlan
    can_bypass: bool = False
    """whether :meth:`bypassed` works (an INT8 graph with a float path around each quantizer)"""

    @abstractmethod
    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]: ...

    def bypassed(self, layer: str) -> Logits:
        """A callable x -> logits running the model with ``layer``'s activation quantizer removed
        (``layer``: a key of ``plan.quantizers``). Only where :attr:`can_bypass`."""
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional
        pass
