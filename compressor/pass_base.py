"""The pass interface: typed config, declared input/output forms, model in -> model out."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from .artifact import Form, ModelArtifact
from .config import StepConfig, make_config, require_data
from .errors import CompressorError, PassError, PipelineOrderError, first_line

if TYPE_CHECKING:
    from .data import DataBundle
    from .devices import Device

log = logging.getLogger(__name__)


class PassConfig(StepConfig):
    """Base of every pass config."""


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
    cache_dir: Path | None = None  # the pass cache's root, for stores a pass shares across runs (teacher outputs)
    source: ModelArtifact | None = None  # the pipeline's input model (a teacher a later pass may distil from again)
    device: Device | None = None  # the device the engines are for (devices.py); None: this machine's profile
    progress: bool = True  # training bars on the console (off under -q: no ProgressHook in the run)

    def target_device(self) -> Device:
        from .devices import or_host

        return or_host(self.device)


class Pass(ABC):
    """A registered transformation. Subclasses set the class attributes and implement run().

    The base class enforces the declaration around :meth:`run`, as onnx-ir's passes do: before it
    (requires) the input's form is one the pass consumes and data is there if the config needs it;
    after it (ensures) the output has the form the pass said it would produce, and the pass's own
    :meth:`ensures` checks hold (numerics kept by a fusion, a valid ONNX graph, finite outputs).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    consumes: ClassVar[frozenset[Form]]
    produces: ClassVar[Form | None] = None  # None: the input's form
    needs_data: ClassVar[bool] = False
    """whether the pass may read calibration or training data (:meth:`requires_data` says whether
    this instance's config does)"""
    libraries: ClassVar[tuple[str, ...]] = ("torch",)
    """distributions whose versions key the pass cache (:meth:`used_libraries` per config)"""
    quantizes: ClassVar[bool] = False
    """whether the output is a quantized (INT8) model: a chain quantizes once (see check_chain)"""
    uses_device: ClassVar[bool] = False
    """whether the output depends on the device the engines are for (ctx.device): the device then
    keys the pass cache"""

    def __init__(self, config: BaseModel | dict | None = None, /, *, step: str | None = None, **kwargs: Any) -> None:
        self.step = step or self.name
        self.config = make_config(self.Config, config, kwargs, self.step)

    def requires_data(self) -> bool:
        """Whether this pass, with this config, reads the recipe's data. Override where the config decides."""
        return type(self).needs_data

    def used_libraries(self) -> tuple[str, ...]:
        """The libraries this pass, with this config, calls (their versions key the pass cache)."""
        return type(self).libraries

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

    def uses_source(self) -> bool:
        """Whether this pass, with this config, reads the run's input model besides its own input
        (ctx.source, e.g. as a teacher): the source's hash then keys the pass cache."""
        return False

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

    def ensures(self, before: ModelArtifact, result: PassResult, ctx: PassContext) -> None:
        """Checks of the pass's output, run after every run (not on a cached output, which passed
        them when it was made). Raise to fail the pass; the message names what does not hold."""

    def __call__(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        expected = self.check_input(artifact.form, self.step)
        require_data(self.step, "pass", self.name, self.requires_data(), ctx.data is not None)
        try:
            result = self.run(artifact, ctx)
            if result.artifact.form is not expected:
                raise PassError(f"pass {self.name!r} declared it produces {expected.value} but returned "
                                f"{result.artifact.form.value}")
            self.ensures(artifact, result, ctx)
        except CompressorError:
            raise
        except Exception as exc:
            raise PassError(f"pass {self.name!r} ({self.step}) failed: {type(exc).__name__}: {first_line(exc)}") from exc
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
