"""Registries of passes and targets.

Built-in passes live in ``compressor/passes/<name>.py`` and targets in
``compressor/targets/<name>.py``; each module registers one class whose ``name`` equals the
file name. Modules only import their heavy backends inside methods, so listing the registry is
cheap and ``import compressor`` loads no runtime.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from .pass_base import Pass
    from .target_base import Target

_PASSES: dict[str, type[Pass]] = {}
_TARGETS: dict[str, type[Target]] = {}
_loaded = False

T = TypeVar("T")


def register_pass(cls: type[T]) -> type[T]:
    name = cls.name  # type: ignore[attr-defined]
    if name in _PASSES and _PASSES[name] is not cls:
        raise ValueError(f"pass {name!r} is registered twice")
    _PASSES[name] = cls  # type: ignore[assignment]
    return cls


def register_target(cls: type[T]) -> type[T]:
    name = cls.name  # type: ignore[attr-defined]
    if name in _TARGETS and _TARGETS[name] is not cls:
        raise ValueError(f"target {name!r} is registered twice")
    _TARGETS[name] = cls  # type: ignore[assignment]
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    for package in ("compressor.passes", "compressor.targets"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
    _loaded = True


def pass_registry() -> dict[str, type[Pass]]:
    _load_builtins()
    return dict(sorted(_PASSES.items()))


def target_registry() -> dict[str, type[Target]]:
    _load_builtins()
    return dict(sorted(_TARGETS.items()))


def get_pass(name: str, step: str = "passes") -> type[Pass]:
    known = pass_registry()
    if name not in known:
        raise ConfigError(f"{step}: unknown pass {name!r} (known: {', '.join(known)})")
    return known[name]


def get_target(name: str, step: str = "targets") -> type[Target]:
    known = target_registry()
    if name not in known:
        raise ConfigError(f"{step}: unknown target {name!r} (known: {', '.join(known)})")
    return known[name]
