"""Recipes: YAML files validated by pydantic, naming every problem by its field path.

A recipe reads as a flat list of named stages::

    passes:
      - fuse
      - quantize_ptq: {backend: openvino, calibration: minmax}
    targets:
      - openvino
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .artifact import Form, Preprocessing
from .bound import DEFAULT_CONFIDENCE
from .config import non_finite
from .data import DataConfig
from .errors import ConfigError, validation_message
from .evaluate import EvaluationConfig
from .pipeline import BranchSpec, Pipeline
from .registry import get_pass, get_target

SHIPPED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str | None = Field(default=None, description="model file (the CLI argument overrides it)")
    arch: str | None = Field(default=None, description="for state dicts: torchvision:NAME")
    num_classes: int | None = Field(default=None, ge=1)
    trusted: bool = Field(default=False, description="allow loading a pickled nn.Module (runs code from the file)")
    input_shape: list[int] | None = Field(default=None, min_length=4, max_length=4)
    classes: list[str] | None = None
    output: int | str | None = Field(default=None, description="where forward returns several outputs (a tuple, "
                                     "a dict): the index, key or field that holds the logits")

    @field_validator("output", mode="before")
    @classmethod
    def _output_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML's true/yes would pass as index 1
            raise ValueError("an index (0, 1, ...) or a key of the model's outputs, not a boolean")
        return value


class AcceptanceConfig(BaseModel):
    """Limits every emitted engine must meet; a miss makes the run exit 1."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_top1_drop: float | None = Field(default=None, ge=0, description="points of top-1 below the source model: "
                                        "met when the drop's upper confidence bound (at confidence) is within it")
    confidence: float = Field(default=DEFAULT_CONFIDENCE, ge=0.5, lt=1,
                              description="one-sided confidence of the bound max_top1_drop judges (compressor.bound)")
    min_agreement: float | None = Field(default=None, ge=0, le=100, description="% top-1 agreement with the source")
    max_latency_ms: float | None = Field(default=None, gt=0, description="batch-1 p50 budget")
    min_speedup: float | None = Field(default=None, gt=0, description="source p50 / engine p50")
    min_compression: float | None = Field(default=None, gt=0, description="source size / engine size")


Step = str | dict[str, dict[str, Any] | None]


def known_device(name: str) -> str:
    from .devices import NAMES

    if name not in NAMES:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(NAMES)}")
    return name


class Branch(BaseModel):
    """More passes and targets that start from the main chain's output, so that one report puts
    several runtimes side by side (e.g. NNCF INT8 for OpenVINO beside ORT QDQ beside TFLite)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    """prefix of the branch's engine names"""
    passes: list[Step] = Field(default_factory=list)
    targets: list[Step] = Field(min_length=1)
    device: str | None = None
    """the device this branch's engines are for and, with ``--cluster``, timed on (a node that carries
    the resource ``device:NAME``); None: the recipe's device"""

    @field_validator("device")
    @classmethod
    def _known_device(cls, name: str | None) -> str | None:
        return None if name is None else known_device(name)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "recipe"
    description: str = ""
    seed: int = 0
    device: str = "host"
    """the device the engines are for (devices.py: x86-avx2, x86-avx512-vnni, x86-avx512-bf16, x86-amx,
    arm64, jetson-orin); host: this machine's profile. It decides reduce_range / overflow_fix and
    whether bf16 precisions exist, never the machine that runs the recipe"""
    model: ModelSection = Field(default_factory=ModelSection)
    preprocessing: Preprocessing | None = None
    data: DataConfig | None = None
    passes: list[Step] = Field(default_factory=list)
    targets: list[Step] = Field(default_factory=list)
    baselines: list[Step] = Field(default_factory=list)
    """targets that take the source model as it is (e.g. OpenVINO FP32), as fair references"""
    branches: list[Branch] = Field(default_factory=list)
    """side chains from the main chain's output, each with its own passes and targets"""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    acceptance: AcceptanceConfig = Field(default_factory=AcceptanceConfig)

    @field_validator("device")
    @classmethod
    def _known_device(cls, name: str) -> str:
        return known_device(name)

    @model_validator(mode="after")
    def _finite(self) -> Recipe:
        """No NaN or infinity anywhere (``max_drop: .inf`` would pass every ``ge=0`` bound, and
        report.json could not hold it): every section, including each pass's and target's config."""
        where = non_finite(self.model_dump())
        if where:
            raise ValueError(f"{where[0]}: must be a finite number, got {where[1]}")
        return self

    @field_validator("passes", "targets", "baselines")
    @classmethod
    def _one_key(cls, steps: list[Step]) -> list[Step]:
        for i, step in enumerate(steps):
            if isinstance(step, dict) and len(step) != 1:
                raise ValueError(f"item {i} must be a name or a one-key mapping name: {{config}}, got {list(step)}")
        return steps

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _split(step: Step) -> tuple[str, dict[str, Any]]:
        if isinstance(step, str):
            return step, {}
        ((name, config),) = step.items()
        return name, dict(config or {})

    def build_passes(self, steps: list[Step] | None = None, section: str = "passes") -> list[Any]:
        out = []
        for i, step in enumerate(self.passes if steps is None else steps):
            name, config = self._split(step)
            out.append(get_pass(name, f"{section}[{i}]")(config, step=f"{section}[{i}].{name}"))
        return out

    def build_targets(self, section: str = "targets", steps: list[Step] | None = None) -> list[Any]:
        out = []
        for i, step in enumerate(getattr(self, section) if steps is None else steps):
            name, config = self._split(step)
            out.append(get_target(name, f"{section}[{i}]")(config, step=f"{section}[{i}].{name}"))
        return out

    def build_branches(self) -> list[Any]:
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names):
            raise ConfigError(f"branches: names must differ, got {names}")
        return [BranchSpec(b.name, self.build_passes(b.passes, f"branches[{i}].passes"),
                           self.build_targets(f"branches[{i}].targets", b.targets), device=b.device)
                for i, b in enumerate(self.branches)]

    def pipeline(self, **kwargs: Any) -> Pipeline:
        """The recipe's pass manager (its passes, targets, baselines and branches); ``kwargs`` go to
        :class:`~compressor.pipeline.Pipeline` (hooks, cache)."""
        targets = self.build_targets()
        if not targets:
            raise ConfigError("targets: a recipe needs at least one target")
        return Pipeline(self.build_passes(), targets, baselines=self.build_targets("baselines"),
                        branches=self.build_branches(), seed=self.seed, **kwargs)

    def check(self, input_form: Form = Form.TORCH) -> list[Form]:
        """Validate every pass/target config, the chain of forms, and that the device runs every
        target; return the forms after each pass."""
        pipeline = self.pipeline()
        check_pipeline_devices(self.device, pipeline)
        return pipeline.check(input_form)  # the same checks as before a run

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False)


