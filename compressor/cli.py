"""The ``compress`` command.

    compress MODEL --recipe RECIPE [--out DIR] ...   run a recipe (same as ``compress run``)
    compress validate RECIPE                          check a recipe without running it
    compress passes | targets                         list what exists, with config fields
    compress demo                                     train a small model on bundled data, compress it
    compress compare RUN --baseline BASE              regression gate: exit 1 when RUN regressed
    compress baseline update RUN BASE                 write RUN's report and samples as a baseline

Bad input ends with one line on stderr and exit code 2; a missed acceptance limit exits 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from .devices import NAMES as DEVICE_NAMES
from .errors import CompressorError


class _DefaultToRun(click.Group):
    """``compress model.pt --recipe r.yaml`` means ``compress run model.pt --recipe r.yaml``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compressor")
def cli() -> None:
    """compressor: compress trained image classifiers and prove it (accuracy, latency, size)."""


def _once(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> str | None:
    """An option declared ``multiple=True`` so that giving it twice is refused, not the last one taken."""
    if len(values) > 1:
        raise click.BadParameter(f"given {len(values)} times ({', '.join(values)}); give it once",
                                 param_hint=param.opts[0])
    return values[0] if values else None


class _FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and inf (click's range lets nan through every bound)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)], force=True)
    for noisy in ("nncf", "torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import warnings

    if verbose < 2:  # deprecation chatter from the libraries' own internals
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TracerWarning.*")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--recipe", "-r", required=True, help="recipe file, or the name of a shipped recipe")
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="output directory: new, empty, or a previous run's (with --overwrite) [compress-out/MODEL-RECIPE]")
@click.option("--overwrite", is_flag=True, help="replace the previous run in the output directory")
@click.option("--arch", help="architecture of a state dict, e.g. torchvision:resnet50")
@click.option("--num-classes", type=int, help="class count for --arch")
@click.option("--trust-model", is_flag=True, help="allow loading a pickled nn.Module (runs code from the file)")
@click.option("--data", "data_root", help="data directory (overrides the recipe's data.root)")
@click.option("--threads", type=int, help="threads for every runtime [all cores]")
@click.option("--eval-limit", type=int, help="evaluate on a class-balanced subset of this many images")
@click.option("--no-cache", is_flag=True, help="run every pass even if a cached output exists")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="pass cache [~/.cache/compressor/passes]")
@click.option("--require-targets", is_flag=True,
              help="fail (exit 2) when a target cannot build on this machine, instead of reporting it 'not built here'")
@click.option("--device", type=click.Choice(DEVICE_NAMES), multiple=True, callback=_once,
              help="the device the engines are for (overrides the recipe's device:) [host: this machine]")
@click.option("--cluster", metavar="auto|HOST:PORT|ray://HOST:PORT",
              help="build branches as Ray tasks and time each device's engines on a node carrying device:NAME "
                   "(auto: this machine's cluster, or a local one for this command) [this process]")
@click.option("--quiet", "-q", is_flag=True, help="no progress display")
@click.option("--verbose", "-v", count=True, help="log more (-vv for debug)")
def run(model: Path | None, recipe: str, out: Path | None, overwrite: bool, arch: str | None, num_classes: int | None,
        trust_model: bool, data_root: str | None, threads: int | None, eval_limit: int | None, no_cache: bool,
        cache_dir: Path | None, require_targets: bool, device: str | None, cluster: str | None, quiet: bool,
        verbose: int) -> int:
    """Compress MODEL with RECIPE: passes, engines, measurements, report."""
    from .hooks import ProgressHook
    from .job import JobOptions, run_job
    from .recipe import load_recipe
    from .report import print_table

    _setup_logging(verbose)
    rec, rec_path = load_recipe(recipe)
    model = model or (Path(rec.model.path) if rec.model.path else None)
    if model is None:
        raise click.UsageError("give a MODEL file (or model.path in the recipe)")
    for name, value in (("--threads", threads), ("--eval-limit", eval_limit), ("--num-classes", num_classes)):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be at least 1, got {value}", param_hint=name)
    hooks = [] if quiet else [ProgressHook()]
    options = JobOptions(out_dir=out, arch=arch, num_classes=num_classes, trust_model=trust_model,
                         data_root=data_root, threads=threads, eval_limit=eval_limit, cache_dir=cache_dir,
                         use_cache=not no_cache, require_targets=require_targets, overwrite=overwrite,
                         hooks=hooks, device_profile=device, cluster=cluster)
    job = run_job(model, rec, rec_path, options)
    if not job.report:  # a non-first process of a torchrun job: the first one reports
        return job.exit_code
    print_table(job.report)
    _explain_hint(job.report, job.out_dir, trust_model)
    click.echo(f"wrote {job.out_dir}/report.md, {job.out_dir}/report.json and {len(job.report['engines'])} engine(s)")
    return job.exit_code


