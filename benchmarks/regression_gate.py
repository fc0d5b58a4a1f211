"""Does the regression gate hold on the real model? (issue 5, "must show")

Runs the CI regression recipe on the real MobileNetV2 ``--reruns`` times (default 10, each with
``--no-cache``, so every run quantizes, builds and measures afresh), plus once with the
calibration damaged (one image instead of the recipe's samples). Then, with the ``compress
compare`` CLI:

- every rerun against the committed baseline (benchmarks/baselines/ci_mobilenetv2_int8, measured
  on another day): the gate CI runs, expected to raise no accuracy and no latency flag;
- every rerun against the first rerun (a baseline from the same session);
- the damaged run against the committed baseline: expected to be flagged with p < 0.01;
- each comparison in the three ``--latency`` modes (both, the default; relative to the source row
  only; raw milliseconds only), to show what each would flag.

Writes benchmarks/results/regression_gate/report.{json,md} (regression_gate_busy with
``--busy-reruns``).

These reports are why ``compress compare`` judges a slowdown in both ratios by default
(compressor/compare.py, ``compare_runs``): the reruns change no engine, so every latency flag in
them is a false alarm. Beside a busy process the machine ratio (the source row's) moves every row,
and raw milliseconds (``absolute``) flag reruns; between quiet runs PyTorch eager (the source row)
drifts while the engine's own p50 stays put, and the ratio to the source (``relative``) flags
reruns; ``both`` flags neither. The summary tables' "latency flags" per mode and the "engine p50
ratio", "engine ratio vs source" and "machine ratio" columns give the figures of the last run.

    python benchmarks/regression_gate.py [--reruns 10] [--eval-limit N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _common import COMPRESS, HERE, REPO, SHARED, write_text

RECIPE = REPO / "recipes" / "ci_mobilenetv2_int8.yaml"
BASELINE = HERE / "baselines" / "ci_mobilenetv2_int8"
MODEL = SHARED / "models" / "mobilenet_v2_cifar10.pt"
MODES = ("both", "relative", "absolute")  # compress compare --latency


def compress(out: Path, recipe: Path, extra: list[str], busy: bool = False) -> float:
    cmd = [str(COMPRESS), str(MODEL), "--recipe", str(recipe), "--trust-model", "--data",
           str(SHARED / "datasets" / "cifar10"), "--threads", "2", "--out", str(out), "--overwrite", "--no-cache", "--quiet", *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        code = subprocess.call(cmd)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if code not in (0, 1):
        sys.exit(f"compress exited {code}")
    return time.perf_counter() - t0


def compare(run: Path, baseline: Path, mode: str) -> dict:
    out = run.parent / f"{run.name}.compare-{baseline.name}-{mode}.json"  # beside the run: --overwrite keeps working
    cmd = [str(COMPRESS), "compare", str(run), "--baseline", str(baseline), "--latency", mode, "--json", str(out)]
    code = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    if code not in (0, 1):
        sys.exit(f"compress compare exited {code}: {' '.join(cmd)}")
    cmp = json.loads(out.read_text())
    assert (code == 1) == (not cmp["passed"]), (code, cmp["passed"])
    by = {(c["result"], c["metric"]): c for c in cmp["checks"]}
    eng, src = by.get(("openvino-int8", "latency_p50"), {}), by.get(("source", "latency_p50"), {})
    top1 = by.get(("openvino-int8", "top1"), {})
    return {
        "exit": code,
        "flags": sorted(f"{c['result']}:{c['metric']}" for c in cmp["checks"] if c["regression"]),
        "top1_baseline": top1.get("baseline"), "top1_current": top1.get("current"),
        "top1_diff": top1.get("difference"), "top1_p": top1.get("p_value"), "top1_detail": top1.get("detail"),
        "latency_ratio": None if eng.get("difference") is None else 1.0 + eng["difference"],
        "latency_ci": eng.get("ci"), "latency_verdict": eng.get("verdict"),
        "relative_ratio": (eng.get("relative") or {}).get("ratio"),
        "relative_ci": (eng.get("relative") or {}).get("ci"),
        "engine_p50_ms": eng.get("current"), "source_p50_ms": src.get("current"),
        "machine_ratio": None if src.get("difference") is None else 1.0 + src["difference"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reruns", type=int, default=10)
    ap.add_argument("--eval-limit", type=int, help="override the recipe's 1000 evaluation images")
    ap.add_argument("--busy-reruns", type=int, default=0,
                    help="run the last N reruns beside a busy-looping process on one core (a shared CI machine)")
    ap.add_argument("--compare-only", action="store_true", help="reuse the runs under benchmarks/work/ of the same name")
    args = ap.parse_args()
    name = "regression_gate" + ("_busy" if args.busy_reruns else "")
    work = HERE / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []

    damaged_recipe = work / "ci_mobilenetv2_int8_one_image.yaml"
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["name"] = "ci_mobilenetv2_int8_one_image"
    cfg["data"]["calibration"]["samples"] = 1
    damaged_recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))

    runs, seconds, busy = [], {}, {}
    damaged = work / "damaged-one-image"
    previous = json.loads((HERE / "results" / name / "report.json").read_text()) if args.compare_only else {}
    for i in range(1, args.reruns + 1):
        run = work / f"rerun-{i:02d}"
        busy[run.name] = i > args.reruns - args.busy_reruns
        if not args.compare_only:
            seconds[run.name] = compress(run, RECIPE, extra, busy=busy[run.name])
        runs.append(run)
    if not args.compare_only:
        seconds[damaged.name] = compress(damaged, damaged_recipe, extra)
    else:
        seconds, busy = previous.get("run_seconds", {}), previous.get("busy", busy)

    rows = []
    baselines = [BASELINE] if not args.eval_limit else []
    for run in [*runs, damaged]:
        for base in [*baselines, runs[0]]:
            if base == run:
                continue
            for mode in MODES:
                rows.append({"run": run.name, "baseline": "committed" if base == BASELINE else base.name,
                             "latency_mode": mode, **compare(run, base, mode)})

    def subset(run_prefix: str, baseline: str, mode: str) -> list[dict]:
        return [r for r in rows if r["run"].startswith(run_prefix) and r["baseline"] == baseline
                and r["latency_mode"] == mode]

    def span(rr: list[dict], key: str) -> list[float | None]:
        values = [r[key] for r in rr if r[key] is not None]
        return [min(values), max(values)] if values else [None, None]

    summary = {}
    for baseline in (["committed"] if baselines else []) + [runs[0].name]:
        for mode in MODES:
            rr = subset("rerun-", baseline, mode)
            summary[f"reruns vs {baseline}, latency {mode}"] = {
                "comparisons": len(rr),
                "with_any_flag": sum(bool(r["flags"]) for r in rr),
                "accuracy_flags": sum(any(f.endswith(("top1", "agreement")) for f in r["flags"]) for r in rr),
                "latency_flags": sum(any(f.endswith("latency_p50") for f in r["flags"]) for r in rr),
                "latency_ratio_range": span(rr, "latency_ratio"),
                "relative_ratio_range": span(rr, "relative_ratio"),
                "machine_ratio_range": span(rr, "machine_ratio"),
            }
    dmg = [r for r in rows if r["run"] == damaged.name and r["latency_mode"] == "both"]
    report = {
        "benchmark": "regression_gate",
        "command": (previous["command"].split(" (runs compared again")[0] + " (runs compared again by --compare-only)"
                    if args.compare_only else " ".join(["python", "benchmarks/regression_gate.py", *sys.argv[1:]])),
        "model": str(MODEL), "recipe": str(RECIPE.relative_to(REPO)), "reruns": args.reruns,
        "baseline": str(BASELINE.relative_to(REPO)) if baselines else None,
        "run_seconds": seconds, "busy": busy, "summary": summary, "damaged": dmg, "comparisons": rows,
    }
    dest = HERE / "results" / name
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "report.json", json.dumps(report, indent=1) + "\n")

    def fmt(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    lines = ["# Regression gate on the real MobileNetV2", "",
             f"Command: `{report['command']}`. Recipe `{report['recipe']}` ({MODEL.name}, OpenVINO INT8), "
             f"each run with `--no-cache`; compared with `compress compare`.", "",
             "## Summary", "", "| comparisons | latency mode | compared | any flag | accuracy flags | latency flags | "
             "engine p50 ratio (min-max) | engine ratio vs source (min-max) | machine ratio (source row, min-max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        what, mode = key.rsplit(", latency ", 1)
        lines.append(f"| {what} | {mode} | {s['comparisons']} | {s['with_any_flag']} | {s['accuracy_flags']} | "
                     f"{s['latency_flags']} | {fmt(s['latency_ratio_range'][0])}-{fmt(s['latency_ratio_range'][1])} | "
                     f"{fmt(s['relative_ratio_range'][0])}-{fmt(s['relative_ratio_range'][1])} | "
                     f"{fmt(s['machine_ratio_range'][0])}-{fmt(s['machine_ratio_range'][1])} |")
    lines += ["", "## Damaged calibration (one image)", "",
              "| baseline | top-1 baseline | top-1 current | difference | McNemar p | flags |", "|---|---|---|---|---|---|"]
    for r in dmg:
        lines.append(f"| {r['baseline']} | {fmt(r['top1_baseline'], 2)} % | {fmt(r['top1_current'], 2)} % | "
                     f"{r['top1_diff']:+.2f} pts | {r['top1_p']:.2g} | {', '.join(r['flags']) or 'none'} |")
    lines += ["", "## Every comparison", "",
              "| run | baseline | latency | exit | flags | top-1 now | top-1 diff | McNemar p | engine ratio | 99% CI | "
              "vs source | 99% CI | source p50 ms | machine ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if not r["latency_ci"] else f"[{r['latency_ci'][0]:.3f}, {r['latency_ci'][1]:.3f}]"
        rci = "-" if not r["relative_ci"] else f"[{r['relative_ci'][0]:.3f}, {r['relative_ci'][1]:.3f}]"
        lines.append(f"| {r['run']}{' (busy)' if busy.get(r['run']) else ''} | {r['baseline']} | {r['latency_mode']} | {r['exit']} | "
                     f"{', '.join(r['flags']) or 'none'} | {fmt(r['top1_current'], 2)} | {r['top1_diff']:+.2f} | "
                     f"{r['top1_p']:.2g} | {fmt(r['latency_ratio'])} | {ci} | {fmt(r['relative_ratio'])} | {rci} | "
                     f"{fmt(r['source_p50_ms'])} | "
                     f"{fmt(r['machine_ratio'])} |")
    write_text(dest / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(summary) + len(dmg)]))
    print(f"wrote {dest}/report.md")


if __name__ == "__main__":
    main()
