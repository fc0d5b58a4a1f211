"""One compression job, as the CLI runs it: recipe + model file + data -> engines and report,
written atomically into the output directory (a failed job leaves nothing behind). The output
directory's layout and the rule for writing it are :mod:`compressor.run_dir`'s."""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .artifact import Form
from .data import DataBundle, DataConfig, add_search_root, open_data
from .devices import describe as describe_device
from .devices import host_device
from .devices import resolve as resolve_device
from .errors import CompressorError, ConfigError, TargetUnavailable
from .hooks import Hook, LoggingHook, TimingHook
from .intake import load_model
from .pass_cache import PassCache, ReadOnlyCache
from .pipeline import Pipeline
from .training import world
from .recipe import Recipe, check_pipeline_devices
from .compare import save_samples
from .fidelity.render import EXPLAIN_FILES
from .fingerprints import file_fingerprint
from .report import build_report, write_report
from .run_dir import (SERVING_FILES, default_out_dir, engines_of_run, preflight_out_dir, refuse_other_inputs,
                      run_dir_report, with_run_options)
from .staging import OutputError, check_writable, describe_os_error, run_tempdir, staged_dir, write_failure

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
    device_profile: str | None = None  # --device: the device profile the engines are for; overrides the recipe's device
    overwrite: bool = False  # replace a previous run's output directory
    cluster: str | None = None  # --cluster: auto, HOST:PORT or ray://HOST:PORT (compressor.cluster); None: this process
    hooks: list[Hook] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)  # copied into the output beside the report


@dataclass
class JobResult:
    report: dict[str, Any]
    out_dir: Path
    exit_code: int


def guess_form(path: Path) -> Form:
    suffix = path.suffix.lower()
    return {".onnx": Form.ONNX, ".pt2": Form.EXPORTED}.get(suffix, Form.TORCH)


def prepare_data(recipe: Recipe, recipe_dir: Path | None, options: JobOptions, model_path: Path) -> DataBundle | None:
    if recipe.data is None and options.data_root is None:
        return None
    cfg = (recipe.data or DataConfig()).model_copy(deep=True)
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


def data_input_shape(data: DataBundle | None, color: str) -> list[int] | None:
    """The input shape the data gives a model that names none: batch 1, 3 channels (1 for colour
    mode L), the images' stored size; None without data or when the images differ in size."""
    size = data.image_size() if data is not None else None
    if size is None:
        return None
    shape = [1, 1 if color == "L" else 3, *size]
    log.info("input shape %s taken from the data's images", shape)
    return shape


@dataclass
class JobPlan:
    """Everything decided before anything heavy is loaded: the pipeline (with its hooks and cache),
    where the output goes, and how the run is measured."""

    model_path: Path
    recipe: Recipe
    recipe_path: Path | None
    options: JobOptions
    pipeline: Pipeline
    out_dir: Path
    evaluation: Any
    timing: TimingHook
    rank: int
    world_size: int


def run_job(model_path: Path, recipe: Recipe, recipe_path: Path | None, options: JobOptions) -> JobResult:
    """Run a recipe on a model file: plan -> load -> run -> write (engines, report.json, report.md)."""
    plan = plan_job(Path(model_path), recipe, recipe_path, options)
    artifact, data = load_inputs(plan)
    with cluster_for(options.cluster, plan), run_tempdir():
        if plan.rank != 0:
            # Under torchrun every process runs the passes (training passes train together with
            # DDP); only the first one writes the cache, builds engines, measures and reports.
            plan.pipeline.run(artifact, data=data, out_dir=None, evaluation=plan.evaluation)
            return JobResult(report={}, out_dir=plan.out_dir, exit_code=0)
        return run_and_write(plan, artifact, data)


@contextlib.contextmanager
def cluster_for(address: str | None, plan: JobPlan) -> Iterator[Any]:
    """With ``--cluster``: the Ray cluster the plan's pipeline builds branches and times devices on, for
    as long as the block runs (a local one started for it stops with it). Without: nothing."""
    if address is None or plan.pipeline is None:
        yield None
        return
    if plan.world_size > 1:
        raise ConfigError("--cluster and torchrun are two ways of spreading one run: use one of them")
    from .cluster import Cluster

    with Cluster(address) as cluster:
        plan.pipeline.cluster = cluster
        try:
            yield cluster
        finally:
            plan.pipeline.cluster = None


