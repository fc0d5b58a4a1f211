"""The device an engine is for, as opposed to the machine that builds it.

``device:`` in a recipe (or ``--device``) names the CPU or board the engines will run on. The device,
never the build host, decides what depends on the silicon: 7-bit weights against the u8*s8
overflow of CPUs without an 8-bit dot-product instruction (ONNX Runtime's ``reduce_range``, NNCF's
``overflow_fix``), whether bf16 precisions exist, and which targets make sense. ``host`` (the default)
reads this machine's /proc/cpuinfo and picks the profile that matches it, so a recipe without
``device:`` behaves as before on each machine; a recipe that names a device builds the same engine
bytes whichever machine runs it.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from typing import Any

from .environment import cpu_flags, has_amx_int8, has_int8_dot_product, has_native_bf16


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    arch: str  # x86_64 | arm64
    int8_dot_product: bool
    """an 8-bit dot product that cannot saturate: AVX-512 VNNI / AVX-VNNI / AMX on x86, SDOT on arm64"""
    amx: bool
    native_bf16: bool
    """bf16 arithmetic in hardware (AVX512-BF16 / AMX-BF16; arm64: the BF16 extension)"""
    targets: tuple[str, ...]
    """the targets whose engines run on this device"""

    @property
    def reduce_range(self) -> bool:
        """7-bit weights: on x86 without VNNI, u8 x s8 products summed in pairs (vpmaddubsw) saturate
        16 bits unless weights keep to 7 bits; ARM's and VNNI's dot products accumulate in 32 bits."""
        return self.arch == "x86_64" and not self.int8_dot_product

    @property
    def overflow_fix(self) -> str:
        """NNCF's overflow_fix for this device: where the u8*s8 pair sums can saturate, NNCF's own
        default (the first layer, whose inputs use the whole 8-bit range); elsewhere none."""
        return "first_layer" if self.reduce_range else "disable"

    @property
    def int8_isa(self) -> str:
        if self.arch != "x86_64":
            return self.arch
        return "amx" if self.amx else ("avx512_vnni" if self.int8_dot_product else "avx2")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reduce_range": self.reduce_range, "overflow_fix": self.overflow_fix,
                "int8_isa": self.int8_isa}


_CPU_TARGETS = ("openvino", "onnxruntime", "tflite", "executorch")
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("x86-avx2", "x86-64 CPU with AVX2 and no 8-bit dot product (e.g. AMD Zen 2/3, Intel before Cascade Lake)",
           "x86_64", int8_dot_product=False, amx=False, native_bf16=False, targets=_CPU_TARGETS),
    Device("x86-avx512-vnni", "x86-64 CPU with AVX-512 VNNI, no bf16 (e.g. Intel Cascade Lake / Ice Lake)",
           "x86_64", int8_dot_product=True, amx=False, native_bf16=False, targets=_CPU_TARGETS),
    Device("x86-avx512-bf16", "x86-64 CPU with AVX-512 VNNI and AVX512-BF16, no AMX (e.g. AMD Zen 4/5, Intel "
           "Cooper Lake)", "x86_64", int8_dot_product=True, amx=False, native_bf16=True, targets=_CPU_TARGETS),
    Device("x86-amx", "x86-64 CPU with AMX INT8/BF16 (Intel Sapphire Rapids and later)",
           "x86_64", int8_dot_product=True, amx=True, native_bf16=True, targets=_CPU_TARGETS),
    Device("arm64", "64-bit ARM CPU (phone, Raspberry Pi, Graviton) with the dot-product extension",
           "arm64", int8_dot_product=True, amx=False, native_bf16=False,
           targets=("tflite", "executorch", "onnxruntime")),
    Device("jetson-orin", "NVIDIA Jetson Orin (TensorRT on its GPU; ONNX Runtime on its ARM cores)",
           "arm64", int8_dot_product=True, amx=False, native_bf16=False, targets=("tensorrt", "onnxruntime")),
)}
NAMES = ("host", *DEVICES)


def host_device(flags: frozenset[str] | None = None, machine: str | None = None) -> Device:
    """The profile of this machine (or of the given /proc/cpuinfo flags and machine name)."""
    flags = cpu_flags() if flags is None else flags
    machine = (platform.machine() if machine is None else machine).lower()
    if machine in ("aarch64", "arm64"):
        return DEVICES["arm64"]
    if has_amx_int8(flags):
        return DEVICES["x86-amx"]
    if has_int8_dot_product(flags):
        return DEVICES["x86-avx512-bf16" if has_native_bf16(flags) else "x86-avx512-vnni"]
    return DEVICES["x86-avx2"]


def or_host(device: Device | None) -> Device:
    """``device``, or this machine's profile where none is named."""
    return device if device is not None else host_device()


def resolve(name: str | None) -> Device:
    """The device a recipe or --device names; ``host`` or None: this machine's profile."""
    if name in (None, "host"):
        return host_device()
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(NAMES)}") from None


def describe(requested: str | None) -> dict[str, Any]:
    """What the report records: the device asked for, the profile used, and the host it ran on."""
    device, host = resolve(requested), host_device()
    return {"requested": requested or "host", **device.to_json(), "host": host.name,
            "host_is_device": device.name == host.name and device.arch == host.arch}