def _explain_hint(report: dict, out_dir: Path, trust_model: bool) -> None:
    """Each engine that missed the top-1 limit: its worst layer, and the command that explains all."""
    explained = report.get("explain") or {}
    for name in explained.get("missed_top1", []):
        line = explained["worst"].get(name)
        if line:
            click.echo(f"missed the top-1 limit: {line}")
    if explained.get("missed_top1"):
        click.echo(f"where accuracy is lost: {out_dir}/explain.md; all engines, with sensitivity: "
                   f"compress explain {out_dir} --overwrite{' --trust-model' if trust_model else ''}")


@cli.command()
@click.argument("recipe")
def validate(recipe: str) -> int:
    """Check a recipe: schema, pass/target configs and the chain of forms."""
    from .artifact import Form
    from .job import guess_form
    from .recipe import check_pipeline_devices, load_recipe

    rec, path = load_recipe(recipe)
    form = guess_form(Path(rec.model.path)) if rec.model.path else Form.TORCH
    pipeline = rec.pipeline()
    check_pipeline_devices(rec.device, pipeline)
    forms = pipeline.check(form)
    chain = " -> ".join(f.value for f in forms)
    steps = ", ".join(p.name for p in pipeline.passes) or "none"
    conversions = {id(t): c.name for t, c in pipeline.planned_conversions()}
    tgts = ", ".join(t.name + (f" (after {conversions[id(t)]})" if id(t) in conversions else "") for t in pipeline.targets)
    click.echo(f"ok: {path} ({rec.name}): passes {steps}; targets {tgts}; forms {chain}")
    return 0


def _type_name(annotation: Any) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _fields(config_cls: Any) -> list[str]:
    out = []
    for name, f in config_cls.model_fields.items():
        ann = _type_name(f.annotation)
        default = f.get_default(call_default_factory=True)
        desc = f" - {' '.join(f.description.split())}" if f.description else ""
        out.append(f"{name}: {ann} = {default!r}{desc}")
    return out


@cli.command(name="passes")
def list_passes() -> int:
    """List the registered passes with their config fields."""
    from .registry import pass_registry

    for name, cls in pass_registry().items():
        consumes = ", ".join(sorted(f.value for f in cls.consumes))
        produces = cls.produces.value if cls.produces else "depends on config"
        click.echo(f"{name}: {cls.summary}")
        click.echo(f"  takes: {consumes}; gives: {produces}{'; needs calibration data' if cls.needs_data else ''}")
        for line in _fields(cls.Config):
            click.echo(f"    {line}")
    return 0


