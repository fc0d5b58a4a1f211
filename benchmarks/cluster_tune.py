"""Issue 25's figures: `compress tune` of the real MobileNetV2 in one process and on a local Ray
cluster (``--cluster auto``: a Ray instance started for the command, one worker per core), the same
search, the same data, each from an empty pass cache so that every pass runs.

Figures: the chosen engine of each (and whether its files are the same bytes), every candidate's engine
byte for byte, the wall time of each run and the ratio (on 2 cores the cluster cannot be faster: it
adds Ray's start, worker processes that import the libraries again, and engines and pass outputs that
travel through the object store), and where each stage ran (node, worker process) and how long it took.

Usage: python benchmarks/cluster_tune.py [--max-drop 0.5] [--targets T,...] [--reuse]
Writes benchmarks/results/cluster_tune/report.json and report.md; the runs in benchmarks/work/cluster_tune_*.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import COMPRESS, HERE, SHARED, require_modules, write_text

require_modules("ray")

from compressor.environment import environment  # noqa: E402

MODEL = SHARED / "models" / "mobilenet_v2_cifar10.pt"
MODES = ("in-process", "cluster")


def engine_hashes(run: Path, model_files: bool = True) -> dict[str, str]:
    """One hash per engine of its model files (``model.*``: what the runtime loads), or, with
    ``model_files=False``, of its other files but engine.json (its record, with wall times): ExecuTorch's
    program.pt2, the torch.export program kept beside the .pte for taps, holds Python object ids
    (graph_id) and a random serialization id, so two processes never write it alike."""
    out = {}
    for d in sorted((run / "engines").iterdir()):
        h = hashlib.sha256()
        files = [p for p in d.rglob("*") if p.is_file() and p.name != "engine.json"]
        for f in sorted(p for p in files if p.name.startswith("model.") == model_files):
            h.update(f.name.encode() + f.read_bytes())
        out[d.name] = h.hexdigest()[:16]
    return out


def tune(mode: str, args: argparse.Namespace) -> dict:
    out = HERE / "work" / f"cluster_tune_{mode}"
    cache = Path(tempfile.mkdtemp(prefix="cluster-tune-cache-"))
    cmd = [str(COMPRESS), "tune", str(MODEL), "--data", str(SHARED / "datasets" / "cifar10"), "--max-drop",
           str(args.max_drop), "--trust-model", "--threads", "2", "--out", str(out), "--overwrite", "--cache-dir",
           str(cache), "-q", *(["--targets", args.targets] if args.targets else []),
           *(["--cluster", "auto"] if mode == "cluster" else [])]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    code = subprocess.call(cmd)
    seconds = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    if code not in (0, 1):
        sys.exit(code)
    summary = json.loads((out / "tune.json").read_text())
    rows = json.loads((out / "report.json").read_text())["results"]
    return {"command": " ".join(cmd).replace(str(cache), "FRESH_CACHE"), "exit": code, "wall_s": round(seconds, 1),
            "tune_seconds": summary["seconds"], "chosen": summary["chosen"], "engines": engine_hashes(out),
            "other_files": engine_hashes(out, model_files=False),
            "cluster": summary.get("cluster"), "out": str(out),
            "p50_ms": {r["name"]: r["latency_ms"]["p50"] for r in rows}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--targets", help="comma-separated targets for tune [all the host runs]")
    ap.add_argument("--reuse", action="store_true", help="read the last runs again, run nothing")
    ap.add_argument("--only", choices=MODES, help="run this mode again, keep the other's last run")
    args = ap.parse_args()
    env = environment(2)
    cpu = f"{env['cpu']} [{', '.join(env['isa_flags'])}]"
    dest = HERE / "results" / "cluster_tune"
    if args.reuse or args.only:
        runs = json.loads((dest / "report.json").read_text())["runs"]
        if args.only:  # one mode again (its code changed); the other's figures kept
            runs[args.only] = tune(args.only, args)
        for m in MODES:  # hashed again from the run directories (this script's hashing may have changed)
            out = HERE / "work" / f"cluster_tune_{m}"
            runs[m].update(engines=engine_hashes(out), other_files=engine_hashes(out, model_files=False),
                           p50_ms={r["name"]: r["latency_ms"]["p50"]
                                   for r in json.loads((out / "report.json").read_text())["results"]})
    else:
        runs = {m: tune(m, args) for m in MODES}  # one after the other: never two at once on the 2 cores
    here, there = runs["in-process"], runs["cluster"]
    same_names = sorted(set(here["engines"]) & set(there["engines"]))
    differ = [n for n in same_names if here["engines"][n] != there["engines"][n]]
    ch_h, ch_c = (here["chosen"] or {}).get("engine"), (there["chosen"] or {}).get("engine")
    chosen_same_bytes = ch_c in here["engines"] and here["engines"].get(ch_c) == there["engines"].get(ch_c)
    others = [n for n in same_names if here.get("other_files", {}).get(n) != there.get("other_files", {}).get(n)]
    ratio = there["wall_s"] / here["wall_s"]
    report = {"benchmark": "cluster_tune", "cpu": env["cpu"], "isa_flags": env["isa_flags"],
              "command": "python " + " ".join(["benchmarks/cluster_tune.py", *sys.argv[1:]]), "runs": runs,
              "figures": {"chosen_in_process": ch_h, "chosen_on_cluster": ch_c, "same_choice": ch_h == ch_c,
                          "chosen_same_bytes": chosen_same_bytes, "engines_compared": len(same_names),
                          "engines_differing": differ, "other_files_differing": others, "engines_only_one_side":
                              sorted(set(here["engines"]) ^ set(there["engines"])),
                          "wall_ratio_cluster_over_in_process": round(ratio, 3)}}
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "report.json", json.dumps(report, indent=1) + "\n")
    f = report["figures"]
    lines = ["# compress tune in one process and on a local Ray cluster (issue 25)", "",
             f"- command: `{report['command']}`", f"- CPU: {cpu}; 2 threads per runtime",
             "- model: ../shared/models/mobilenet_v2_cifar10.pt; data: ../shared/datasets/cifar10 (validation from "
             "train/, figures on the 10,000 test images); each run from an empty pass cache", "",
             "| figure | in one process | on the cluster | verdict |", "|---|---|---|---|",
             f"| chosen engine | {ch_h} | {ch_c} | {'same' if ch_h == ch_c else 'differ (timing decides between ties)'} |",
             f"| chosen engine's files | - | {'byte-identical to the in-process build' if chosen_same_bytes else 'DIFFER'} "
             f"| {'pass' if chosen_same_bytes else '**FAIL**'} |",
             f"| every candidate's engine (model files) | {len(here['engines'])} | {len(there['engines'])} | "
             f"{len(same_names) - len(differ)} of {len(same_names)} byte-identical"
             + (f"; differ: {', '.join(differ)}" if differ else "") + " |",
             f"| other files of the engine directories (engine.json aside) | - | - | differ for {', '.join(others) or 'none'}"
             + (": ExecuTorch's program.pt2 (the torch.export program kept for taps) holds Python object ids and a "
                "random serialization id, so no two processes write it alike, in one process or on a cluster"
                if others else "") + " |",
             f"| wall time of `compress tune` | {here['wall_s']:.0f} s | {there['wall_s']:.0f} s | cluster / one process "
             f"= {ratio:.2f}x |", ""]
    cl = there.get("cluster") or {}
    nodes = cl.get("nodes", [])
    lines += [f"The cluster: {'a local Ray instance started by the command' if cl.get('started_local') else cl.get('address')}, "
              + "; ".join(f"node {n['node_id']} ({n['ip']}): {n['cpus']:g} CPU(s), devices {', '.join(n['devices'])}"
                          for n in nodes) + ".", "",
              "## Where each stage ran", "", "| stage | node | worker pid | seconds |", "|---|---|---|---|"]
    for s in cl.get("stages", []):
        lines.append(f"| {s['stage']} | {s.get('ip', s['node'])} | {s['pid']} | {s['seconds']:.1f} |")
    build_s = sum(s["seconds"] for s in cl.get("stages", []) if s["stage"].startswith("build "))
    pids = sorted({s["pid"] for s in cl.get("stages", []) if s["stage"].startswith("build ")})
    faster = ratio < 1
    lines += ["", f"Branch builds: {build_s:.0f} s of worker time in {len(pids)} worker process(es), while the "
              "calling process built the main chain; the timing session and thread sweep ran in the actor that "
              "holds `device:host`. What the cluster costs: Ray's start, the workers' imports of torch, OpenVINO, "
              "ONNX Runtime, LiteRT and ExecuTorch, and every engine and pass output sent through the object store. "
              + ("It still finished sooner here: much of a build (calibration loops, graph conversions) keeps one "
                 "core busy, so two builds at once use both cores where one process leaves one idle."
                 if faster else "On two cores that cost is not won back: the builds share the same cores.")]
    lines += ["", "## The timing session in one process and in the cluster's actor", "",
              "Batch-1 p50 of every engine timed in both runs (each run's own interleaved session; the actor's "
              f"niceness: {(there.get('cluster') or {}).get('sessions', {}).get('host', {}).get('nice', '-')}).", "",
              "| engine | one process ms | actor ms | actor / one process |", "|---|---|---|---|"]
    for name in sorted(set(here.get("p50_ms", {})) & set(there.get("p50_ms", {}))):
        a, b = here["p50_ms"][name], there["p50_ms"][name]
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    write_text(dest / "report.md", "\n".join(lines) + "\n")
    print(f"wrote {dest.relative_to(HERE.parent)}/report.md")
    for k, v in f.items():
        print(f"  {k}: {v}")
    return 0 if chosen_same_bytes and not differ else 1


if __name__ == "__main__":
    raise SystemExit(main())
