"""What every pass and target config shares: plain pydantic models that reject unknown keys, built
from a recipe entry with errors that name the recipe step; and the data contract, declared once."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, validation_message


class StepConfig(BaseModel):
    """Base of every pass and target config: plain pydantic, unknown keys rejected, and no NaN or
    infinity in a float field (``max_drop: .inf`` would pass a ``ge=0`` bound)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


def make_config(cls: type[BaseModel], config: BaseModel | dict | None, kwargs: dict, step: str) -> Any:
    """``cls`` from a config object or dict plus keyword overrides; a bad value names ``step``.
    NaN and infinity are refused in every field, nested models (e.g. a training config) included."""
    if isinstance(config, cls):
        if not kwargs:
            return config
        config = config.model_dump()
    try:
        made = cls.model_validate({**(config or {}), **kwargs})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, step)) from None
    where = non_finite(made.model_dump(), step)
    if where:
        raise ConfigError(f"{where[0]}: must be a finite number, got {where[1]}")
    return made


def non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """The first NaN or infinity in a nested value, as (its field path, the value); None: none."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "value", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        sub = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        found = non_finite(item, sub)
        if found:
            return found
    return None


def require_data(step: str, kind: str, name: str, needed: bool, has_data: bool) -> None:
    """The one rule for a pass or target that reads calibration or training data."""
    if needed and not has_data:
        raise ConfigError(f"{step}: {kind} {name!r} needs calibration data; add a data section or --data")
