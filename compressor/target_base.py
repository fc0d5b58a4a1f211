"""The target interface: is it available here and why not, build an engine, run batches,
and report what the runtime really used."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from .artifact import Form, ModelArtifact, file_size
from .errors import CompressorError, PipelineOrderError, TargetError, TargetUnavailable
from .pass_base import PassConfig, make_config
from .staging import OutputError, staged_dir


@dataclass
class Availability:
    ok: bool
    reason: str = ""


@dataclass
class Engine:
    """A built engine: its files in the output directory and what it is."""

    target: str
    name: str
    files: list[Path]
    precision: str
    info: dict[str, Any] = field(default_factory=dict)
    built: bool = True

    @property
    def path(self) -> Path:
        return self.files[0]

    @property
    def size_bytes(self) -> int:
        return file_size(self.files)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = [str(p) for p in self.files]
        return d


class Runner(ABC):
    """Runs float32 NCHW batches through one runtime and returns logits as numpy."""

    name: str = ""

    def prepare(self, batch: int) -> None:  # noqa: B027 - optional hook
        """Get ready for batches of this size (e.g. compile a static-shape model)."""

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def runtime_info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class Target(ABC):
    """A registered backend. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    consumes: ClassVar[frozenset[Form]]
    libraries: ClassVar[tuple[str, ...]] = ()
    needs_data: ClassVar[bool] = False
    """whether building needs the recipe's calibration data (instances may set it from their config)"""

    def __init__(self, config: BaseModel | dict | None = None, /, *, field: str | None = None, **kwargs: Any) -> None:
        self.field = field or self.name
        self.config = make_config(self.Config, config, kwargs, self.field)

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Whether this machine can build and run the engine, and if not, why."""

    def check_input(self, form: Form, step: str) -> None:
        if form not in self.consumes:
            wanted = ", ".join(sorted(f.value for f in self.consumes))
            raise PipelineOrderError(
                f"{step}: target {self.name!r} cannot take {form.a_model} (it takes: {wanted})"
            )

    def engine_name(self, artifact: ModelArtifact) -> str:
        return f"{self.name}-{artifact.precision}"

    def build(self, artifact: ModelArtifact, out_dir: Path, *, prefix: str = "", data: Any = None,
              name: str | None = None) -> Engine:
        """Build into a temporary directory and rename it into ``out_dir/<engine name>`` when complete.

        ``data`` is the job's DataBundle; targets with ``needs_data`` calibrate on it. ``name`` is
        the engine's name as the pipeline assigned it (unique in the run); default: ``prefix`` +
        :meth:`engine_name`."""
        self.check_input(artifact.form, self.field)
        if self.needs_data and data is None:
            raise TargetError(f"{self.field}: target {self.name!r} needs calibration data; add a data section or --data")
        avail = self.availability()
        not_built = None if avail.ok else f"target {self.name!r} is not available here: {avail.reason}"
        if not_built and not self.has_proxy:
            raise TargetUnavailable(not_built)
        name = name or prefix + self.engine_name(artifact)
        final = out_dir / name
        if final.exists() and not (final / "engine.json").is_file():
            raise OutputError(f"{final} exists and is not an engine directory: not replacing it")
        try:
            with staged_dir(final, replace=True, what="engine") as tmp:
                if not_built:
                    files, info = self._build_portable(artifact, tmp, not_built)
                    info["not_built"] = not_built
                else:
                    files, info = self._build(artifact, tmp, data)
                (tmp / "engine.json").write_text(json.dumps({
                    "target": self.name, "precision": artifact.precision,
                    "config": self.config.model_dump(mode="json"), "lineage": artifact.lineage, **info},
                    indent=1, default=str))
        except CompressorError:
            raise
        except Exception as exc:
            raise TargetError(f"target {self.name!r} failed to build: {type(exc).__name__}: {exc}") from exc
        return Engine(self.name, name, [final / f.name for f in files], artifact.precision, info, built=not not_built)

    @abstractmethod
    def _build(self, artifact: ModelArtifact, tmp_dir: Path, data: Any = None) -> tuple[list[Path], dict[str, Any]]:
        """Write the engine's files into ``tmp_dir``; return them (main file first) and build info."""

    @abstractmethod
    def load(self, engine: Engine, *, threads: int) -> Runner:
        """A runner for the built engine, using exactly ``threads`` threads."""

    # Targets whose engine is built on the device (TensorRT on a Jetson) set ``has_proxy``: where
    # they are unavailable, they still write what the device needs to build it and name a runtime
    # that runs the same graph here as the closest proxy for its accuracy.
    has_proxy: ClassVar[bool] = False

    def _build_portable(self, artifact: ModelArtifact, tmp_dir: Path, reason: str) -> tuple[list[Path], dict[str, Any]]:
        """Write the engine's inputs and build command without building it."""
        raise NotImplementedError

    def load_proxy(self, engine: Engine, *, threads: int) -> tuple[str, Runner]:
        """(proxy runtime's name, runner) for an engine that was not built here."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.model_dump(mode="json")}
