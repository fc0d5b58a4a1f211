"""The target interface: is it available here and why not, build an engine, run batches,
and report what the runtime really used."""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel

from .artifact import Form, ModelArtifact, file_size
from .errors import CompressorError, PipelineOrderError, TargetError, TargetUnavailable
from .config import StepConfig, make_config, require_data
from .intake import load_model
from .staging import OutputError, check_writable, json_text, staged_dir, write_failure

if TYPE_CHECKING:
    from .devices import Device
    from .fidelity.tapper import LayerInfo, Tapper


@dataclass
class Availability:
    ok: bool
    reason: str = ""


class TargetConfig(StepConfig):
    """Base of every target config."""


@dataclass
class Engine:
    """A built engine (or, ``built=False``, the files a device builds it from): its files in the
    output directory, what it is, and the :class:`Target` that made it and can load it."""

    target: str
    name: str
    files: list[Path]
    precision: str
    info: dict[str, Any] = field(default_factory=dict)
    built: bool = True
    builder: Target | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.files[0]

    @property
    def size_bytes(self) -> int:
        return file_size(self.files)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "name": self.name, "files": [str(p) for p in self.files],
                "precision": self.precision, "info": self.info, "built": self.built,
                "step": self.builder.step if self.builder is not None else None}


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
    Config: ClassVar[type[TargetConfig]] = TargetConfig
    consumes: ClassVar[frozenset[Form]]
    libraries: ClassVar[tuple[str, ...]] = ()
    needs_data: ClassVar[bool] = False
    """whether building may need the recipe's calibration data (:meth:`requires_data` says whether
    this instance's config does)"""

    def __init__(self, config: BaseModel | dict | None = None, /, *, step: str | None = None, **kwargs: Any) -> None:
        self.step = step or self.name
        self.config = make_config(self.Config, config, kwargs, self.step)
        self.device: Device | None = None
        """the device the engine is for (the pipeline sets it; None: this machine's profile)"""

    def load_settings(self) -> dict[str, Any]:
        """The settings :meth:`load` runs an engine with beyond its files (e.g. OpenVINO's inference
        precision): two engines are the same only where their files and these are."""
        return {}

    def target_device(self) -> Device:
        from .devices import or_host

        return or_host(self.device)

    def device_refusal(self, device: Device, host: Device) -> str | None:
        """Why this config makes no engine for ``device`` (or cannot be measured honestly on
        ``host``), e.g. a bf16 precision where the CPU has no bf16; None: it can. The engine is
        then reported as not built, with that reason."""
        return None

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

    def requires_data(self) -> bool:
        """Whether building with this config reads the recipe's data: ``needs_data``, and where the config
        has a ``quantization`` field (the mobile targets), only for full-integer ``int8`` (the one that
        calibrates activation ranges). Override where the config decides otherwise."""
        quantization = getattr(self.config, "quantization", None)
        return type(self).needs_data and (quantization is None or quantization == "int8")

    def engine_precision(self, artifact: ModelArtifact) -> str:
        """The precision of the engine built from ``artifact`` (the artifact's, unless the target quantizes)."""
        return artifact.precision

    def engine_name(self, artifact: ModelArtifact) -> str:
        return f"{self.name}-{self.engine_precision(artifact)}"

    def build(self, artifact: ModelArtifact, out_dir: Path, *, prefix: str = "", data: Any = None,
              name: str | None = None) -> Engine:
        """Build into a temporary directory and rename it into ``out_dir/<engine name>`` when complete.

        ``data`` is the job's DataBundle; targets with ``needs_data`` calibrate on it. ``name`` is
        the engine's name as the pipeline assigned it (unique in the run); default: ``prefix`` +
        :meth:`engine_name`."""
        self.check_input(artifact.form, self.step)
        require_data(self.step, "target", self.name, self.requires_data(), data is not None)
        from .devices import host_device

        refusal = self.device_refusal(self.target_device(), host_device())
        if refusal:
            raise TargetUnavailable(f"{self.step}: {refusal}")
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
                precision = self.engine_precision(artifact)
                (tmp / "engine.json").write_text(json_text({
                    "target": self.name, "precision": precision,
                    "config": self.config.model_dump(mode="json"), "lineage": artifact.lineage,
                    "input_hash": artifact.content_hash(), **info}))
        except CompressorError:
            raise
        except Exception as exc:
            full = write_failure(exc, out_dir)  # a full disk is the output's fault, not the target's
            if full is not None:
                raise OutputError(f"cannot write engine {final}: {full}") from exc
            raise TargetError(f"target {self.name!r} failed to build: {type(exc).__name__}: {exc}") from exc
        return Engine(self.name, name, [final / f.name for f in files], precision, info, built=not not_built,
                      builder=self)

    def build_on_device(self, engine_dir: Path, *, precision: str | None = None) -> list[Path]:
        """Build the engine from what was written where this target could not build (its
        ``model.onnx`` in ``engine_dir``, e.g. copied to the Jetson); the built files land beside it."""
        avail = self.availability()
        if not avail.ok:
            raise TargetUnavailable(f"target {self.name!r} is not available here: {avail.reason}")
        check_writable(engine_dir, "engine directory")
        artifact = load_model(engine_dir / "model.onnx")
        artifact.meta["precision"] = precision or artifact.precision
        with tempfile.TemporaryDirectory(dir=engine_dir, prefix=".build-") as tmp:
            files, _ = self._build(artifact, Path(tmp))
            for f in files:
                os.replace(f, engine_dir / f.name)
        return [engine_dir / f.name for f in files]

    @abstractmethod
    def _build(self, artifact: ModelArtifact, tmp_dir: Path, data: Any = None) -> tuple[list[Path], dict[str, Any]]:
        """Write the engine's files into ``tmp_dir``; return them (main file first) and build info."""

    @abstractmethod
    def load(self, engine: Engine, *, threads: int) -> Runner:
        """A runner for the built engine, using exactly ``threads`` threads."""

    def tapper(self, engine: Engine, reference: list[LayerInfo], *, threads: int) -> Tapper:
        """A :class:`compressor.fidelity.tapper.Tapper` reading the engine's per-layer tensors, the
        fidelity contract every target that can should meet (explain, the per-layer SQNR of ``compress
        explain``, and the sensitivity ranking read engines only through it):

        * ``engine``: an engine this target built (``engine.files``; for a target with a proxy, the
          files written for the device: tap its graph on the proxy runtime and say so in ``plan.note``);
        * ``reference``: the reference model's layers in graph order (:class:`compressor.fidelity.tapper.LayerInfo`:
          module name, kind ``conv`` / ``depthwise`` / ``linear``, torch weight shape, the modules its
          tap covers), for targets whose engine keeps no module names and match layers by kind, shape
          and order (LiteRT), or whose backend folds a batch norm into its conv under the batch norm's
          name (OpenVINO); targets whose names map back on their own may ignore it;
        * ``threads``: exactly this many runtime threads;
        * returns a Tapper: ``tapper.plan.layers`` the mapped layers (reference names, graph order),
          ``tapper.plan.unmapped`` the engine's layers it could not name, ``tapper.plan.quantizers``
          each tapped layer's activation range (INT8); ``tapper(x)`` (float32 NCHW batch of any size)
          -> ``{layer: float32 array}`` with channels on axis 1, dequantized; sensitivity:
          ``tapper.bypassed(layer)`` -> a callable x -> logits without that layer's activation
          quantizer, where ``tapper.can_bypass``; ``tapper.close()``.

        A layer is tapped after the activation the backend fuses into it (see
        :mod:`compressor.fidelity.tapper`). Default: NotImplementedError (explain reports the
        engine's layers as not readable, with this message)."""
        raise NotImplementedError(f"target {self.name!r} cannot read its engine's intermediate tensors")

    @classmethod
    def reference_runner(cls, path: Path, *, threads: int) -> Runner:
        """A runner of a model file of this target's input form with the runtime's defaults (an
        intermediate artifact of the pass chain, run as a reference: an ONNX file on ONNX Runtime,
        an OpenVINO IR on OpenVINO). Default: NotImplementedError."""
        raise NotImplementedError(f"target {cls.name!r} runs no reference models")

    @classmethod
    def reference_tapper(cls, path: Path, *, threads: int) -> Tapper:
        """A :class:`compressor.fidelity.tapper.Tapper` of a float model file of this target's input
        form used as the reference of explain (an ONNX source model). Default: NotImplementedError."""
        raise NotImplementedError(f"target {cls.name!r} taps no reference models")

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
