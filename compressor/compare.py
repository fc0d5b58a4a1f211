"""The regression gate: compare a run with a baseline run, result row by result row, and decide
which regressions fail the job.

A run directory holds ``report.json`` (with ``fingerprints`` and ``environment``) and, beside it,
what a later comparison needs that the report does not carry: ``predictions.npz`` (``labels`` and
each row's top-1 class per image, in evaluation order) and ``latency_samples.npz`` (each row's raw
batch-1 latency samples in milliseconds). :func:`compare_runs` checks every row present in both
runs (top-1, agreement with the source, latency p50, size); :func:`gating_checks` says which of
its regressions fail a job under ``--fail-on``; :func:`update_baseline` copies a run's small files
(not its engines) into a committable baseline directory.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CompressorError
from .fingerprints import first_difference
from .staging import json_text, staged_dir

if TYPE_CHECKING:
    from .data import DataBundle
    from .records import RunResult

PREDICTIONS_FILE = "predictions.npz"
LATENCY_FILE = "latency_samples.npz"
BASELINE_FILES = ("report.json", "report.md", PREDICTIONS_FILE, LATENCY_FILE)
MACHINES_DIR = "machines"
"""a baseline's per-machine baselines: BASE/machines/<machine_key>/, each a whole baseline. compare
takes the one recorded on the run's machine, so latency gates on every kind of CI machine"""
COMPARE_VERSION = 1
SOURCE_ROW = "source"
"""the row of the run's own source model; every other row is an engine"""


class CompareError(CompressorError):
    """A run or baseline is missing, unreadable, or not comparable with the other (exit 2)."""


# ---------------------------------------------------------------------- what a run saves


def save_samples(result: RunResult, data: DataBundle | None, out_dir: Path) -> dict[str, Any]:
    """Write ``predictions.npz`` and ``latency_samples.npz`` into ``out_dir``; what to put in the
    report's ``samples`` entry (empty when nothing was measured)."""
    measured = [m for m in result.measurements if m.predictions is not None]
    if data is None or not measured:
        return {}
    labels = data.evaluation_labels()
    dtype = np.int16 if len(data.classes) < 2**15 else np.int32
    predictions: dict[str, np.ndarray] = {"labels": labels.astype(dtype)}
    latency: dict[str, np.ndarray] = {}
    for m in measured:
        if m.name == "labels":  # pragma: no cover - no row is called that
            raise CompareError("a result named 'labels' clashes with the labels array of predictions.npz")
        if len(m.predictions) != len(labels):
            raise CompareError(f"result {m.name!r} has {len(m.predictions)} predictions for {len(labels)} images")
        predictions[m.name] = np.asarray(m.predictions).astype(dtype)
        latency[m.name] = np.asarray(m.latency_samples_ms, dtype=np.float32)
    np.savez_compressed(out_dir / PREDICTIONS_FILE, **predictions)
    np.savez_compressed(out_dir / LATENCY_FILE, **latency)
    return {"predictions": PREDICTIONS_FILE, "latency_samples": LATENCY_FILE, "images": int(len(labels)),
            "latency_unit": "milliseconds"}


# ---------------------------------------------------------------------- loading


@dataclass
class Run:
    path: Path
    report: dict[str, Any]
    labels: np.ndarray
    predictions: dict[str, np.ndarray]
    latency: dict[str, np.ndarray]

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in self.report.get("results", [])}

    @property
    def fingerprints(self) -> dict[str, Any]:
        return self.report.get("fingerprints") or {}


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CompareError(f"{what} {path.parent} has no {path.name} (a run made before predictions were saved?): "
                           "run it again with this version")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:
        raise CompareError(f"{what} {path}: unreadable ({type(exc).__name__}: {exc})") from exc


