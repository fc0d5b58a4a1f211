"""What every pass and target config shares: plain pydantic models that reject unknown keys, built
from a recipe entry with errors that name the recipe step; and the data contract, declared once."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, validation_message


class StepConfig(BaseModel):
    """Base of every pass and target config: plain pydantic, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def make_config(cls: type[BaseModel], config: BaseModel | dict | None, kwargs: dict, step: str) -> Any:
    """``cls`` from a config object or dict plus keyword overrides; a bad value names ``step``."""
    if isinstance(config, cls):
        if kwargs:
            return cls.model_validate({**config.model_dump(), **kwargs})
        return config
    try:
        return cls.model_validate({**(config or {}), **kwargs})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, step)) from None


def require_data(step: str, kind: str, name: str, needed: bool, has_data: bool) -> None:
    """The one rule for a pass or target that reads calibration or training data."""
    if needed and not has_data:
        raise ConfigError(f"{step}: {kind} {name!r} needs calibration data; add a data section or --data")