@cli.command(name="targets")
def list_targets() -> int:
    """List the registered targets, whether each can run here (and why not), and config fields."""
    from .registry import target_registry

    for name, cls in target_registry().items():
        avail = cls.availability()
        state = "available" if avail.ok else "NOT available"
        click.echo(f"{name}: {cls.summary}")
        click.echo(f"  {state} here: {avail.reason}")
        click.echo(f"  takes: {', '.join(sorted(f.value for f in cls.consumes))}")
        for line in _fields(cls.Config):
            click.echo(f"    {line}")
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="the run's model file, if not where the run found it")
@click.option("--arch", help="architecture of a state dict, e.g. torchvision:resnet50 [the run's]")
@click.option("--num-classes", type=click.IntRange(1), help="class count for --arch [the run's]")
@click.option("--trust-model", is_flag=True, help="allow loading a pickled nn.Module (runs code from the file)")
@click.option("--data", "data_root", help="data directory, if not where the run found it (the same images)")
@click.option("--images", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="images held out of the calibration split (never the test split)")
@click.option("--threshold-db", type=float, default=15.0, show_default=True, help="flag layers below this SQNR")
@click.option("--no-sensitivity", is_flag=True, help="skip the per-layer sensitivity ranking")
@click.option("--threads", type=click.IntRange(1, 1024), help="threads for every runtime [all cores]")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="pass cache [~/.cache/compressor/passes]")
@click.option("--overwrite", is_flag=True, help="replace a previous explanation in RUN_DIR")
@click.option("--verbose", "-v", count=True)
def explain(run_dir: Path, model: Path | None, arch: str | None, num_classes: int | None, trust_model: bool,
            data_root: str | None, images: int, threshold_db: float, no_sensitivity: bool, threads: int | None,
            cache_dir: Path | None, overwrite: bool, verbose: int) -> int:
    """Where accuracy is lost in RUN_DIR's engines: per layer, per pass, per quantizer."""
    from .evaluate import ExplainConfig
    from .fidelity.explain import worst_line
    from .fidelity.render import explain_notes
    from .job import JobOptions, explain_run_dir

    _setup_logging(verbose)
    options = JobOptions(arch=arch, num_classes=num_classes, trust_model=trust_model, data_root=data_root,
                         threads=threads, cache_dir=cache_dir, overwrite=overwrite)
    cfg = ExplainConfig(images=images, threshold_db=threshold_db, sensitivity=not no_sensitivity)
    say = (lambda m: click.echo(m, err=True)) if verbose else None
    exp, written = explain_run_dir(run_dir, options, cfg, model=model, say=say)
    for s in exp.data["stages"]:
        if "status" not in s:
            click.echo(f"{s['step']:<40} top-1 {s['top1']:6.2f}%  agreement {s['agreement']:6.2f}%  "
                       f"output SQNR {'-' if s['output_sqnr_db'] is None else format(s['output_sqnr_db'], '.1f')} dB")
    for name, e in exp.data["engines"].items():
        line = worst_line(name, e)
        if line:
            click.echo(line)
    for note in explain_notes(exp.data, images):
        click.echo(note)
    click.echo(f"wrote {', '.join(str(p) for p in written)} ({exp.data['seconds']:.0f} s)")
    return 0


def _counts(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """``1,2,4`` as [1, 2, 4] (positive ints, at most 1024)."""
    if value is None:
        return None
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"give comma-separated positive integers, e.g. 1,2,4; got {value!r}") from None
    if not counts or any(c < 1 or c > 1024 for c in counts):
        raise click.BadParameter(f"give comma-separated integers from 1 to 1024, e.g. 1,2,4; got {value!r}")
    return counts


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--images", type=click.IntRange(1, 10_000), help="evaluation images served, cyclically [the recipe's "
              "evaluation.serving_images, else 64]")
@click.option("--threads", type=click.IntRange(1, 1024), help="threads per engine [the run's, else all cores]")
@click.option("--in-flight", "in_flight", callback=_counts,
              help="requests in flight to try, e.g. 1,2,4 (OpenVINO adds its optimal count) [1,2,4]")
@click.option("--batches", callback=_counts, help="batch sizes dynamic batching tries [1,2,4,8,16]")
@click.option("--latency-ms", type=_FiniteFloatRange(min=0, min_open=True),
              help="dynamic batching keeps p99 latency within this [100]")
