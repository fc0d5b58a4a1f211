"""openvino: OpenVINO IR (.xml/.bin) run by the OpenVINO CPU plugin.

The report says what the plugin really used: the inference precision, and per layer type the
runtime precision and kernel (e.g. ``brgconv_avx512_core_vnni`` for INT8 convolutions on
AVX-512 VNNI, ``..._amx`` on AMX).
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..artifact import Form, ModelArtifact
from ..openvino_convert import canonical_names, to_openvino_model
from ..registry import register_target
from ..fidelity.tapper import LayerInfo, Tapper
from ..target_base import Availability, Engine, Runner, Target, TargetConfig

log = logging.getLogger(__name__)


class OpenVINOConfig(TargetConfig):
    device: str = "CPU"
    """OpenVINO device"""
    precision_hint: Literal["f32", "bf16", "f16"] = "f32"
    """INFERENCE_PRECISION_HINT for layers that are not quantized"""
    compress_to_fp16: bool = False
    """store floating-point weights as FP16 in the .bin"""


@register_target
class OpenVINOTarget(Target):
    name = "openvino"
    summary = "OpenVINO IR on the CPU plugin (INT8 on AVX-512 VNNI / AMX)"
    Config = OpenVINOConfig
    consumes = frozenset({Form.TORCH, Form.EXPORTED, Form.ONNX, Form.OPENVINO})
    libraries = ("openvino",)

    @classmethod
    def availability(cls) -> Availability:
        try:
            import openvino as ov
        except ImportError as exc:
            return Availability(False, f"openvino is not installed ({exc})")
        devices = ov.Core().available_devices
        if "CPU" not in devices:
            return Availability(False, f"no OpenVINO CPU device (devices: {devices})")
        return Availability(True, "OpenVINO CPU plugin")

    def engine_precision(self, artifact: ModelArtifact) -> str:
        """bf16 for a float model compiled with precision_hint bf16 (an INT8 model stays int8: its
        layers left in float then run in bf16, and the engine's name says so)."""
        if self.config.precision_hint in ("bf16", "f16") and artifact.precision in ("fp32", "fp16"):
            return self.config.precision_hint
        return artifact.precision

    def engine_name(self, artifact: ModelArtifact) -> str:
        name = f"{self.name}-{self.engine_precision(artifact)}"
        if artifact.precision == "int8" and self.config.precision_hint != "f32":
            name += f"-{self.config.precision_hint}"
        return name

    def device_refusal(self, device: Any, host: Any) -> str | None:
        if self.config.precision_hint != "bf16":
            return None
        if not device.native_bf16:
            return (f"precision_hint bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); device {device.name} "
                    "has none, so OpenVINO would run f32 there: not built")
        if not host.native_bf16:
            return (f"precision_hint bf16: this machine ({host.name}) has no native bf16, so OpenVINO would run "
                    f"f32 here and the row would not be bf16's; build it on a {device.name} machine")
        return None

    def _build(self, artifact: ModelArtifact, tmp_dir: Path, data: Any = None) -> tuple[list[Path], dict[str, Any]]:
        import openvino as ov

        xml = tmp_dir / "model.xml"
        if artifact.form is Form.OPENVINO and not self.config.compress_to_fp16:
            assert artifact.path is not None
            shutil.copy2(artifact.path, xml)
            shutil.copy2(artifact.path.with_suffix(".bin"), xml.with_suffix(".bin"))
        else:
            ov.save_model(canonical_names(to_openvino_model(artifact)), str(xml),
                          compress_to_fp16=self.config.compress_to_fp16)
        core = ov.Core()
        info = {
            "runtime_build": {
                "device_name": core.get_property(self.config.device, "FULL_DEVICE_NAME"),
                "optimization_capabilities": list(core.get_property(self.config.device, "OPTIMIZATION_CAPABILITIES")),
            }
        }
        return [xml, xml.with_suffix(".bin")], info

    def load_settings(self) -> dict[str, Any]:
        return {"device": self.config.device, "precision_hint": self.config.precision_hint}

    def load(self, engine: Engine, *, threads: int) -> Runner:
        return OVRunner(engine.path, threads=threads, device=self.config.device, precision_hint=self.config.precision_hint)


    def tapper(self, engine: Engine, reference: list[LayerInfo], *, threads: int) -> Tapper:
        from ..taps import OpenVINOTapper

        return OpenVINOTapper(engine.path, threads=threads, precision_hint=self.config.precision_hint,
                              reference=reference)


class OVRunner(Runner):
    """Compiles one static-shape model per batch size, with a latency hint and fixed threads."""

    def __init__(self, xml: Path, *, threads: int, device: str = "CPU", precision_hint: str | None = "f32") -> None:
        """``precision_hint`` None: OpenVINO's own default for the CPU (bf16 where it has AMX/AVX512-BF16)."""
        import openvino as ov

        self.name = "openvino"
        self.core = ov.Core()
        self.xml = xml
        self.threads = threads
        self.device = device
        self.precision_hint = precision_hint
        self._compiled: dict[int, Any] = {}
        self._requests: dict[int, Any] = {}

    def prepare(self, batch: int) -> None:
        if batch in self._compiled:
            return
        import openvino as ov

        model = self.core.read_model(str(self.xml))
        shape = list(model.inputs[0].get_partial_shape())
        shape[0] = ov.Dimension(batch)
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if self.precision_hint is not None:
            config["INFERENCE_PRECISION_HINT"] = self.precision_hint
        compiled = self.core.compile_model(model, self.device, config)
        self._compiled[batch] = compiled
        self._requests[batch] = compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = len(x)
        if batch not in self._requests:
            self.prepare(batch)
        request = self._requests[batch]
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()

    def runtime_info(self) -> dict[str, Any]:
        import openvino as ov

        if not self._compiled:
            self.prepare(1)
        compiled = self._compiled[min(self._compiled)]
        kernels: Counter[str] = Counter()
        precisions: Counter[str] = Counter()
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            layer = rt["layerType"].astype(str)
            if layer in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution"):
                kernels[rt["primitiveType"].astype(str)] += 1
                precisions[f"{layer}:{rt['runtimePrecision'].astype(str)}"] += 1
        return {
            "runtime": f"openvino {ov.get_version()}",
            "device": self.device,
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "layer_precisions": dict(precisions.most_common()),
            "kernels": dict(kernels.most_common()),
            "isa": isa_from_kernels(kernels),
        }

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()


def _type_name(value: Any) -> str:
    """``f32`` for OpenVINO's element type (its str() is the repr ``<Type: 'float32'>``)."""
    name = getattr(value, "get_type_name", None)
    return name() if callable(name) else str(value)


def isa_from_kernels(kernels: Counter[str]) -> str:
    """The instruction set named by the most used compute kernel, e.g. avx512_core_vnni or amx."""
    # OpenVINO 2026 names FP32 kernels brgconv_avx512_f32 / jit_avx512_f32: "avx512" after the _core tags
    for tag in ("amx", "avx512_core_vnni", "avx512_core_bf16", "avx512_core", "avx512", "avx2_vnni", "avx2", "sse42"):
        if any(tag in k for k in kernels):
            return tag
    return "unknown"