def load_run(path: Path, what: str = "run") -> Run:
    """A run (or baseline) directory: report.json, predictions.npz, latency_samples.npz."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{what} directory not found: {path}")
    report_path = path / "report.json"
    if not report_path.is_file():
        raise CompareError(f"{what} directory {path} has no report.json")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{what} {report_path}: unreadable report ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise CompareError(f"{what} {report_path} is not a compressor report (no results list)")
    if not report["results"]:
        raise CompareError(f"{what} {report_path} has no measured results (the recipe had no data section?)")
    if not report.get("fingerprints"):
        raise CompareError(f"{what} {report_path} has no fingerprints (written by an older compressor): "
                           "run it again with this version")
    predictions = _load_npz(path / PREDICTIONS_FILE, what)
    if "labels" not in predictions:
        raise CompareError(f"{what} {path / PREDICTIONS_FILE} has no labels array")
    labels = predictions.pop("labels").astype(np.int64)
    for name, p in predictions.items():
        if p.shape != labels.shape:
            raise CompareError(f"{what} {path / PREDICTIONS_FILE}: {name!r} has {p.size} predictions for "
                               f"{labels.size} labels")
    latency = {k: v.astype(np.float64) for k, v in _load_npz(path / LATENCY_FILE, what).items()}
    return Run(path=path, report=report, labels=labels,
               predictions={k: v.astype(np.int64) for k, v in predictions.items()}, latency=latency)


# ---------------------------------------------------------------------- thresholds


DEFAULTS: dict[str, float] = {
    "alpha": 0.01,
    "max_top1_drop": 1.0,  # points
    "max_slowdown": 1.10,  # current p50 / baseline p50
    "max_size_growth": 1.05,  # current bytes / baseline bytes
    "max_agreement_drop": 1.0,  # points
}


@dataclass
class Thresholds:
    alpha: float = DEFAULTS["alpha"]
    max_top1_drop: float = DEFAULTS["max_top1_drop"]
    max_slowdown: float = DEFAULTS["max_slowdown"]
    max_size_growth: float = DEFAULTS["max_size_growth"]
    max_agreement_drop: float = DEFAULTS["max_agreement_drop"]
    resamples: int = 2000
    seed: int = 0
    latency: str = "both"  # "relative", "absolute"
    sources: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*DEFAULTS, "resamples", "seed", "latency")} | {"from": dict(self.sources)}


LATENCY_MODES = ("both", "relative", "absolute")


def resolve_thresholds(report: dict[str, Any], resamples: int = 2000, seed: int = 0, latency: str = "both",
                       **flags: float | None) -> Thresholds:
    """Each threshold from its flag, else from the run's recipe ``acceptance`` section, else the default.

    The recipe's ``acceptance.max_top1_drop`` (points below the source model) is read as the
    largest top-1 drop allowed against the baseline too."""
    unknown = set(flags) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown thresholds: {sorted(unknown)}")
    if latency not in LATENCY_MODES:
        raise TypeError(f"latency mode must be one of {LATENCY_MODES}, not {latency!r}")
    acceptance = ((report.get("recipe_config") or {}).get("acceptance") or {})
    th = Thresholds(resamples=resamples, seed=seed, latency=latency)
    for key, default in DEFAULTS.items():
        if flags.get(key) is not None:
            value, source = flags[key], "flag"
        elif isinstance(acceptance.get(key), (int, float)):
            value, source = acceptance[key], "recipe"
        else:
            value, source = default, "default"
        setattr(th, key, float(value))
        th.sources[key] = source
    return th


# ---------------------------------------------------------------------- statistics


def mcnemar_exact(base_ok: np.ndarray, cur_ok: np.ndarray) -> tuple[float, int, int]:
    """Two-sided exact McNemar test on paired booleans: (p, lost, gained), where ``lost`` counts the
    items right in the baseline and wrong now, ``gained`` the reverse."""
    from scipy.stats import binomtest

    lost = int((base_ok & ~cur_ok).sum())
    gained = int((~base_ok & cur_ok).sum())
    n = lost + gained
    p = 1.0 if n == 0 else float(binomtest(gained, n, 0.5, alternative="two-sided").pvalue)
    return min(p, 1.0), lost, gained


def bootstrap_median_ratio(base: np.ndarray, cur: np.ndarray, *, resamples: int, seed: int, level: float,
                           base_ref: np.ndarray | None = None, cur_ref: np.ndarray | None = None,
                           ) -> tuple[float, float, float, float]:
    """median(cur) / median(base), the percentile-bootstrap interval of that ratio at ``level``
    (each sample resampled independently, with replacement, ``resamples`` times, seeded), and a
    two-sided bootstrap p-value for "the ratio is 1".

    With ``base_ref`` and ``cur_ref`` (the reference row of each run, timed alongside), the
    statistic is the ratio of ratios (median(cur) / median(cur_ref)) / (median(base) /
    median(base_ref)), and all four samples are resampled."""
    samples = [np.asarray(x, np.float64) for x in (base, cur)]
    relative = base_ref is not None and cur_ref is not None
    if relative:
        samples += [np.asarray(x, np.float64) for x in (base_ref, cur_ref)]
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    chunk = max(1, 4_000_000 // max(len(x) for x in samples))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        med = [np.median(x[rng.integers(0, len(x), (k, len(x)))], axis=1) for x in samples]
        ratios[start:start + k] = med[1] / med[0] * (med[2] / med[3] if relative else 1.0)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    below, above = (ratios <= 1.0).sum(), (ratios >= 1.0).sum()
    p = min(1.0, 2.0 * (min(below, above) + 1) / (resamples + 1))
    m = [float(np.median(x)) for x in samples]
    ratio = m[1] / m[0] * (m[2] / m[3] if relative else 1.0)
    return float(ratio), float(lo), float(hi), float(p)


# ---------------------------------------------------------------------- the comparison


def _check(result: str, metric: str, unit: str, baseline: float | None, current: float | None,
           difference: float | None, *, regression: bool, verdict: str, p_value: float | None = None,
           ci: tuple[float, float] | None = None, ci_level: float | None = None, threshold: float | None = None,
           reason: str = "", detail: str = "") -> dict[str, Any]:
    return {"result": result, "metric": metric, "unit": unit, "baseline": baseline, "current": current,
            "difference": difference, "p_value": p_value, "ci": list(ci) if ci is not None else None,
            "ci_level": ci_level, "threshold": threshold, "regression": bool(regression), "verdict": verdict,
            "reason": reason, "detail": detail}


def _accuracy_checks(name: str, cur: Run, base: Run, th: Thresholds) -> list[dict[str, Any]]:
    if name not in cur.predictions or name not in base.predictions:
        return [_check(name, "top1", "%", None, None, None, regression=False, verdict="no data",
                       detail="no per-image predictions saved for this row")]
    labels = cur.labels
    cur_ok, base_ok = cur.predictions[name] == labels, base.predictions[name] == labels
    top1_cur, top1_base = 100.0 * float(cur_ok.mean()), 100.0 * float(base_ok.mean())
    diff = top1_cur - top1_base
    p, lost, gained = mcnemar_exact(base_ok, cur_ok)
    significant = p < th.alpha and diff < 0
    too_far = -diff > th.max_top1_drop + 1e-9
    reasons = []
    if significant:
        reasons.append(f"McNemar p={p:.2g} < alpha {th.alpha:g}")
    if too_far:
        reasons.append(f"drop {-diff:.2f} points > max {th.max_top1_drop:g}")
    verdict = "REGRESSION" if reasons else "improved" if (p < th.alpha and diff > 0) else "ok"
    checks = [_check(name, "top1", "%", top1_base, top1_cur, diff, regression=bool(reasons), verdict=verdict,
                     p_value=p, threshold=th.max_top1_drop, reason="; ".join(reasons),
                     detail=f"{lost} images lost, {gained} gained of {labels.size}")]
    if name != "source" and "source" in cur.predictions and "source" in base.predictions:
        cur_ag = cur.predictions[name] == cur.predictions["source"]
        base_ag = base.predictions[name] == base.predictions["source"]
        ag_cur, ag_base = 100.0 * float(cur_ag.mean()), 100.0 * float(base_ag.mean())
        ag_diff = ag_cur - ag_base
        p_ag, lost_ag, gained_ag = mcnemar_exact(base_ag, cur_ag)
        worse = -ag_diff > th.max_agreement_drop + 1e-9
        checks.append(_check(
            name, "agreement", "%", ag_base, ag_cur, ag_diff, regression=worse,
            verdict="REGRESSION" if worse else "ok", p_value=p_ag, threshold=th.max_agreement_drop,
            reason=f"agreement drop {-ag_diff:.2f} points > max {th.max_agreement_drop:g}" if worse else "",
            detail=f"{lost_ag} images stopped agreeing with the source, {gained_ag} started"))
    return checks


REFERENCE_ROW = "source"


def _slowdown(ratio: float, lo: float, th: Thresholds) -> bool:
    return lo > 1.0 and ratio > th.max_slowdown


def _latency_check(name: str, cur: Run, base: Run, th: Thresholds) -> dict[str, Any]:
    base_samples, cur_samples = base.latency.get(name), cur.latency.get(name)
    if base_samples is None or cur_samples is None or len(base_samples) < 2 or len(cur_samples) < 2:
        return _check(name, "latency_p50", "ms", None, None, None, regression=False, verdict="no data",
                      detail="no raw latency samples saved for this row")
    level = 1.0 - th.alpha
    base_p50, cur_p50 = float(np.median(base_samples)), float(np.median(cur_samples))
    samples = f"{len(base_samples)} baseline and {len(cur_samples)} current batch-1 samples"
    ratio, lo, hi, p = bootstrap_median_ratio(base_samples, cur_samples, resamples=th.resamples, seed=th.seed,
                                              level=level)
    base_ref, cur_ref = base.latency.get(REFERENCE_ROW), cur.latency.get(REFERENCE_ROW)
    have_ref = all(r is not None and len(r) >= 2 for r in (base_ref, cur_ref))
    if th.latency != "absolute" and name == REFERENCE_ROW:
        # The same source file in both runs: its p50 ratio is the machine's, not a regression.
        return _check(name, "latency_p50", "ms", base_p50, cur_p50, ratio - 1.0,
                      regression=False, verdict="reference", p_value=p, ci=(lo, hi), ci_level=level,
                      detail=f"{samples}; the source model is the same file in both runs, so this ratio is the "
                             f"machine's (load, clock, host); engine rows are also judged relative to it")
    rel = None
    if th.latency != "absolute" and have_ref:
        r_ratio, r_lo, r_hi, r_p = bootstrap_median_ratio(base_samples, cur_samples, resamples=th.resamples,
                                                          seed=th.seed, level=level,
                                                          base_ref=base_ref, cur_ref=cur_ref)
        rel = {"ratio": r_ratio, "ci": [r_lo, r_hi], "p_value": r_p,
               "of_source": [base_p50 / float(np.median(base_ref)), cur_p50 / float(np.median(cur_ref))]}
    abs_slow = _slowdown(ratio, lo, th)
    rel_slow = rel is not None and _slowdown(rel["ratio"], rel["ci"][0], th)
    abs_fast = hi < 1.0 and ratio < 1.0 / th.max_slowdown
    rel_fast = rel is not None and rel["ci"][1] < 1.0 and rel["ratio"] < 1.0 / th.max_slowdown
    if rel is None:  # absolute mode, or no source row to judge by
        slow, fast, significant = abs_slow, abs_fast, lo > 1.0
    elif th.latency == "relative":
        slow, fast, significant = rel_slow, rel_fast, rel["ci"][0] > 1.0
    else:  # both: slower in raw milliseconds and slower relative to the machine's reference row
        slow, fast, significant = abs_slow and rel_slow, abs_fast and rel_fast, lo > 1.0 and rel["ci"][0] > 1.0
    if slow:
        verdict = "REGRESSION"
    elif fast:
        verdict = "faster"
    else:
        verdict = "ok (slower, under max)" if significant else "ok"
    reasons = []
    if slow and th.latency != "relative":
        reasons.append(f"p50 ratio {ratio:.3f} > max {th.max_slowdown:g}, {level:.0%} CI lower bound {lo:.3f} > 1")
    if slow and rel is not None:
        reasons.append(f"relative to the source row {rel['ratio']:.3f} > max {th.max_slowdown:g}, "
                       f"{level:.0%} CI lower bound {rel['ci'][0]:.3f} > 1")
    detail = samples
    if rel is not None:
        detail += (f"; engine p50 / source p50 {rel['of_source'][0]:.3f} in the baseline, {rel['of_source'][1]:.3f} "
                   f"now (ratio {rel['ratio']:.3f}, {level:.0%} CI {rel['ci'][0]:.3f}-{rel['ci'][1]:.3f})")
    elif th.latency != "absolute":
        detail += "; no source row in one of the runs: raw milliseconds only"
    check = _check(
        name, "latency_p50", "ms", base_p50, cur_p50, ratio - 1.0, regression=slow,
        verdict=verdict, p_value=p, ci=(lo, hi), ci_level=level, threshold=th.max_slowdown,
        reason="; ".join(reasons), detail=detail)
    check["relative"] = rel
    return check


def _size_check(name: str, cur_row: dict[str, Any], base_row: dict[str, Any], th: Thresholds) -> dict[str, Any]:
    base_value, cur_value = base_row.get("size_bytes"), cur_row.get("size_bytes")
    if not base_value or not cur_value:
        return _check(name, "size", "bytes", base_value, cur_value, None, regression=False, verdict="no data",
                      detail="size unknown in one of the runs")
    growth = cur_value / base_value
    bigger = growth > th.max_size_growth
    return _check(name, "size", "bytes", float(base_value), float(cur_value), growth - 1.0, regression=bigger,
                  verdict="REGRESSION" if bigger else "ok", threshold=th.max_size_growth,
                  reason=f"size ratio {growth:.3f} > max {th.max_size_growth:g}" if bigger else "")


def _environment_notes(cur: dict[str, Any], base: dict[str, Any]) -> list[str]:
    notes = []
    for key in ("cpu", "isa_flags", "threads", "cores_available", "python"):
        if cur.get(key) != base.get(key):
            notes.append(f"{key}: baseline {base.get(key)!r}, current {cur.get(key)!r}")
    cv, bv = cur.get("versions") or {}, base.get("versions") or {}
    for lib in sorted(set(cv) | set(bv)):
        if cv.get(lib) != bv.get(lib):
            notes.append(f"{lib}: baseline {bv.get(lib, 'absent')}, current {cv.get(lib, 'absent')}")
    return notes


def compare_runs(cur: Run, base: Run, th: Thresholds) -> dict[str, Any]:
    """Every check of ``cur`` against ``base``, regressions first; raises :class:`CompareError` when
    they are not comparable (different evaluation sets or source model files: exit 2).

    - ``top1``: McNemar's exact test on the paired per-image correctness (a two-sided binomial
      test on the discordant images); a regression when p < alpha and top-1 went down, or when
      top-1 went down by more than ``max_top1_drop`` points whatever p is;
    - ``agreement`` (engines only): top-1 agreement with the run's own source model; a regression
      when it went down by more than ``max_agreement_drop`` points (McNemar's p is shown, not used);
    - ``latency_p50``: current p50 / baseline p50 with a seeded percentile-bootstrap interval
      (level 1 - alpha), and, for engine rows, the same ratio relative to the run's own source row
      (timed in the same interleaved rounds): (engine p50 / source p50 now) / (engine p50 / source
      p50 in the baseline), its interval from resampling all four sample sets. The source row is
      the same model file in both runs, so its own ratio is the machine's (load, clock, host): a
      reference, never flagged. With ``latency="both"`` (the default) a slowdown is a regression
      when it shows in both ratios: each interval lies above 1 and each ratio is above
      ``max_slowdown`` (an intersection-union test, so still level alpha); ``"relative"`` and
      ``"absolute"`` use one ratio only. Why one ratio alone misleads on a shared machine (a busy
      machine moves the raw milliseconds, the source row's own drift moves the relative ratio):
      benchmarks/results/regression_gate and regression_gate_busy (benchmarks/regression_gate.py);
    - ``size``: current bytes / baseline bytes; a regression above ``max_size_growth``.
    """
    cf, bf = cur.fingerprints, base.fingerprints
    differs = first_difference(bf, cf, ("evaluation_set", "model"))
    if differs is not None:
        key, was, now = differs
        what = {"evaluation_set": "were evaluated on different image sets",
                "model": "compress different source models"}[key]
        raise CompareError(f"the run and the baseline {what} ({key} fingerprint {now} vs {was}): not comparable")
    if cur.labels.shape != base.labels.shape or not np.array_equal(cur.labels, base.labels):
        raise CompareError("the run and the baseline saved different labels for the same evaluation set fingerprint")
    notes = []
    for key in ("recipe", "calibration"):
        if cf.get(key) != bf.get(key):
            notes.append(f"the {key} differs from the baseline's ({bf.get(key)} -> {cf.get(key)})")
    env_notes = _environment_notes(cur.report.get("environment") or {}, base.report.get("environment") or {})
    if env_notes:
        notes.append("measured in a different environment, latency differences may come from it: "
                     + "; ".join(env_notes))
    loaded = [f"the {which} timed under load ({'; '.join(r.report['timing_load']['reasons'])})"
              for which, r in (("run", cur), ("baseline", base)) if (r.report.get("timing_load") or {}).get("under_load")]
    notes += loaded
    checks: list[dict[str, Any]] = []
    cur_rows, base_rows = cur.rows, base.rows
    if not any(name in base_rows for name in cur_rows if name != SOURCE_ROW):
        raise CompareError(f"the run and the baseline have no engine row in common (run: {', '.join(cur_rows)}; "
                           f"baseline: {', '.join(base_rows)}), so only the source row could be compared: "
                           "compare runs of the same targets")
    for name in [*cur_rows, *(n for n in base_rows if n not in cur_rows)]:
        if name not in base_rows or name not in cur_rows:
            where = "current run" if name in cur_rows else "baseline"
            checks.append(_check(name, "presence", "", None, None, None, regression=False,
                                 verdict=f"only in {where}", detail=f"result {name!r} is only in the {where}"))
            continue
        checks += _accuracy_checks(name, cur, base, th)
        checks.append(_latency_check(name, cur, base, th))
        checks.append(_size_check(name, cur_rows[name], base_rows[name], th))
    checks.sort(key=lambda c: not c["regression"])  # stable: regressions first, then the run's row order
    regressions = sum(c["regression"] for c in checks)
    return {
        "compare_version": COMPARE_VERSION,
        "run": str(cur.path),
        "baseline": str(base.path),
        "run_created": cur.report.get("created"),
        "baseline_created": base.report.get("created"),
        "recipe": cur.report.get("recipe"),
        "images": int(cur.labels.size),
        "fingerprints": {"run": cf, "baseline": bf},
        "thresholds": th.to_json(),
        "passed": regressions == 0,
        "regressions": regressions,
        "checks": checks,
        "notes": notes,
        "same_environment": not env_notes,
        "under_load": bool(loaded),
    }


def machine_key(env: dict[str, Any]) -> str:
    """A directory name for the machine a report was timed on: its CPU name, then a hash of what
    decides its timings (CPU, ISA flags, cores, threads), e.g. ``intel-xeon-processor-3f2a9c1e``."""
    import hashlib
    import re

    what = json.dumps([env.get(k) for k in ("cpu", "isa_flags", "cores_available", "threads")], default=str)
    name = re.sub(r"\((r|tm)\)", "", str(env.get("cpu") or "unknown cpu").lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "cpu"
    return f"{slug}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


def pick_baseline(baseline_dir: Path, env: dict[str, Any]) -> tuple[Path, str | None]:
    """The baseline for a run timed in ``env``: BASE/machines/<machine_key> where one was recorded on
    such a machine, else BASE itself. Returns (directory, the machine key or None)."""
    baseline_dir = Path(baseline_dir)
    key = machine_key(env)
    mine = baseline_dir / MACHINES_DIR / key
    if (mine / "report.json").is_file():
        return mine, key
    return baseline_dir, None


def recorded_machines(baseline_dir: Path) -> list[str]:
    d = Path(baseline_dir) / MACHINES_DIR
    return sorted(p.name for p in d.iterdir() if (p / "report.json").is_file()) if d.is_dir() else []


def compare_dirs(run_dir: Path, baseline_dir: Path, *, resamples: int = 2000, seed: int = 0,
                 latency: str = "both", **flags: float | None) -> dict[str, Any]:
    cur = load_run(run_dir, "run")
    env = cur.report.get("environment") or {}
    chosen, key = pick_baseline(baseline_dir, env)
    base = load_run(chosen, "baseline")
    th = resolve_thresholds(cur.report, resamples=resamples, seed=seed, latency=latency, **flags)
    cmp = compare_runs(cur, base, th)
    cmp["baseline_machine"] = key
    recorded = recorded_machines(baseline_dir)
    if key is not None:
        cmp["notes"].insert(0, f"baseline recorded on this machine ({MACHINES_DIR}/{key})")
    elif recorded:
        cmp["notes"].insert(0, f"no baseline recorded on this machine ({machine_key(env)}); the default one; "
                               f"recorded machines: {', '.join(recorded)}")
    return cmp


# ---------------------------------------------------------------------- what fails a job


ACCURACY_METRICS = ("top1", "agreement")
"""the checks ``--fail-on accuracy`` gates on: they come out the same on any machine"""
LATENCY_METRIC = "latency_p50"
FAIL_ON = ("all", "accuracy", "auto")


@dataclass(frozen=True)
class Gate:
    """What a comparison's regressions do to a job under ``--fail-on``."""

    fail_on: str
    failing: list[dict[str, Any]]
    """the regressions that fail the job (exit 1)"""
    reported: int
    """regressions reported, not failing"""
    reason: str
    """why those are not failing ("" when none are)"""

    @property
    def latency_only(self) -> bool:
        """The job fails on latency flags alone: the ones a second timing in a fresh process may
        not repeat (accuracy and size flags are deterministic)."""
        return bool(self.failing) and all(c["metric"] == LATENCY_METRIC for c in self.failing)

    def to_json(self) -> dict[str, Any]:
        return {"fail_on": self.fail_on, "failing": [f"{c['result']}:{c['metric']}" for c in self.failing],
                "reported": self.reported, "reason": self.reason, "latency_only": self.latency_only}


def gating_checks(cmp: dict[str, Any], fail_on: str = "all") -> Gate:
    """Which regressions of ``cmp`` (from :func:`compare_runs`) fail a job: under ``"all"`` every
    one; under ``"accuracy"`` top-1 and agreement only; under ``"auto"`` every one where the run
    was measured in the baseline's environment (CPU, ISA flags, threads, library versions) and
    neither run timed under load (machine_load.py), else accuracy only, since latency and size may then
    come from the other machine, library or the load."""
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on must be one of {FAIL_ON}, not {fail_on!r}")
    quiet = not cmp.get("under_load", False)
    gate_all = fail_on == "all" or (fail_on == "auto" and cmp["same_environment"] and quiet)
    regressions = [c for c in cmp["checks"] if c["regression"]]
    failing = [c for c in regressions if gate_all or c["metric"] in ACCURACY_METRICS]
    reported = len(regressions) - len(failing)
    reason = ""
    if reported:
        why = ""
        if fail_on == "auto":
            why = " (the environment differs from the baseline's)" if not cmp["same_environment"] else \
                " (timed under load)"
        reason = f"outside --fail-on {fail_on}{why}"
    return Gate(fail_on=fail_on, failing=failing, reported=reported, reason=reason)


# ---------------------------------------------------------------------- output


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _size(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.3f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _p(p: float | None) -> str:
    return "-" if p is None else f"p={p:.2g}"


def check_cells(c: dict[str, Any]) -> list[str]:
    """result, metric, baseline, current, difference, p-value / CI, verdict."""
    m, verdict = c["metric"], c["verdict"] if not c["regression"] else f"**{c['verdict']}**"
    if c["baseline"] is None and c["current"] is None:
        return [c["result"], m, "-", "-", "-", "-", f"{verdict} ({c['detail']})" if c["detail"] else verdict]
    if m in ("top1", "agreement"):
        stat = f"{_p(c['p_value'])} McNemar ({c['detail'].split(' of ')[0]})" if m == "top1" else \
            f"{_p(c['p_value'])} McNemar"
        base, cur, diff = f"{_num(c['baseline'])} %", f"{_num(c['current'])} %", f"{c['difference']:+.2f} pts"
    elif m == "latency_p50":
        lo, hi = c["ci"]
        rel = c.get("relative")
        stat = f"ratio {c['difference'] + 1:.3f}, {c['ci_level']:.0%} CI [{lo:.3f}, {hi:.3f}]"
        base, cur = f"{_num(c['baseline'], 3)} ms", f"{_num(c['current'], 3)} ms"
        if rel:
            stat += f"; vs source {rel['ratio']:.3f} [{rel['ci'][0]:.3f}, {rel['ci'][1]:.3f}]"
            base, cur = f"{base} ({rel['of_source'][0]:.3f}x src)", f"{cur} ({rel['of_source'][1]:.3f}x src)"
        diff = f"{100 * c['difference']:+.1f} %"
    else:
        stat = "-" if c["difference"] is None else f"ratio {c['difference'] + 1:.3f}"
        base, cur = _size(c["baseline"]), _size(c["current"])
        diff = "-" if c["difference"] is None else f"{100 * c['difference']:+.1f} %"
    return [c["result"], m, base, cur, diff, stat, verdict]


COMPARE_HEADER = ["result", "metric", "baseline", "current", "difference", "p-value / CI", "verdict"]


def render_markdown(cmp: dict[str, Any]) -> str:
    th = cmp["thresholds"]
    src = th["from"]
    head = "passed" if cmp["passed"] else f"REGRESSION ({cmp['regressions']} of {len(cmp['checks'])} checks)"
    lines = [f"# compressor compare: {head}", ""]
    lines.append(f"- run: `{cmp['run']}` ({cmp['run_created']}), baseline: `{cmp['baseline']}` "
                 f"({cmp['baseline_created']}); recipe {cmp['recipe']}; {cmp['images']} evaluation images")
    lines.append(f"- thresholds: alpha {th['alpha']:g} ({src['alpha']}), top-1 drop {th['max_top1_drop']:g} points "
                 f"({src['max_top1_drop']}), slowdown {th['max_slowdown']:g}x ({src['max_slowdown']}), size growth "
                 f"{th['max_size_growth']:g}x ({src['max_size_growth']}), agreement drop "
                 f"{th['max_agreement_drop']:g} points ({src['max_agreement_drop']}); latency "
                 f"{th.get('latency', 'absolute')}")
    lines += ["", "| " + " | ".join(COMPARE_HEADER) + " |", "|" + "---|" * len(COMPARE_HEADER)]
    for c in cmp["checks"]:
        lines.append("| " + " | ".join(check_cells(c)) + " |")
    lines += ["", "top1: exact McNemar test on the images each run got right; a regression when p < alpha and "
              "top-1 fell, or when it fell by more than the limit. latency_p50: current p50 / baseline p50, and "
              "(vs source) each engine's p50 as a multiple of its own run's source p50, timed in the same "
              "interleaved rounds; the source row's own ratio is the machine's (reference, never flagged). "
              + {"both": "A slowdown counts when it shows in both: a busier machine slows the source too, and the "
                         "source's own jitter leaves the raw milliseconds alone. ",
                 "relative": "A slowdown counts relative to the source only. ",
                 "absolute": "Raw milliseconds only. "}[th.get("latency", "absolute")]
              + f"Bootstrap interval ({th['resamples']} resamples, seed {th['seed']}); a regression when the "
              "interval lies above 1 and the ratio is above the limit."]
    for c in cmp["checks"]:
        if c["regression"]:
            lines.append(f"- **{c['result']} {c['metric']}**: {c['reason']} ({c['detail']})")
    for note in cmp["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def render_junit(cmp: dict[str, Any]) -> str:
    """One testcase per (result, metric); a regression is a failure, a check without data a skip."""
    import xml.etree.ElementTree as ET

    checks = cmp["checks"]
    skipped = [c for c in checks if c["verdict"] == "no data" or c["metric"] == "presence"]
    suites = ET.Element("testsuites", name="compressor compare", tests=str(len(checks)),
                        failures=str(cmp["regressions"]), errors="0")
    suite = ET.SubElement(suites, "testsuite", name=f"compare {cmp['recipe']}", tests=str(len(checks)),
                          failures=str(cmp["regressions"]), errors="0", skipped=str(len(skipped)))
    props = ET.SubElement(suite, "properties")
    for k in ("run", "baseline"):
        ET.SubElement(props, "property", name=k, value=str(cmp[k]))
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"compare.{c['result']}", name=c["metric"], time="0")
        cells = dict(zip(COMPARE_HEADER, check_cells(c)))
        text = "; ".join(f"{k}: {v}" for k, v in cells.items() if k not in ("result", "metric"))
        if c["regression"]:
            failure = ET.SubElement(case, "failure", message=c["reason"], type="regression")
            failure.text = f"{text}; {c['detail']}"
        elif c in skipped:
            ET.SubElement(case, "skipped", message=c["detail"] or c["verdict"])
        else:
            ET.SubElement(case, "system-out").text = text
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def render_json(cmp: dict[str, Any]) -> str:
    return json_text(cmp)


# ---------------------------------------------------------------------- baselines


def update_baseline(run_dir: Path, baseline_dir: Path, *, machine: bool = False) -> tuple[Path, dict[str, int]]:
    """Copy a run's report and samples (not its engines) into ``baseline_dir``, replacing what was
    there in one swap; its per-machine baselines stay. ``machine``: into
    ``baseline_dir/machines/<the run's machine_key>`` instead. Returns the directory written and the
    bytes of each file in it."""
    run_dir, baseline_dir = Path(run_dir), Path(baseline_dir)
    run = load_run(run_dir, "run")  # whole and readable
    # The default baseline and a machine's are checked alike: BASE holds nothing but a baseline's
    # files and machines/, machines/ nothing but machine baselines, and the one written nothing else.
    _refuse_foreign(baseline_dir, {*BASELINE_FILES, MACHINES_DIR}, run_dir)
    machines = baseline_dir / MACHINES_DIR
    if machines.is_dir():
        stray = sorted(p.name for p in machines.iterdir() if not p.is_dir() or p.is_symlink())
        _refuse_names(machines, stray)
    if machine:
        baseline_dir = machines / machine_key(run.report.get("environment") or {})
        _refuse_foreign(baseline_dir, set(BASELINE_FILES), run_dir)
    keep = machines if not machine else None
    written: dict[str, int] = {}
    with staged_dir(baseline_dir, replace=True, what="baseline") as staging:
        for name in BASELINE_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
                written[name] = (staging / name).stat().st_size
        if keep is not None and keep.is_dir():
            shutil.copytree(keep, staging / MACHINES_DIR)
    return baseline_dir, written


def _refuse_foreign(directory: Path, ours: set[str], run_dir: Path) -> None:
    """Refuse to write a baseline into ``directory`` when it is a file, the run itself, or holds
    anything but ``ours`` (``machines`` only as a directory)."""
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir():
        raise CompareError(f"baseline {directory} exists and is not a directory")
    if directory.resolve() == run_dir.resolve():
        raise CompareError("the baseline directory is the run directory")
    _refuse_names(directory, sorted(p.name for p in directory.iterdir()
                                    if p.name not in ours or (p.name == MACHINES_DIR and not p.is_dir())))


def _refuse_names(directory: Path, foreign: list[str]) -> None:
    if foreign:
        raise CompareError(f"baseline {directory} holds files a baseline does not ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}): not overwriting it")