@click.option("--seconds", type=_FiniteFloatRange(min=0, max=600, min_open=True),
              help="timed seconds per figure [2]")
@click.option("--no-memory", is_flag=True, help="skip the peak-RSS process per engine")
@click.option("--no-referee", is_flag=True, help="skip OpenVINO's benchmark_app")
@click.option("--model", type=click.Path(path_type=Path), help="the run's model file, if not where the run found it")
@click.option("--arch", help="architecture of a state dict, e.g. torchvision:resnet50 [the run's]")
@click.option("--num-classes", type=click.IntRange(1), help="class count for --arch [the run's]")
@click.option("--trust-model", is_flag=True, help="allow loading a pickled nn.Module (runs code from the file)")
@click.option("--data", "data_root", help="data directory, if not where the run found it")
@click.option("--overwrite", is_flag=True, help="replace previous serving figures in RUN_DIR")
@click.option("--verbose", "-v", count=True)
def serve(run_dir: Path, images: int | None, threads: int | None, in_flight: list[int] | None,
          batches: list[int] | None, latency_ms: float | None, seconds: float | None, no_memory: bool,
          no_referee: bool, model: Path | None, arch: str | None, num_classes: int | None, trust_model: bool,
          data_root: str | None, overwrite: bool, verbose: int) -> int:
    """Serve RUN_DIR's engines from image bytes to class index: synchronous, N requests in flight,
    preprocessing folded in, dynamic batching, memory, benchmark_app (serving.json / serving.md)."""
    from .job import JobOptions, serve_run_dir

    _setup_logging(verbose)
    options = JobOptions(arch=arch, num_classes=num_classes, trust_model=trust_model, data_root=data_root,
                         threads=threads, overwrite=overwrite)
    say = (lambda m: click.echo(m, err=True)) if verbose else None
    section, written = serve_run_dir(run_dir, options, model=model, say=say, images=images, in_flight=in_flight,
                                     batches=batches, latency_ms=latency_ms, seconds=seconds,
                                     memory=False if no_memory else None, referee=False if no_referee else None)
    for r in section["engines"]:
        if "error" in r:
            click.echo(f"{r['engine']}: failed: {r['error']}")
            continue
        a, sync = r["async"], r["sync"]["host"]
        click.echo(f"{r['engine']:<28} sync {sync['fps']:8.1f} fps (p99 {sync['latency_ms']['p99']:.2f} ms)  "
                   f"async N={a['best_in_flight']} {a['fps']:8.1f} fps (p99 {a['latency_ms']['p99']:.2f} ms)  "
                   f"inference-only {a['inference_only_fps']:8.1f} fps")
    for s in section["skipped"]:
        click.echo(f"{s['engine']}: {s['reason']}")
    click.echo(f"wrote {', '.join(str(p) for p in written)} ({section['seconds']:.0f} s)")
    return 0


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_root", required=True, help="image folder with train/ and test/ (validation and "
              "calibration images come from train/, the final figures from test/)")
@click.option("--max-drop", type=_FiniteFloatRange(0, 100), required=True,
              help="top-1 points a candidate may lose against the source on validation images, proven by the "
                   "95 % upper confidence bound of its drop")
@click.option("--device", type=click.Choice(DEVICE_NAMES), multiple=True, callback=_once,
              help="the device the engines are for; it decides the search space [host]")
@click.option("--budget-min", type=_FiniteFloatRange(min=0, min_open=True),
              help="start no new candidate after this many minutes")
@click.option("--targets", "only", help="comma-separated targets to consider [all the device runs]")
@click.option("--validation-images", type=click.IntRange(50, 20_000),
              help="held-out training images the budget is judged on [chosen by the confidence bound: what "
                   "--max-drop needs with no disagreement (0.5 -> 736), more where candidates disagree, up to "
                   "10,000]")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="output directory [compress-out/MODEL-tune]")
