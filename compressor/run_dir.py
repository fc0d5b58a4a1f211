"""A run's output directory: the files a run and the commands over it (explain, tune, serve) write
there, whether a directory holds a previous run, the check before a run may write or replace one,
and the engines a finished run holds.

The output directory rule: a run writes only into a directory that does not exist, is empty, or
holds a previous run of this tool (its report.json, and nothing but what a run writes), and
replaces a previous run only with ``overwrite``. Anything else is refused before any pass runs.

It imports no command module (job, tune, serving, report), which all import it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .fingerprints import first_difference
from .staging import OutputError, check_writable, sweep_stale

if TYPE_CHECKING:
    from .recipe import Recipe

TUNE_FILES = ("tune.json", "tune.md", "pareto.png", "tuned.yaml")
"""what ``compress tune`` writes beside its run's report"""
SERVING_FILES = ("serving.json", "serving.md")
"""what ``compress serve RUN_DIR`` writes into the run directory"""

# What a run writes at the top of its output directory, for runs whose report.json predates
# its own "outputs" list.
RUN_OUTPUTS = frozenset({"report.json", "report.md", "engines", "predictions.npz", "latency_samples.npz",
                         "training.png"})


def previous_run(path: Path) -> dict[str, Any] | None:
    """The report of the run that wrote ``path``, or None when ``path`` is not a run's directory."""
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or "report_version" not in report or "results" not in report:
        return None
    return report


def _names(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def preflight_out_dir(out_dir: Path, *, overwrite: bool, protected: list[tuple[str, Any]] = ()) -> None:
    """Refuse, before anything runs, an output directory the run may not write or replace.

    Allowed: a directory that does not exist, an empty one, or (with ``overwrite``) one holding
    only a previous run of this tool. Never the current directory or one that holds the model,
    the recipe, the data or the cache. Stale staging beside it (a killed run's) is removed."""
    out_dir = Path(out_dir)
    where = f"--out {out_dir}"
    resolved = out_dir.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise OutputError(f"{where} is the current directory (or holds it): a run replaces its output directory "
                          "as a whole; give a new directory, e.g. --out compress-out/NAME")
    for what, value in protected:
        if value is None:
            continue
        p = Path(value).resolve()
        if p == resolved or resolved in p.parents:
            raise OutputError(f"{where} holds the {what} {value}: a run replaces its output directory as a "
                              "whole; give a new directory, e.g. --out compress-out/NAME")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputError(f"{where} exists and is not a directory: not replacing it; give a new directory")
    if out_dir.is_dir():
        try:
            entries = sorted(p.name for p in out_dir.iterdir())
        except OSError as exc:
            raise OutputError(f"{where} cannot be read: {exc.strerror}") from exc
        if entries:
            report = previous_run(out_dir)
            if report is None:
                raise OutputError(f"{where} holds files that are not a compressor run ({_names(entries)}): "
                                  "not writing there; give a new or empty directory")
            from .fidelity.render import EXPLAIN_FILES

            known = (set(report.get("outputs") or RUN_OUTPUTS) | set(EXPLAIN_FILES) | set(TUNE_FILES)
                     | set(SERVING_FILES))
            foreign = [e for e in entries if e not in known]
            if foreign:
                raise OutputError(f"{where} holds a previous run and other files ({_names(foreign)}): not "
                                  "replacing it; move those files out or give a new directory")
            if not overwrite:
                raise OutputError(f"{where} holds a previous run (recipe {report.get('recipe')!r}, "
                                  f"{report.get('created', 'unknown date')}): pass --overwrite to replace it, "
                                  "or give a new directory")
    check_writable(out_dir, "output directory")
    sweep_stale(out_dir)


def default_out_dir(model_path: Path, recipe: Recipe) -> Path:
    return Path("compress-out") / f"{model_path.stem}-{recipe.name}"


def run_dir_report(run_dir: Path, writes: tuple[str, ...], what: str, *, overwrite: bool) -> dict[str, Any]:
    """The report of the run in ``run_dir``, which a command is about to add ``writes`` (``what``) to:
    refused where it is no run, where those files are there already without ``overwrite``, or where
    the directory cannot be written."""
    report = previous_run(run_dir)
    if report is None:
        raise ConfigError(f"{run_dir} is not a compressor run directory (no readable report.json)")
    there = [f for f in writes if (run_dir / f).exists()]
    if there and not overwrite:
        raise OutputError(f"{run_dir} already holds {there[0]}: pass --overwrite to replace {what}")
    check_writable(run_dir, "run directory")
    return report


def engines_of_run(run_dir: Path, report: dict[str, Any]) -> list[Any]:
    """The engines a finished run directory holds, each with the target that loads it."""
    from .registry import get_target
    from .target_base import Engine

    engines = []
    for entry in report.get("engines", []):
        d = run_dir / "engines" / entry["name"]
        try:
            meta = json.loads((d / "engine.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{d}/engine.json cannot be read ({type(exc).__name__}); is {run_dir} complete?") from None
        target = get_target(meta["target"])(meta.get("config") or {}, step=entry.get("step") or meta["target"])
        files = [d / Path(f).name for f in entry.get("files", [])]
        engines.append(Engine(entry["target"], entry["name"], files, entry.get("precision", meta.get("precision", "")),
                              entry.get("info", {}), built=entry.get("built", True), builder=target))
    return engines


def with_run_options(options: Any, recorded: dict[str, Any]) -> Any:
    """``options`` (a :class:`compressor.job.JobOptions`) with what the run recorded (run_options) where the
    command line gives nothing: the architecture of a state dict (with its class count), the data root,
    the evaluation limit."""
    from dataclasses import replace

    arch, num_classes = options.arch, options.num_classes
    if arch is None:
        arch, num_classes = recorded.get("arch"), num_classes or recorded.get("num_classes")
    return replace(options, arch=arch, num_classes=num_classes,
                   data_root=options.data_root or recorded.get("data_root"),
                   eval_limit=options.eval_limit or recorded.get("eval_limit"))


_INPUTS = {"model": "model file", "calibration": "calibration (training split) images",
           "evaluation_set": "evaluation images"}


def refuse_other_inputs(recorded: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """Explaining a run's engines against another model or other images than the run's would blame the
    wrong layers: refuse when a fingerprint at hand differs from the one the run recorded."""
    diff = first_difference(recorded, current, [k for k in current if recorded.get(k) is not None])
    if diff is not None:
        key, theirs, ours = diff
        raise ConfigError(f"the {what} is not the run's: its {_INPUTS[key]} fingerprint is {ours}, the run's "
                          f"{theirs}; explain compares the engines with the model and images they were made from "
                          "(give the run's own with --model / --data)")
