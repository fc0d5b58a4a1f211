"""The pass interface: typed config, declared input/output forms, model in -> model out."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .artifact import Form, ModelArtifact
from .errors import CompressorError, ConfigError, PassError, PipelineOrderError, validation_message

if TYPE_CHECKING:
    from .data import DataBundle

log = logging.getLogger(__name__)


class PassConfig(BaseModel):
    """Base of every pass and target config: plain pydantic, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


@dataclass
class PassResult:
    """What a pass returns: the new artifact and the figures it measured (node counts, ...)."""

    artifact: ModelArtifact
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides its input: data, a private work directory, seed, threads."""

    work_dir: Path
    data: DataBundle | None = None
    seed: int = 0
    threads: int | None = None


def make_config(cls: type[BaseModel], config: BaseModel | dict | None, kwargs: dict, field: str) -> Any:
    if isinstance(config, cls):
        if kwargs:
            return cls.model_validate({**config.model_dump(), **kwargs})
        return config
    try:
        return cls.model_validate({**(config or {}), **kwargs})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, field)) from None


class Pass(ABC):
    """A registered transformation. Subclasses set the class attributes and implement run().

    The base class checks the declaration: the input's form is one the pass consumes, and the
    output's form is the one it said it would produce.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    consumes: ClassVar[frozenset[Form]]
    produces: ClassVar[Form | None] = None  # None: the input's form
    needs_data: ClassVar[bool] = False
    libraries: ClassVar[tuple[str, ...]] = ("torch",)
    quantizes: ClassVar[bool] = False
    """whether the output is a quantized (INT8) model: a chain quantizes once (see check_chain)"""

    def __init__(self, config: BaseModel | dict | None = None, /, *, field: str | None = None, **kwargs: Any) -> None:
        self.field = field or self.name
        self.config = make_config(self.Config, config, kwargs, self.field)

    def output_form(self, input_form: Form) -> Form:
        return self.produces or input_form

    def accepts(self, form: Form) -> bool:
        return form in self.consumes

    def check_input(self, form: Form, step: str) -> Form:
        if not self.accepts(form):
            wanted = ", ".join(sorted(f.value for f in self.consumes))
            raise PipelineOrderError(
                f"{step}: pass {self.name!r} cannot take {form.a_model} (it takes: {wanted}); "
                "reorder the passes or add a conversion before it"
            )
        return self.output_form(form)

    def fingerprint(self) -> str | None:
        """Hash of any file the pass reads beside its input (e.g. a teacher), for the cache key."""
        return None

    def preflight(self, artifact: ModelArtifact | None, data: DataBundle | None) -> None:
        """Checks that need the model or data, run for every pass before any pass runs, so a bad
        config fails before hours of training. ``artifact`` is a preview of this pass's input
        (see :meth:`preview`), or None where no preview can be had."""

    def preview(self, artifact: ModelArtifact) -> ModelArtifact | None:
        """A cheap stand-in for this pass's output, for the next pass's preflight: the input
        itself when the pass keeps the form (weights change, structure mostly not), else None."""
        return artifact if self.output_form(artifact.form) is artifact.form else None

    @abstractmethod
    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult: ...

    def __call__(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        expected = self.check_input(artifact.form, self.field)
        if self.needs_data and ctx.data is None:
            raise ConfigError(f"{self.field}: pass {self.name!r} needs calibration data (give the recipe a data section)")
        try:
            result = self.run(artifact, ctx)
        except CompressorError:
            raise
        except Exception as exc:
            raise PassError(f"pass {self.name!r} ({self.field}) failed: {type(exc).__name__}: {_first(exc)}") from exc
        if result.artifact.form is not expected:
            raise PassError(
                f"pass {self.name!r} declared it produces {expected.value} but returned {result.artifact.form.value}"
            )
        return result

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.model_dump(mode="json")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the given distributions (for cache keys and the report)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