@click.option("--overwrite", is_flag=True, help="replace a previous tune in the output directory")
@click.option("--arch", help="architecture of a state dict, e.g. torchvision:resnet50")
@click.option("--num-classes", type=click.IntRange(1), help="class count for --arch")
@click.option("--trust-model", is_flag=True, help="allow loading a pickled nn.Module (runs code from the file)")
@click.option("--threads", type=click.IntRange(1, 1024), help="threads for every runtime [all cores]")
@click.option("--eval-limit", type=click.IntRange(1), help="final figures on a class-balanced subset of the test split")
@click.option("--no-cache", is_flag=True, help="recompute every quantization (default: resume from the pass cache)")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="pass cache [~/.cache/compressor/passes]")
@click.option("--quick", is_flag=True, help="short timing (0.2 s a row) for a first look; noisier figures")
@click.option("--latency-figure", type=click.Choice(["loop", "paced"]), default="loop", show_default=True,
              help="the batch-1 p50 to optimise: back-to-back calls (loop) or requests 30 per second with the cores "
                   "idle between them (paced); tuned.yaml keeps it as evaluation.latency_figure")
@click.option("--cluster", metavar="auto|HOST:PORT|ray://HOST:PORT",
              help="build branches as Ray tasks and time each device's engines on a node carrying device:NAME "
                   "(auto: this machine's cluster, or a local one for this command) [this process]")
@click.option("--quiet", "-q", is_flag=True, help="no progress display")
@click.option("--verbose", "-v", count=True)
def tune(model: Path, data_root: str, max_drop: float, device: str | None, budget_min: float | None, only: str | None,
         validation_images: int | None, out: Path | None, overwrite: bool, arch: str | None, num_classes: int | None,
         trust_model: bool, threads: int | None, eval_limit: int | None, no_cache: bool, cache_dir: Path | None,
         quick: bool, latency_figure: str, cluster: str | None, quiet: bool, verbose: int) -> int:
    """The fastest engine for MODEL that keeps top-1 within --max-drop: built, screened, timed, proven."""
    from .hooks import ProgressHook
    from .job import JobOptions
    from .tune import QUICK, TARGETS, run_tune

    _setup_logging(verbose)
    device = device or "host"
    chosen = tuple(t.strip() for t in only.split(",")) if only else None
    unknown = [t for t in chosen or () if t not in TARGETS]
    if unknown:
        raise click.BadParameter(f"unknown target {unknown[0]!r} (known: {', '.join(TARGETS)})",
                                 param_hint="--targets")
    options = JobOptions(out_dir=out or Path("compress-out") / f"{model.stem}-tune", arch=arch,
                         num_classes=num_classes, trust_model=trust_model, data_root=data_root, threads=threads,
                         eval_limit=eval_limit, cache_dir=cache_dir, use_cache=not no_cache, overwrite=overwrite,
                         device_profile=device, cluster=cluster,
                         hooks=[] if quiet else [ProgressHook()])
    command = "compress tune " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["tune"] else "compress tune"
    summary, out_dir, code = run_tune(model, options, max_drop=max_drop, device_name=device, budget_min=budget_min,
                                      validation_images=validation_images, only=chosen, command=command,
                                      evaluation={**(QUICK if quick else {}),
                                                  **({"latency_figure": latency_figure}
                                                     if latency_figure != "loop" else {})} or None)
    ch = summary["chosen"]
    if ch:
        click.echo(f"chosen: {ch['engine']}: test top-1 {ch['test_top1']:.2f}% ({ch['test_drop']:+.2f} points), "
                   f"p50 {ch['p50_ms']:.3f} ms, {ch['speedup']:.2f}x the source")
    else:
        click.echo(f"no candidate's top-1 drop was proven within {max_drop} points on the validation images "
                   "(95 % upper confidence bound; tune.md says what each one missed)")
    click.echo(f"wrote {out_dir}/tune.md, tune.json, tuned.yaml and the run's report.md")
    return code


