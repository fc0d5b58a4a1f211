"""Facts about this machine and its libraries, read in one place: CPU model and ISA flags (VNNI,
AMX, native bf16), default thread count, installed library versions. Passes, targets, the
training loop and the report ask here; nothing else reads /proc/cpuinfo or package metadata."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
LIBRARIES = ("compressor", "torch", "torchvision", "onnx", "onnxruntime", "onnxslim", "openvino", "nncf", "numpy",
             "executorch")
"""the versions a report records; an optional one that is not installed is left out (a baseline made
before it was listed then still reads as the same environment)"""


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


def cpu_model() -> str:
    """/proc/cpuinfo's model name with the ISA flags a report names, e.g. ``Intel Xeon [avx2, amx_int8]``."""
    model, flags = _cpuinfo()
    return f"{model} [{', '.join(f for f in ISA_FLAGS if f in flags)}]"


def has_int8_dot_product(flags: frozenset[str] | None = None) -> bool:
    """An 8-bit dot-product instruction that cannot saturate (AVX-512 VNNI, AVX-VNNI or AMX).
    ``flags``: /proc/cpuinfo flags to judge instead of this machine's (a device profile's)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"} & (cpu_flags() if flags is None else flags))


def has_amx_int8(flags: frozenset[str] | None = None) -> bool:
    return bool({"amx_int8", "amx_tile"} & (cpu_flags() if flags is None else flags))


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else flags))


def widest_int8_isa() -> str:
    """The widest integer dot-product / vector extension the CPU reports: amx, avx512_vnni, ... or unknown."""
    flags = cpu_flags()
    for flag, name in (("amx_int8", "amx"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"),
                       ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return name
    return "unknown"


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def installed_version(dist: str) -> str:
    """The installed version of a distribution, or "absent"."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the given distributions (for cache keys and the report)."""
    return {name: installed_version(name) for name in names}


def environment(threads: int) -> dict[str, Any]:
    """What a report records of the machine its figures were measured on."""
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "cores_available": default_threads(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {k: v for k, v in library_versions(LIBRARIES).items() if v != "absent"},
    }
