"""Issue 24: behaviour unchanged by the refactor. Builds the demo and recipes/cpu_targets_side_by_side.yaml
on the real MobileNetV2 (../shared/models) with the code of this checkout, explains the side-by-side run,
and writes a manifest: the SHA-256 of every engine file each run wrote, and of each engine's per-layer
rows in explain.json. Given ``--against`` (a manifest written by another checkout on the same machine
kind), it says file by file what is byte-identical and what is not.

    python benchmarks/identity.py --out benchmarks/results/identity/before.json     # before the refactor
    python benchmarks/identity.py --against benchmarks/results/identity/before.json  # after it

Engine files are compared byte for byte; an engine.json (the build's record) less the wall-clock
times it holds (keys ending in ``seconds``), which differ between two builds of one commit.
Every run gets a fresh pass cache (--no-cache) so nothing is reused from the other checkout. Timing
figures are not compared (only bytes); the evaluation is limited to 500 test images to save time (it
does not touch the engines). The CPU is named: engines may differ across ISAs by design (ONNX
Runtime's ``reduce_range: auto``), so compare manifests written on the same CPU kind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMPRESS, HERE, REPO, SHARED, write_text  # noqa: E402

MODEL = SHARED / "models" / "mobilenet_v2_cifar10.pt"
RECIPE = REPO / "recipes" / "cpu_targets_side_by_side.yaml"


def _cpu() -> str:
    sys.path.insert(0, str(REPO))
    from compressor.environment import _cpuinfo  # noqa: PLC0415

    model, flags = _cpuinfo()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(isa)})"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _timeless(doc: object) -> object:
    """``doc`` without the wall-clock figures a build records (keys ending in ``seconds``, e.g. TFLite's
    ``convert_seconds``): they differ from one build to the next of the same code."""
    if isinstance(doc, dict):
        return {k: _timeless(v) for k, v in doc.items() if not str(k).endswith("seconds")}
    if isinstance(doc, list):
        return [_timeless(v) for v in doc]
    return doc


def _engines(run: Path) -> dict[str, str]:
    """SHA-256 of every engine file; an engine.json's of its content less the build's wall-clock times."""
    root = run / "engines"
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(run))] = (_sha(p) if p.name != "engine.json" else hashlib.sha256(
                json.dumps(_timeless(json.loads(p.read_text())), sort_keys=True).encode()).hexdigest())
    return out


def _explain_rows(run: Path) -> dict[str, str]:
    doc = json.loads((run / "explain.json").read_text())
    out = {}
    for name, engine in doc.get("engines", {}).items():
        rows = engine.get("layers", [])
        out[name] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return out


def _run(cmd: list[str], work: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    # this checkout's own pass cache and decoded-image store: nothing reused from the other checkout's runs
    env = {**os.environ, "COMPRESSOR_CACHE_DIR": str(work / "cache"), "COMPRESSOR_DATA_DIR": str(work / "data")}
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode not in (0, 1):  # 1: an acceptance limit missed, the engines are still there
        sys.exit(f"{cmd[1]} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")


def build(work: Path, threads: int) -> dict:
    cache = work / "cache"
    demo, side = work / "demo", work / "side"
    _run([str(COMPRESS), "demo", "--out", str(demo), "--threads", str(threads), "-q"], work)
    _run([str(COMPRESS), "run", str(MODEL), "--recipe", str(RECIPE), "--trust-model", "--out", str(side),
          "--eval-limit", "500", "--no-cache", "--cache-dir", str(cache), "--threads", str(threads), "-q"], work)
    # --overwrite: a run that misses an acceptance limit has explained its engines already
    _run([str(COMPRESS), "explain", str(side), "--trust-model", "--threads", str(threads), "--cache-dir", str(cache),
          "--overwrite"], work)
    return {"cpu": _cpu(), "demo": {"engines": _engines(demo)},
            "cpu_targets_side_by_side": {"engines": _engines(side), "explain_rows": _explain_rows(side)}}


def compare(now: dict, before: dict) -> tuple[list[tuple[str, str, str]], bool]:
    rows, same = [], True
    for run in ("demo", "cpu_targets_side_by_side"):
        for kind in ("engines", "explain_rows"):
            a, b = before.get(run, {}).get(kind, {}), now.get(run, {}).get(kind, {})
            for key in sorted(set(a) | set(b)):
                verdict = ("identical" if a.get(key) == b.get(key) else
                           "missing now" if key not in b else "new" if key not in a else "DIFFERENT")
                same &= verdict == "identical"
                rows.append((f"{run} {kind.replace('_', ' ')}", key, verdict))
    return rows, same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="manifest to write [benchmarks/results/identity/after.json with "
                                              "--against, else before.json]")
    ap.add_argument("--against", type=Path, help="a manifest to compare with (report.md beside --out)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.out or HERE / "results" / "identity" / ("after.json" if args.against else "before.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="identity-") as tmp:
        now = {"commit": commit, **build(Path(tmp), args.threads)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(now, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if not args.against:
        return 0
    before = json.loads(args.against.read_text())
    rows, same = compare(now, before)
    lines = ["# Byte identity before and after the refactor (issue 24)", "",
             f"Before: commit {before.get('commit')} on {before.get('cpu')}. After: commit {commit} on {now['cpu']}.",
             "", "| run | file or engine | verdict |", "|---|---|---|"]
    lines += [f"| {r} | {k} | {v} |" for r, k, v in rows]
    lines += ["", f"**{'Every engine file and explain row byte-identical' if same else 'NOT identical'}**: "
              f"{sum(v == 'identical' for *_, v in rows)} of {len(rows)}.",
              "", "Command: `python benchmarks/identity.py --against " + str(args.against) + "`"]
    write_text(out.parent / "report.md", "\n".join(lines) + "\n")
    (out.parent / "report.json").write_text(json.dumps({"same": same, "rows": rows, "before": before.get("commit"),
                                                         "after": commit}, indent=1) + "\n")
    print("identical" if same else "NOT identical")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
