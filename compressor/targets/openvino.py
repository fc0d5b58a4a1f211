"""openvino: OpenVINO IR (.xml/.bin) run by the OpenVINO CPU plugin.

The report says what the plugin really used: the inference precision, and per layer type the
runtime precision and kernel (e.g. ``brgconv_avx512_core_vnni`` for INT8 convolutions on
AVX-512 VNNI, ``..._amx`` on AMX).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..artifact import Form, ModelArtifact
from ..fidelity.naming import OV_MODULE, onnx_layer_name
from ..fidelity.tapper import LayerInfo, Logits, Quantizer, TapPlan, Tapper
from ..ov_core import core
from ..openvino_convert import canonical_names, to_openvino_model
from ..registry import register_target
from ..target_base import Availability, Engine, Runner, Target, TargetConfig

log = logging.getLogger(__name__)


class OpenVINOConfig(TargetConfig):
    device: str = "CPU"
    """the OpenVINO plugin the engine is compiled for ("CPU", "GPU"; OpenVINO calls it a device): in code
    ``plugin``, so as not to be read as the deployment device profile (devices.py) the recipe's ``device:``
    names, or the torch device training runs on (``torch_device``)"""
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
        devices = core().available_devices
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
        info = {
            "runtime_build": {
                "device_name": core().get_property(self.config.device, "FULL_DEVICE_NAME"),
                "optimization_capabilities": list(core().get_property(self.config.device, "OPTIMIZATION_CAPABILITIES")),
            }
        }
        return [xml, xml.with_suffix(".bin")], info

    def load_settings(self) -> dict[str, Any]:
        return {"device": self.config.device, "precision_hint": self.config.precision_hint}

    def load(self, engine: Engine, *, threads: int) -> Runner:
        return OVRunner(engine.path, threads=threads, plugin=self.config.device, precision_hint=self.config.precision_hint)

    @classmethod
    def reference_runner(cls, path: Path, *, threads: int) -> Runner:
        return OVRunner(path, threads=threads)


    def tapper(self, engine: Engine, reference: list[LayerInfo], *, threads: int) -> Tapper:
        return OpenVINOTapper(engine.path, threads=threads, precision_hint=self.config.precision_hint,
                              reference=reference)


class OVRunner(Runner):
    """Compiles one static-shape model per batch size, with a latency hint and fixed threads."""

    def __init__(self, xml: Path, *, threads: int, plugin: str = "CPU", precision_hint: str | None = "f32") -> None:
        """``precision_hint`` None: OpenVINO's own default for the CPU (bf16 where it has AMX/AVX512-BF16)."""
        self.name = "openvino"
        self.core = core()
        self.xml = xml
        self.threads = threads
        self.plugin = plugin
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
        compiled = self.core.compile_model(model, self.plugin, config)
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
            "device": self.plugin,
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


# ----------------------------------------------------------------------------- taps

_OV_LAYERS = {"Convolution": "conv", "GroupConvolution": "depthwise", "ConvolutionBackpropData": "conv",
              "MatMul": "linear"}
_OV_FOLLOW = {"Relu", "Clamp", "HSwish", "Swish", "Sigmoid", "HSigmoid", "Gelu", "Elu", "Mish", "PRelu",
              "BatchNormInference"}
_OV_CONST_PATH = {"Constant", "Convert", "Multiply", "Subtract", "Reshape", "Transpose", "FakeQuantize", "Unsqueeze"}