def plan_job(model_path: Path, recipe: Recipe, recipe_path: Path | None, options: JobOptions) -> JobPlan:
    """Check the recipe, the data it needs, the output directory and the cache; build the pipeline."""
    targets = recipe.build_targets()
    if not targets:
        raise ConfigError("targets: a recipe needs at least one target")
    rank, world_size = world()
    timing = TimingHook()
    cache_root = options.cache_dir or PassCache.default_root()
    cache = None
    if options.use_cache:
        cache = PassCache(cache_root) if rank == 0 else ReadOnlyCache(cache_root)
    hooks = [LoggingHook(), timing, *options.hooks] if rank == 0 else [LoggingHook()]
    pipeline = Pipeline(recipe.build_passes(), targets, baselines=recipe.build_targets("baselines"),
                        branches=recipe.build_branches(), hooks=hooks, cache=cache, seed=recipe.seed,
                        device=resolve_device(options.device_profile or recipe.device),
                        device_request=options.device_profile or recipe.device)
    check_pipeline_devices(options.device_profile or recipe.device, pipeline)
    pipeline.check(guess_form(model_path))  # fail fast, before loading anything heavy
    pipeline.check_data(recipe.data is not None or options.data_root is not None)
    if options.require_targets:
        host = host_device()
        for t in pipeline.all_targets():
            avail = t.availability()
            # the device's refusal (bf16 where it has none) is known now as well as after the passes
            why = t.device_refusal(pipeline.device, host) or (None if avail.ok else avail.reason)
            if why:
                raise TargetUnavailable(f"{t.step}: target {t.name!r} cannot build here ({why}) "
                                        "and --require-targets is set")
    out_dir = Path(options.out_dir) if options.out_dir else default_out_dir(model_path, recipe)
    protected = [("model file", model_path), ("recipe", recipe_path), ("data", options.data_root),
                 ("pass cache", cache_root)]
    preflight_out_dir(out_dir, overwrite=options.overwrite, protected=protected)
    if options.use_cache and rank == 0:
        check_writable(cache_root, "pass cache")
    evaluation = recipe.evaluation.model_copy()
    if options.threads is not None:
        evaluation.threads = options.threads
    return JobPlan(model_path=model_path, recipe=recipe, recipe_path=recipe_path, options=options,
                   pipeline=pipeline, out_dir=out_dir, evaluation=evaluation, timing=timing, rank=rank,
                   world_size=world_size)


def load_inputs(plan: JobPlan) -> tuple[Any, DataBundle | None]:
    """The model (loaded and checked first) and the data, opened once when first needed (a model
    that names no input shape takes the data's image size)."""
    recipe, options, m = plan.recipe, plan.options, plan.recipe.model
    opened: list[DataBundle | None] = []

    def open_once() -> DataBundle | None:
        if not opened:
            base = plan.recipe_path.parent if plan.recipe_path else None
            opened.append(prepare_data(recipe, base, options, plan.model_path))
        return opened[0]

    artifact = load_model(
        plan.model_path,
        arch=options.arch or m.arch,
        num_classes=options.num_classes or m.num_classes,
        trust=options.trust_model or m.trusted,
        input_shape=m.input_shape,
        preprocessing=recipe.preprocessing,
        classes=m.classes,
        fallback_shape=lambda color: data_input_shape(open_once(), color),
        fallback_source="data",
        output=m.output,
    )
    return artifact, open_once()


def run_options(plan: JobPlan) -> dict[str, Any]:
    """What a run took from its command line (or resolved) besides the recipe that compress explain
    needs to load the same model and data again: a state dict's architecture and class count, the
    data root (absolute) and the evaluation limit."""
    o, m = plan.options, plan.recipe.model
    recorded = {"arch": o.arch or m.arch, "num_classes": o.num_classes or m.num_classes,
                "data_root": str(Path(o.data_root).resolve()) if o.data_root is not None else None,
                "eval_limit": o.eval_limit}
    return {k: v for k, v in recorded.items() if v is not None}


def run_and_write(plan: JobPlan, artifact: Any, data: DataBundle | None) -> JobResult:
    """Run the pipeline into a staging directory, write the report there, and swap it into place."""
    out_dir, options = plan.out_dir, plan.options
    with staged_dir(out_dir, replace=options.overwrite, what="output directory") as staging:
        try:
            result = plan.pipeline.run(artifact, data=data, out_dir=staging, evaluation=plan.evaluation)
            samples = save_samples(result, data, staging)  # what compress compare needs
            for f in options.extra_files:
                shutil.copy2(f, staging / Path(f).name)
            report = build_report(
                result,
                recipe_name=plan.recipe.name,
                recipe=plan.recipe.model_dump(mode="json", exclude_defaults=True),
                model_path=str(plan.model_path),
                data=data,
                limits=plan.recipe.acceptance,
                timings=plan.timing.timings,
                world_size=plan.world_size,
                samples=samples,
                outputs=sorted([*(p.name for p in staging.iterdir()), "report.json", "report.md"]),
                built_in=staging,
                published_as=out_dir,
                device=describe_device(plan.options.device_profile or plan.recipe.device),
            )
            if plan.recipe_path is not None:
                report["recipe_path"] = str(plan.recipe_path)  # compress explain resolves the data from there
            report["run_options"] = run_options(plan)  # compress explain loads the same model and data
            from .report import plot_training

            if plot_training(report, staging / "training.png"):
                report["outputs"] = sorted({*report.get("outputs", []), "training.png"})
            explained = _explain_in_run(plan, result, data, report, staging)
            if plan.evaluation.serving:  # after the rows: every engine served from image bytes to class index
                from .serving import serve_in_run

                serve_in_run(plan.evaluation, result, data, report, say=plan.pipeline.hooks.on_message)
            write_report(report, staging, explain=explained)
        except (CompressorError, OSError, RuntimeError) as exc:  # name where the file was to go, not the staging
            if isinstance(exc, RuntimeError) and write_failure(exc) is None:  # a library's failed write only
                raise
            relocated = _relocated(exc, staging, out_dir)
            if relocated is exc:
                raise
            raise relocated from exc
    failed_targets = [f for f in result.failures if options.require_targets or not f.unavailable]
    exit_code = 0 if report["acceptance"]["passed"] and not failed_targets else 1
    return JobResult(report=report, out_dir=out_dir, exit_code=exit_code)


