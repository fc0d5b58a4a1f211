"""Issue 23, the serving referee: how our asynchronous inference-only throughput is fed, A/B, against
OpenVINO's ``benchmark_app -api async`` on the same IR, compile properties and request count.

``before``: each request handed its input with every call (``start_async({0: x})``), as the serving
code did; ``after``: each request given its input once (``Pool.bind``), as benchmark_app fills its
requests. The three alternate in rounds of the same length; the ratios are of the medians.

Needs the engines of a ``python benchmarks/serving.py`` run (benchmarks/work/serving/run/engines/).

    python benchmarks/serving_referee_ab.py            # 5 rounds of 3 s each, about 2 minutes; run it alone
Writes benchmarks/results/serving_referee_ab/report.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, REPO, require_modules, write_text  # noqa: E402
from explain_real import cpu  # noqa: E402

require_modules("openvino")
sys.path.insert(0, str(REPO))
from compressor.serving import inference_only  # noqa: E402
from compressor.serving_runtimes import OVPool  # noqa: E402

ENGINES = HERE / "work" / "serving" / "run" / "engines"
CONFIG = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
WAYS = ("before: input with every call", "after: input given once", "benchmark_app")


class EveryCall(OVPool):
    """The pool as it was: no binding, so inference_only hands each request its input with every call."""

    def bind(self, inputs: list[np.ndarray]) -> bool:
        return False


def benchmark_app(xml: Path, n: int, seconds: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps({"CPU": {k: str(v) for k, v in CONFIG.items()}}))
        exe = Path(sys.executable).with_name("benchmark_app")
        out = subprocess.run([str(exe), "-m", str(xml), "-d", "CPU", "-api", "async", "-load_config", str(cfg),
                              "-shape", "[1,3,224,224]", "-nireq", str(n), "-t", str(seconds)],
                             capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Throughput:\s+([0-9.]+)\s*FPS", out).group(1))


def measure(xml: Path, rounds: int, seconds: int) -> dict:
    import openvino as ov

    from compressor.ov_core import core

    model = core().read_model(str(xml))
    model.reshape({model.inputs[0]: ov.PartialShape([1, 3, 224, 224])})
    compiled = core().compile_model(model, "CPU", CONFIG)
    n = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    inputs = [np.random.default_rng(k).standard_normal((1, 3, 224, 224)).astype(np.float32) for k in range(64)]
    got: dict[str, list[float]] = {w: [] for w in WAYS}
    for _ in range(rounds):
        got[WAYS[0]].append(inference_only(inputs, EveryCall(compiled, n), seconds=seconds, warm=0.5))
        got[WAYS[1]].append(inference_only(inputs, OVPool(compiled, n), seconds=seconds, warm=0.5))
        got[WAYS[2]].append(benchmark_app(xml, n, seconds))
    med = {w: float(np.median(v)) for w, v in got.items()}
    return {"requests": n, "rounds": got, "median_fps": med,
            "ratio_to_benchmark_app": {w: med[w] / med["benchmark_app"] for w in WAYS[:2]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    for engine in ("openvino-fp32", "nncf-openvino-int8"):
        xml = ENGINES / engine / "model.xml"
        if not xml.is_file():
            raise SystemExit(f"{xml.relative_to(REPO)} is missing: run python benchmarks/serving.py first")
        rows[engine] = measure(xml, args.rounds, args.seconds)
    report = {"benchmark": "serving_referee_ab", "issue": 23, "cpu": cpu(), "threads": 2, "compile": CONFIG,
              "rounds": args.rounds, "seconds": args.seconds, "engines": rows,
              "command": "python benchmarks/serving_referee_ab.py " + " ".join(sys.argv[1:])}
    out = HERE / "results" / "serving_referee_ab"
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    lines = ["# The serving referee, A/B: how the inference-only requests are fed", "",
             f"CPU: {report['cpu']}, 2 threads; MobileNetV2 at 224 (the serving benchmark's engines), compiled with "
             f"{CONFIG}; {args.rounds} alternating rounds of {args.seconds} s; medians.", "",
             "| engine | requests | before: input with every call fps | after: input given once fps | "
             "benchmark_app fps | before / benchmark_app | after / benchmark_app |", "|---|---|---|---|---|---|---|"]
    for engine, r in rows.items():
        m, q = r["median_fps"], r["ratio_to_benchmark_app"]
        lines.append(f"| {engine} | {r['requests']} | {m[WAYS[0]]:.1f} | {m[WAYS[1]]:.1f} | {m[WAYS[2]]:.1f} | "
                     f"{q[WAYS[0]]:.3f} | {q[WAYS[1]]:.3f} |")
    lines += ["", f"Command: `{report['command'].strip()}`"]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