@cli.command(name="build-engine")
@click.argument("engine_dir", type=click.Path(path_type=Path))
def build_engine(engine_dir: Path) -> int:
    """Build an engine that was written but not built (e.g. TensorRT, on the Jetson), from ENGINE_DIR."""
    import json

    from .errors import ConfigError
    from .registry import get_target

    meta_path = engine_dir / "engine.json"
    if not meta_path.is_file():
        raise ConfigError(f"{engine_dir}: no engine.json (give an engine directory written by compress)")
    try:
        meta = json.loads(meta_path.read_text())
        name = meta["target"]
        if not isinstance(meta, dict) or not isinstance(name, str):
            raise TypeError("not an object with a target name")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{meta_path} is not a valid engine.json ({type(exc).__name__}: {exc}); "
                          "write the engine directory again with compress") from None
    if "not_built" not in meta:  # what compress builds where it runs is complete: nothing is left to build
        raise ConfigError(f"{engine_dir} holds a built {name} engine: nothing to build "
                          "(build-engine builds an engine that compress wrote but could not build where it ran, "
                          "e.g. TensorRT for a Jetson, on the device)")
    target = get_target(name)(meta.get("config") or {}, step=f"{engine_dir.name}/engine.json")
    files = target.build_on_device(engine_dir, precision=meta.get("precision"))
    click.echo(f"built {', '.join(str(f) for f in files)}")
    return 0


@cli.command()
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("compress-out/demo"), show_default=True)
@click.option("--overwrite", is_flag=True, help="replace a previous demo run in the output directory")
@click.option("--epochs", type=click.IntRange(1, 100), default=6, show_default=True)
@click.option("--threads", type=int, help="threads [all cores]")
@click.option("--quiet", "-q", is_flag=True)
def demo(out: Path, overwrite: bool, epochs: int, threads: int | None, quiet: bool) -> int:
    """Train a small torchvision classifier on scikit-learn's bundled digits, then compress it."""
    from .demo import run_demo
    from .report import print_table

    _setup_logging(0)
    job = run_demo(out, epochs=epochs, threads=threads, quiet=quiet, overwrite=overwrite)
    print_table(job.report)
    _explain_hint(job.report, job.out_dir, True)
    click.echo(f"wrote {job.out_dir}/report.md and {job.out_dir}/report.json")
    return job.exit_code


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--baseline", "-b", "baseline_dir", required=True, type=click.Path(path_type=Path),
              help="baseline run directory (or one written by compress baseline update)")
@click.option("--alpha", type=_FiniteFloatRange(0, 1, min_open=True, max_open=True),
              help="significance level of the tests [recipe acceptance, else 0.01]")
@click.option("--max-top1-drop", type=_FiniteFloatRange(min=0),
              help="top-1 points below the baseline flagged whatever the p-value [recipe acceptance, else 1.0]")
@click.option("--max-slowdown", type=_FiniteFloatRange(min=0, min_open=True),
              help="current p50 / baseline p50 above which a significant slowdown is flagged [else 1.10]")
@click.option("--max-size-growth", type=_FiniteFloatRange(min=0, min_open=True),
              help="current size / baseline size above which a row is flagged [else 1.05]")
@click.option("--max-agreement-drop", type=_FiniteFloatRange(min=0),
              help="points of agreement with the source model lost before a row is flagged [else 1.0]")
@click.option("--resamples", type=click.IntRange(100, 1_000_000), default=2000, show_default=True,
              help="bootstrap resamples for the latency interval")
@click.option("--seed", type=int, default=0, show_default=True, help="bootstrap seed")
@click.option("--latency", "latency_mode", type=click.Choice(["both", "relative", "absolute"]), default="both",
              show_default=True,
              help="which latency ratio must show a slowdown: absolute (raw p50s), relative (each engine's p50 as "
                   "a multiple of its own run's source p50, timed in the same rounds: a busier machine moves "
                   "nothing), or both")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), help="also write the table here")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="write JUnit XML here")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="write the comparison as JSON here")