def _explain_in_run(plan: JobPlan, result: Any, data: DataBundle | None, report: dict[str, Any],
                    staging: Path) -> dict[str, Any] | None:
    """With ``evaluation.explain``, explain every engine; otherwise, when engines miss the top-1
    limit, a quick explanation of those (32 images, no sensitivity) so the console can name each
    one's worst layer. Adds report["explain"]; returns explain.json's content."""
    from .evaluate import ExplainConfig
    from .fidelity.explain import explain_result
    from .fidelity.render import write_outputs

    cfg = plan.evaluation.explain_config()
    failing = sorted({c["result"] for c in report["acceptance"]["checks"]
                      if c["metric"] == "top1_drop" and not c["passed"]})
    if data is None or not result.engines or (cfg is None and not failing):
        return None
    quick = cfg is None
    cfg = cfg or ExplainConfig(images=32, sensitivity=False)
    exp = explain_result(result, data, cfg, threads=result.threads, only=set(failing) if quick else None,
                         say=plan.pipeline.hooks.on_message)
    written = write_outputs(exp, staging)
    report["explain"] = {"files": [p.name for p in written], "quick": quick, "missed_top1": failing,
                         "worst": exp.worst, "seconds": exp.data["seconds"]}
    report["outputs"] = sorted({*report.get("outputs", []), *(p.name for p in written)})
    return exp.data


def _relocated(exc: Exception, staging: Path, out_dir: Path) -> Exception:
    """The same error, naming paths where they would have been after the rename (or ``exc`` itself).
    A write that failed without naming its file (numpy's savez closing on a full disk, torch.save)
    names the output directory."""
    old, new = str(staging), str(out_dir)
    if isinstance(exc, OSError) and exc.filename:
        if old not in str(exc.filename):
            return exc
        return OutputError(f"cannot write {str(exc.filename).replace(old, new, 1)}: {describe_os_error(exc)}")
    if isinstance(exc, (OSError, RuntimeError)):
        return OutputError(f"cannot write output directory {out_dir}: {write_failure(exc, staging)}")
    return type(exc)(str(exc).replace(old, new)) if old in str(exc) else exc


def explain_run_dir(run_dir: Path, options: JobOptions, cfg: Any, *, model: Path | None = None,
                    say: Any = None) -> tuple[Any, list[Path]]:
    """``compress explain RUN_DIR``: reload the run's source model, data and engines, take every
    pass's output from the pass cache, explain, and write explain.json / .md / .png into RUN_DIR.
    What the libraries put in TMPDIR goes into a temporary directory of its own, removed after (as
    a run's: :func:`staging.run_tempdir`)."""
    with run_tempdir():
        return _explain_run_dir(run_dir, options, cfg, model=model, say=say)


