"""The memory an engine takes to serve, measured in a fresh process (``python -m compressor.serving_memory``,
an engine's spec as JSON on stdin, the figures as one JSON line on stdout).

Peak RSS (the kernel's VmHWM, in MB) is read four times, each phase adding to the one before, so each
figure is the peak of everything up to it:

1. ``import_mb``: the runtime imported (Python, numpy, the runtime library), nothing loaded;
2. ``load_run_mb``: the engine loaded as it serves (:mod:`compressor.serving_runtimes`) and one request run;
3. ``in_flight_mb``: N requests at once on that runtime's pool (one copy of the weights where it shares them);
4. ``unshared_mb``: N more independent copies, one request each, for contrast (where the pool shares
   weights; otherwise the pool's figure already is N copies).
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
from typing import Any


RUNTIME_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tflite": "ai_edge_litert.interpreter"}


def peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from pathlib import Path

    import numpy as np

    from .registry import get_target
    from .serving_runtimes import backend_for
    from .target_base import Engine

    target = get_target(spec["target"])(spec.get("config") or {}, step=spec.get("step"))
    module = RUNTIME_MODULES.get(spec["target"])
    if module is not None:
        importlib.import_module(module)  # the runtime only (the target's own check imports its converters too)
    else:
        avail = target.availability()
        if not avail.ok:
            raise RuntimeError(avail.reason)
    engine = Engine(spec["target"], spec["name"], [Path(f) for f in spec["files"]], spec.get("precision", ""),
                    built=True, builder=target)
    shape = tuple(spec["input_shape"])
    threads, n = int(spec["threads"]), int(spec["in_flight"])
    x = np.zeros(shape, np.float32)
    out: dict[str, Any] = {"in_flight": n, "threads": threads, "import_mb": peak_mb()}

    def run(pool: Any, count: int) -> None:
        for _ in range(count):
            pool.start(x, lambda y: None)
        pool.wait()

    backend = backend_for(engine, threads=threads, input_shape=shape)
    pool = backend.pool(1)
    run(pool, 2)
    pool.close()
    out["load_run_mb"] = peak_mb()
    pool = backend.pool(n)
    run(pool, 4 * n)
    out["in_flight_mb"] = peak_mb()
    out["weights_shared"] = backend.weights_shared
    if backend.weights_shared:
        copies = [backend_for(engine, threads=threads, input_shape=shape) for _ in range(n)]
        pools = [c.pool(1) for c in copies]
        for p in pools:
            run(p, 1)
        out["unshared_mb"] = peak_mb()
        for p in pools:
            p.close()
        for c in copies:
            c.close()
    pool.close()
    backend.close()
    gc.collect()
    out["added_load_run_mb"] = out["load_run_mb"] - out["import_mb"]
    out["added_in_flight_mb"] = out["in_flight_mb"] - out["import_mb"]
    return out


def main() -> int:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