@click.option("--fail-on", type=click.Choice(["all", "accuracy", "auto"]), default="all", show_default=True,
              help="which regressions set exit 1: all; accuracy only (top-1, agreement); or auto: all when the "
                   "run's environment (CPU, ISA flags, threads, library versions) matches the baseline's, "
                   "accuracy only when latency and size may come from another machine or library")
def compare(run_dir: Path, baseline_dir: Path, alpha: float | None, max_top1_drop: float | None,
            max_slowdown: float | None, max_size_growth: float | None, max_agreement_drop: float | None,
            resamples: int, seed: int, latency_mode: str, markdown_path: Path | None, junit_path: Path | None,
            json_path: Path | None, fail_on: str) -> int:
    """Compare RUN_DIR with a baseline run, result by result: exit 1 on a regression.

    Accuracy: exact McNemar test on per-image correctness; latency: bootstrap interval of the
    ratio of p50s, raw and relative to the run's own source row; size and agreement with the
    source: thresholds. Runs on different evaluation sets or source models are refused (exit 2)."""
    from .compare import compare_dirs, gating_checks, render_json, render_junit, render_markdown
    from .staging import atomic_write, check_writable

    outputs = {"--markdown": markdown_path, "--junit": junit_path, "--json": json_path}
    for option, path in outputs.items():  # before the comparison is computed and printed
        if path is not None:
            if path.is_dir():
                raise click.BadParameter(f"{path} is a directory; give a file name", param_hint=option)
            check_writable(path, f"{option} file")
    cmp = compare_dirs(run_dir, baseline_dir, resamples=resamples, seed=seed, latency=latency_mode, alpha=alpha,
                       max_top1_drop=max_top1_drop, max_slowdown=max_slowdown, max_size_growth=max_size_growth,
                       max_agreement_drop=max_agreement_drop)
    gate = gating_checks(cmp, fail_on)
    cmp["gate"] = gate.to_json()  # what the job does with the regressions, for CI scripts (.ci/regression)
    text = render_markdown(cmp)
    click.echo(text, nl=False)
    for path, render in ((markdown_path, lambda: text), (junit_path, lambda: render_junit(cmp)),
                         (json_path, lambda: render_json(cmp))):
        if path is not None:
            atomic_write(path, render(), what="comparison")
    if gate.reported:
        click.echo(f"({gate.reported} latency/size regression(s) {gate.reason}: reported, not failing)", err=True)
    return 1 if gate.failing else 0


@cli.group()
def baseline() -> None:
    """Committable baselines for compress compare."""


@baseline.command(name="update")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("baseline_dir", type=click.Path(path_type=Path))
@click.option("--machine", is_flag=True,
              help="write it as the baseline of the machine RUN_DIR was timed on (BASELINE_DIR/machines/<key>); "
                   "compress compare takes it for runs on such a machine, the default one for any other")
def baseline_update(run_dir: Path, baseline_dir: Path, machine: bool) -> int:
    """Write RUN_DIR's report, predictions and latency samples (not its engines) into BASELINE_DIR."""
    from .compare import update_baseline

    baseline_dir, written = update_baseline(run_dir, baseline_dir, machine=machine)
    total = sum(written.values())
    click.echo(f"wrote baseline {baseline_dir}: {', '.join(written)} ({total / 1e3:.1f} KB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="compress", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        msg = " ".join(exc.format_message().split())
        click.echo(f"error: {msg} (see compress --help)", err=True)
        return 2
    except CompressorError as exc:
        click.echo(f"error: {exc.one_line()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as exc:  # a file system fault no writer above turned into its own message
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or type(exc).__name__}", err=True)
        return 2
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    import signal

    def terminated(signum: int, frame: object) -> None:  # `kill`, CI timeouts: clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    sys.exit(main())
