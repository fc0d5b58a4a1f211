"""One compression job, as the CLI runs it: recipe + model file + data -> engines and report,
written atomically into the output directory (a failed job leaves nothing behind)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import Form
from .data import DataBundle, add_search_root, open_data
from .errors import ConfigError, TargetUnavailable
from .hooks import Hook, LoggingHook, TimingHook
from .intake import load_model
from .pipeline import PassCache, Pipeline
from .training import world
from .recipe import Recipe
from .compare import save_samples
from .report import build_report, replace_dir, write_report

log = logging.getLogger(__name__)


@dataclass
class JobOptions:
    out_dir: Path | None = None
    arch: str | None = None
    num_classes: int | None = None
    trust_model: bool = False
    data_root: str | None = None
    threads: int | None = None
    eval_limit: int | None = None
    cache_dir: Path | None = None
    use_cache: bool = True
    require_targets: bool = False
    hooks: list[Hook] = field(default_factory=list)


@dataclass
class JobResult:
    report: dict[str, Any]
    out_dir: Path
    exit_code: int


def guess_form(path: Path) -> Form:
    suffix = path.suffix.lower()
    return {".onnx": Form.ONNX, ".pt2": Form.EXPORTED}.get(suffix, Form.TORCH)


def default_out_dir(model_path: Path, recipe: Recipe) -> Path:
    return Path("compress-out") / f"{model_path.stem}-{recipe.name}"


def prepare_data(recipe: Recipe, recipe_dir: Path | None, options: JobOptions, model_path: Path) -> DataBundle | None:
    if recipe.data is None and options.data_root is None:
        return None
    cfg = (recipe.data or _default_data()).model_copy(deep=True)
    base = recipe_dir
    if options.data_root is not None:
        cfg.root = str(Path(options.data_root).resolve())
        if cfg.source == "digits":  # a directory given on the command line is an ImageFolder tree
            cfg.source = "folder"
        base = None
    if options.eval_limit is not None:
        cfg.evaluation.limit = options.eval_limit
    # Named data sets are also looked for in a datasets/ directory beside the model's directory.
    add_search_root(model_path.resolve().parent.parent / "datasets")
    return open_data(cfg, base_dir=base)


def _default_data() -> Any:
    from .data import DataConfig

    return DataConfig()


def run_job(model_path: Path, recipe: Recipe, recipe_path: Path | None, options: JobOptions) -> JobResult:
    """Run a recipe on a model file; write engines + report.json + report.md into the out dir."""
    model_path = Path(model_path)
    passes, targets = recipe.build_passes(), recipe.build_targets()
    if not targets:
        raise ConfigError("targets: a recipe needs at least one target")
    branches = recipe.build_branches()
    pipeline = Pipeline(passes, targets, baselines=recipe.build_targets("baselines"), branches=branches,
                        seed=recipe.seed)
    passes = [*passes, *(p for b in branches for p in b.passes)]
    pipeline.check(guess_form(model_path))  # fail fast, before loading anything heavy
    if options.require_targets:
        for t in pipeline.all_targets():
            avail = t.availability()
            if not avail.ok:
                raise TargetUnavailable(f"{t.field}: target {t.name!r} cannot build here ({avail.reason}) "
                                        "and --require-targets is set")
    needs_data = [f"pass {p.name!r}" for p in passes if p.needs_data]
    needs_data += [f"target {t.name!r}" for t in pipeline.all_targets() if t.needs_data]
    if needs_data and recipe.data is None and options.data_root is None:
        raise ConfigError(f"data: {needs_data[0]} needs calibration data; add a data section or --data")

    m = recipe.model
    artifact = load_model(
        model_path,
        arch=options.arch or m.arch,
        num_classes=options.num_classes or m.num_classes,
        trust=options.trust_model or m.trusted,
        input_shape=m.input_shape,
        preprocessing=recipe.preprocessing,
        classes=m.classes,
    )
    data = prepare_data(recipe, recipe_path.parent if recipe_path else None, options, model_path)

    out_dir = Path(options.out_dir) if options.out_dir else default_out_dir(model_path, recipe)
    timing = TimingHook()
    evaluation = recipe.evaluation.model_copy()
    if options.threads is not None:
        evaluation.threads = options.threads
    rank, world_size = world()
    cache = PassCache(options.cache_dir or PassCache.default_root()) if options.use_cache else None
    if rank != 0:
        # Under torchrun every process runs the passes (training passes train together with
        # DDP); only the first process writes the cache, builds engines, measures and reports.
        pipeline.hooks.hooks = [LoggingHook()]
        pipeline.cache = ReadOnlyCache(cache.root) if cache else None
        pipeline.run(artifact, data=data, out_dir=None, evaluation=evaluation)
        return JobResult(report={}, out_dir=out_dir, exit_code=0)
    pipeline.hooks.hooks = [LoggingHook(), timing, *options.hooks]
    pipeline.cache = cache
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        result = pipeline.run(artifact, data=data, out_dir=staging, evaluation=evaluation)
        report = build_report(
            result,
            recipe_name=recipe.name,
            recipe=recipe.model_dump(mode="json", exclude_defaults=True),
            model_path=str(model_path),
            data=data,
            limits=recipe.acceptance,
            timings=timing.timings,
        )
        report["world_size"] = world_size
        report["samples"] = save_samples(result, data, staging)  # what compress compare needs
        _relocate_paths(report, staging, out_dir)
        write_report(report, staging)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    failed_targets = [f for f in result.failures if options.require_targets or not f.unavailable]
    exit_code = 0 if report["acceptance"]["passed"] and not failed_targets else 1
    return JobResult(report=report, out_dir=out_dir, exit_code=exit_code)


class ReadOnlyCache(PassCache):
    """Reads finished entries but writes none (the other processes of a torchrun job)."""

    def put(self, key: str, artifact: Any, metrics: dict[str, Any]) -> Any:
        return artifact


def _relocate_paths(report: dict[str, Any], staging: Path, out_dir: Path) -> None:
    """Engine paths in the report point where they will live after the rename."""
    old, new = str(staging), str(out_dir)
    for e in report["engines"]:
        e["files"] = [f.replace(old, new, 1) for f in e["files"]]
    for r in report["results"]:
        if r.get("engine") and r["engine"].startswith(old):
            r["engine"] = r["engine"].replace(old, new, 1)
