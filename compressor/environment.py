"""What machine a run measured on: CPU model, ISA flags, threads and library versions."""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any

from .pass_base import library_versions

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
LIBRARIES = ("compressor", "torch", "torchvision", "onnx", "onnxruntime", "onnxslim", "openvino", "nncf", "numpy")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def environment(threads: int) -> dict[str, Any]:
    import os

    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": library_versions(LIBRARIES),
    }