def check_pipeline_devices(device: str | None, pipeline: Pipeline) -> None:
    """:func:`check_device_targets` for every chain: a branch's targets against its own device."""
    check_device_targets(device, [*pipeline.baselines, *pipeline.targets])
    for b in pipeline.branches:
        check_device_targets(b.device or device, b.targets)


def check_device_targets(device: str | None, targets: list[Any]) -> None:
    """Refuse a target whose engines do not run on the named device (``device: jetson-orin`` with
    an ``openvino`` target). ``host`` (or None) names no device: a target this machine cannot build
    is reported as not built here, as before."""
    from .devices import DEVICES

    if device in (None, "host"):
        return
    profile = DEVICES[device]
    for t in targets:
        if t.name not in profile.targets:
            raise ConfigError(f"{t.step}: device {device!r} does not run {t.name!r} engines (it runs: "
                              f"{', '.join(profile.targets)}); remove the target or name another device")


def find_recipe(ref: str | Path) -> Path:
    """A recipe path, or the name of a shipped recipe (``int8_jetson`` or ``int8_jetson.yaml``)."""
    path = Path(ref)
    if path.is_file():
        return path
    for cand in (SHIPPED_RECIPES / path.name, SHIPPED_RECIPES / f"{path.name}.yaml"):
        if path.parent == Path(".") and cand.is_file():
            return cand
    raise ConfigError(f"recipe not found: {ref} (shipped recipes: {', '.join(shipped_recipes())})")


def shipped_recipes() -> list[str]:
    return sorted(p.name for p in SHIPPED_RECIPES.glob("*.yaml"))


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last one, so ``device:`` twice would silently take the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first given at line {seen + 1})", key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(ref: str | Path) -> tuple[Recipe, Path]:
    """Parse and validate a recipe; return it and the file it came from."""
    path = find_recipe(ref)
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    raw = expand_variables(raw, {"RECIPE_DIR": str(path.resolve().parent)}, source=str(path))
    return parse_recipe(raw, source=str(path)), path


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_variables(value: Any, extra: dict[str, str], source: str, where: str = "") -> Any:
    """``${RECIPE_DIR}`` (the recipe's directory) and ``${ENV_VAR}`` in string values."""
    if isinstance(value, dict):
        return {k: expand_variables(v, extra, source, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_variables(v, extra, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in extra:
                return extra[name]
            if name in os.environ:
                return os.environ[name]
            raise ConfigError(f"{source}: {where}: variable ${{{name}}} is not set")

        return _VAR.sub(sub, value)
    return value


def parse_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    where = non_finite(raw)
    if where:
        raise ConfigError(f"{source}: {where[0]}: must be a finite number, got {where[1]}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from None
    try:
        recipe.build_passes()
        recipe.build_targets()
        recipe.build_targets("baselines")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return recipe