def _ov_const(output: Any, depth: int = 0) -> Any:
    """The Constant an op input comes from (through converts / dequantization), or None."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return node
    if kind not in _OV_CONST_PATH or depth > 6:
        return None
    return _ov_const(node.input_value(0), depth + 1)


class OpenVINOTapper(Tapper):
    """Taps an OpenVINO IR: layers named by the op's friendly name (converted from torch), else the
    weight constant's; taps read as extra model outputs (``Model.add_outputs``), after the
    FakeQuantize that follows a layer where there is one."""

    can_bypass = True

    def __init__(self, xml: Path, *, threads: int, precision_hint: str = "f32", reference: list[LayerInfo] = ()) -> None:
        # a conv whose batch norm OpenVINO folded in may carry the batch norm's module name
        alias = {m: layer.name for layer in reference for m in layer.modules}

        self.core = core()
        self.xml = Path(xml)
        self.threads = threads
        self.config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision_hint}
        model = self.core.read_model(str(xml))
        self.plan = TapPlan()
        self.tap_ops: dict[str, str] = {}  # layer -> friendly name of the tapped op
        self.fq: dict[str, str] = {}
        for op in model.get_ordered_ops():
            kind = op.get_type_name()
            if kind not in _OV_LAYERS or op.get_input_size() < 2:
                continue
            weight = _ov_const(op.input_value(1))
            if weight is None:
                continue
            end = op
            chain = [op]
            while True:
                targets = list(end.output(0).get_target_inputs())
                if len(targets) != 1:
                    break
                nxt = targets[0].get_node()
                t = nxt.get_type_name()
                if t in _OV_FOLLOW or (t in ("Add", "Multiply", "Subtract") and any(
                        _ov_const(nxt.input_value(i)) is not None for i in range(nxt.get_input_size()))):
                    end = nxt
                    chain.append(nxt)
                else:
                    break
            names = [n for c in chain for n in (c.get_friendly_name(), *sorted(c.output(0).get_names()))]
            m = next((hit for n in names if (hit := OV_MODULE.search(n))), None)
            # converted from ONNX: the ONNX node's scoped name, on the op or (bias split off) the next one
            scoped = next((n.replace("/WithoutBiases", "").removesuffix("_output_0") for n in names[:4] if "/" in n),
                          op.get_friendly_name())
            name = m.group(1) if m else onnx_layer_name(weight.get_friendly_name(), scoped)
            name = alias.get(name, name)
            if name in self.tap_ops or (not m and re.fullmatch(r"[A-Za-z]+_c?\d+", name)):
                self.plan.unmapped.append(op.get_friendly_name())
                continue
            fq = next((ti.get_node() for ti in end.output(0).get_target_inputs()
                       if ti.get_node().get_type_name() == "FakeQuantize"), None)
            if fq is not None:
                lo = _ov_const(fq.input_value(1)).get_data()
                hi = _ov_const(fq.input_value(2)).get_data()
                self.plan.quantizers[name] = Quantizer(float(np.min(lo)), float(np.max(hi)))
                self.fq[name] = fq.get_friendly_name()
                end = fq
            self.tap_ops[name] = end.get_friendly_name()
            self.plan.layers.append(name)
        self._compiled: dict[int, Any] = {}

    def _model(self, batch: int, *, taps: bool, bypass: str | None = None) -> Any:
        import openvino as ov

        model = self.core.read_model(str(self.xml))
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        if bypass is not None:
            fq = ops[self.fq[bypass]]
            for ti in list(fq.output(0).get_target_inputs()):
                ti.replace_source_output(fq.input_value(0))
        index: dict[str, int] = {}
        if taps:
            wanted = {self.tap_ops[name] for name in self.plan.layers}
            have = {r.input_value(0).get_node().get_friendly_name() for r in model.get_results()}
            model.add_outputs([ops[op].output(0) for op in sorted(wanted - have)])
            where = {r.input_value(0).get_node().get_friendly_name(): i for i, r in enumerate(model.get_results())}
            index = {name: where[self.tap_ops[name]] for name in self.plan.layers}
        shape = list(model.inputs[0].get_partial_shape())
        shape[0] = ov.Dimension(batch)
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
        return self.core.compile_model(model, "CPU", self.config), index

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if len(x) not in self._compiled:
            self._compiled[len(x)] = self._model(len(x), taps=True)
        compiled, index = self._compiled[len(x)]
        res = compiled.create_infer_request().infer({0: x})
        return {name: np.asarray(res[compiled.outputs[index[name]]], np.float32) for name in self.plan.layers}

    def bypassed(self, layer: str) -> Logits:
        compiled: dict[int, Any] = {}

        def run(x: np.ndarray) -> np.ndarray:
            if len(x) not in compiled:
                compiled[len(x)] = self._model(len(x), taps=False, bypass=layer)
            model = compiled[len(x)][0]
            return np.asarray(model.create_infer_request().infer({0: x})[model.outputs[0]])
        return run

    def close(self) -> None:
        self._compiled.clear()