def _explain_run_dir(run_dir: Path, options: JobOptions, cfg: Any, *, model: Path | None,
                     say: Any) -> tuple[Any, list[Path]]:
    from .fidelity.explain import cached_stages, engine_handles, evaluation_sample, explain, held_out_images
    from .fidelity.render import write_outputs
    from .recipe import parse_recipe

    run_dir = Path(run_dir)
    report = run_dir_report(run_dir, EXPLAIN_FILES, "the explanation", overwrite=options.overwrite)
    recipe = parse_recipe(report.get("recipe_config") or {}, source=f"{run_dir}/report.json")
    model_path = Path(model or report.get("model", ""))
    if not model_path.is_file():
        raise ConfigError(f"the run's model {model_path} is not found from here; give it with --model PATH")
    recorded = report.get("fingerprints") or {}
    refuse_other_inputs(recorded, {"model": file_fingerprint(model_path)}, f"model {model_path}")
    options = with_run_options(options, report.get("run_options") or {})
    recipe_path = Path(report["recipe_path"]) if report.get("recipe_path") else None
    cache_root = options.cache_dir or PassCache.default_root()
    pipeline = Pipeline(recipe.build_passes(), recipe.build_targets(), baselines=recipe.build_targets("baselines"),
                        branches=recipe.build_branches(), cache=PassCache(cache_root) if options.use_cache else None,
                        seed=recipe.seed, device=resolve_device((report.get("device") or {}).get("requested")
                                                                or recipe.device))
    pipeline.check(guess_form(model_path))
    evaluation = recipe.evaluation.model_copy()
    plan = JobPlan(model_path=model_path, recipe=recipe, recipe_path=recipe_path, options=options, pipeline=pipeline,
                   out_dir=run_dir, evaluation=evaluation, timing=TimingHook(), rank=0, world_size=1)
    artifact, data = load_inputs(plan)
    if data is None:
        raise ConfigError("explain needs images: the run's recipe names no data (give --data DIR)")
    refuse_other_inputs(recorded, {"calibration": data.fingerprint("calibration"),
                                   "evaluation_set": data.evaluation_fingerprint()},
                        f"data {data.config.root or data.config.source}")
    engines = engines_of_run(run_dir, report)
    from .environment import default_threads

    threads = options.threads or evaluation.threads or default_threads()
    stages, missing = cached_stages(pipeline, artifact, data)
    x, labels, where = held_out_images(artifact, data, cfg.images)
    dx, dwhere = evaluation_sample(artifact, data, cfg.images)
    exp = explain(artifact, engine_handles(engines, threads=threads), x, labels, stages=stages, images_from=where,
                  threads=threads, cfg=cfg, drift_x=dx, drift_from=dwhere, say=say or (lambda _m: None))
    if missing:
        exp.data["stages_not_in_cache"] = missing
    return exp, write_outputs(exp, run_dir)


def serve_run_dir(run_dir: Path, options: Any, *, model: Path | None = None, say: Callable[[str], None] | None = None,
                  **overrides: Any) -> tuple[dict[str, Any], list[Path]]:
    """``compress serve RUN_DIR``: reload the run's model (for its preprocessing and input shape) and data
    (for the images), serve every engine in RUN_DIR and write serving.json and serving.md there."""
    with run_tempdir():
        return _serve_run_dir(Path(run_dir), options, model=model, say=say, overrides=overrides)


def _serve_run_dir(run_dir: Path, options: Any, *, model: Path | None, say: Callable[[str], None] | None,
                   overrides: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    from .artifact import Preprocessing
    from .environment import default_threads
    from .recipe import parse_recipe
    from .serving import ServingSettings, frames_from_data, serve_engines, write_serving

    report = run_dir_report(run_dir, SERVING_FILES, "the serving figures", overwrite=options.overwrite)
    engines = engines_of_run(run_dir, report)
    if not engines:
        raise ConfigError(f"{run_dir} holds no engines to serve (its recipe built none)")
    missing = [p for e in engines if e.built for p in e.files if not p.is_file()]
    if missing:
        raise ConfigError(f"engine file {missing[0]} is missing: is {run_dir} complete?")
    recipe = parse_recipe(report.get("recipe_config") or {}, source=f"{run_dir}/report.json")
    model_path = Path(model or report.get("model", ""))
    if not model_path.is_file():
        raise ConfigError(f"the run's model {model_path} is not found from here; give it with --model PATH "
                          "(serving takes its preprocessing and input shape)")
    refuse_other_inputs(report.get("fingerprints") or {}, {"model": file_fingerprint(model_path)},
                        f"model {model_path}")
    options = with_run_options(options, report.get("run_options") or {})
    recipe_path = Path(report["recipe_path"]) if report.get("recipe_path") else None
    plan = JobPlan(model_path=model_path, recipe=recipe, recipe_path=recipe_path, options=options,
                   pipeline=None, out_dir=run_dir, evaluation=recipe.evaluation, timing=TimingHook(), rank=0,
                   world_size=1)
    artifact, data = load_inputs(plan)
    if data is None:
        raise ConfigError("serve needs images: the run's recipe names no data (give --data DIR)")
    threads = options.threads or recipe.evaluation.threads or default_threads()
    settings = ServingSettings.from_evaluation(recipe.evaluation, threads, **overrides)
    frames = frames_from_data(data, settings.images)
    shape = (report.get("model_input") or {}).get("shape") or list(artifact.input_spec.shape)
    section = serve_engines(engines, frames, artifact.preprocessing or Preprocessing(), shape, settings, say)
    section["run"] = {"recipe": report.get("recipe"), "created": report.get("created")}
    return section, write_serving(section, run_dir)
