"""Helpers for the benchmark scripts: run one `compress` command, keep its report, add the
issue's figures (ratios between rows of that one report) to report.md and figures.json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared"))
COMPRESS = Path(os.environ.get("COMPRESS", REPO / ".venv" / "bin" / "compress"))


def _spellings(path: Path) -> list[str]:
    """``path`` as written and as resolved (a symlinked checkout), longest first."""
    forms = {str(path), str(path.resolve())}
    return sorted((f.rstrip("/") for f in forms if f.rstrip("/")), key=len, reverse=True)


def scrub(text: str, *, repo: Path | None = None, shared: Path | None = None) -> str:
    """``text`` with this machine's paths as seen from the repository root, where the benchmarks run:
    the shared folder as its path relative to the repository (``../shared``), then the repository's own
    paths relative to it (``REPO/x`` -> ``x``, a bare ``REPO`` -> ``.``), so the venv's compress reads
    ``.venv/bin/compress``. The shared folder goes first: it may sit outside the repository. ``repo`` and
    ``shared``: the checkout the text was written in, when not this one (old reports). Idempotent."""
    repo = REPO if repo is None else Path(repo)
    shared = SHARED if shared is None else Path(shared)
    start, end = r"(?<![\w.-])", r"(?![\w.-])"  # /work/main is neither in /x/work/main nor in /work/main2
    rel = os.path.relpath(shared.resolve(), repo.resolve())
    for form in _spellings(shared):
        text = re.sub(start + re.escape(form) + end, lambda _: rel, text)
    for form in _spellings(repo):
        text = re.sub(start + re.escape(form) + "/", "", text)
        text = re.sub(start + re.escape(form) + end, ".", text)
    return text


def write_text(path: Path, text: str) -> None:
    """``path.write_text(scrub(text))``: what the benchmarks write for people to read."""
    Path(path).write_text(scrub(text))


# what `pip install -e .` leaves out and some benchmarks import: pip install -e '.[bench]'
BENCH_EXTRA = "pip install -e '.[bench]'"


def require_modules(*modules: str, benchmark: str | None = None) -> None:
    """Before any measuring: exit 2 with one line when a module the benchmark imports is missing
    (rather than a ModuleNotFoundError at the end of a long run). ``benchmark``: the caller's file name."""
    import importlib.util

    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken one
            found = False
        if not found:
            missing.append(module)
    if missing:
        if benchmark is None:
            benchmark = Path(sys._getframe(1).f_globals.get("__file__") or sys.argv[0]).stem
        print(f"benchmark {benchmark} needs {', '.join(missing)}: {BENCH_EXTRA}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_compress(name: str, model: Path, recipe: str, *extra: str, launcher: list[str] | None = None) -> dict:
    """Run the CLI; engines go to benchmarks/work/NAME, the report to benchmarks/results/NAME."""
    work = HERE / "work" / name
    cmd = [*(launcher or [str(COMPRESS)]), str(model), "--recipe", recipe, "--trust-model", "--data",
           str(SHARED / "datasets" / "cifar10"), "--threads", "2", "--out", str(work), "--overwrite", *extra]
    print("$", " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code not in (0, 1):  # 1: an acceptance limit missed; the report is still complete
        sys.exit(code)
    report = json.loads((work / "report.json").read_text())
    report["command"] = " ".join(cmd)
    return report


def row(report: dict, name: str) -> dict:
    for r in report["results"]:
        if r["name"] == name:
            return r
    raise KeyError(f"no result {name!r} in the report (have: {[r['name'] for r in report['results']]})")


def publish(name: str, report: dict, figures: list[dict], sections: list[str] | None = None) -> Path:
    """Write report.json/report.md (with the figures section, then ``sections``: Markdown lines) under
    benchmarks/results/NAME."""
    from compressor.report import render_markdown

    dest = HERE / "results" / name
    dest.mkdir(parents=True, exist_ok=True)
    report["figures"] = figures
    write_text(dest / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    lines = [render_markdown(report), "## Figures asked for", "", f"Command: `{report['command']}`", "",
             "| figure | value | asked | verdict |", "|---|---|---|---|"]
    for f in figures:
        verdict = "pass" if f["passed"] else "**FAIL**"
        lines.append(f"| {f['figure']} | {f['value']} | {f['asked']} | {verdict} |")
    lines += sections or []
    write_text(dest / "report.md", "\n".join(lines) + "\n")
    print(f"wrote {dest}/report.md")
    for f in figures:
        print(f"  {f['figure']}: {f['value']} (asked {f['asked']}) -> {'pass' if f['passed'] else 'FAIL'}")
    return dest


def figure(name: str, value: float, asked: str, passed: bool, unit: str = "") -> dict:
    return {"figure": name, "value": f"{value:.3f}{unit}", "asked": asked, "passed": bool(passed)}


def monitored(cores: int, work):
    """Run ``work()`` with the machine's load watched before and during it: (result, seconds, load summary)."""
    import time

    from compressor.machine_load import LoadMonitor

    load = LoadMonitor(cores=cores)
    load.before()
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    load.during()
    return result, seconds, load.summary()
