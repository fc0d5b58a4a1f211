"""quantize_ptq: INT8 post-training quantization with calibration on class-balanced images.

Three backends, each the library made for it:

* ``openvino``: NNCF ``nncf.quantize`` on an OpenVINO model (converted from torch or ONNX),
  producing an IR with FakeQuantize nodes that the CPU plugin runs as INT8 (VNNI/AMX).
* ``onnxruntime``: ONNX Runtime ``quantize_static`` into a QDQ ONNX graph (per-channel signed
  weights; unsigned activations by default, which x86 VNNI kernels handle fastest).
* ``tensorrt``: NVIDIA Model Optimizer's ONNX quantization (``modelopt.onnx.quantization``) into
  the explicit-quantization QDQ graph TensorRT wants (symmetric INT8, per-channel weights,
  per-tensor activations, Q/DQ placed so conv + bias + activation and residual adds fuse),
  calibrated here on the CPU with ONNX Runtime; the placement is checked by
  :mod:`compressor.qdq_rules` and reported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..artifact import Form, ModelArtifact
from ..data import preprocess
from ..pass_base import Pass, PassConfig, PassContext, PassResult
from ..registry import register_pass

log = logging.getLogger(__name__)

Calibration = Literal["minmax", "mean_minmax", "percentile", "histogram", "entropy"]
CALIBRATION_METHODS = {
    "openvino": ("minmax", "mean_minmax", "percentile", "histogram"),
    "onnxruntime": ("minmax", "percentile", "entropy"),
    "tensorrt": ("minmax", "entropy"),
}


class QuantizePTQConfig(PassConfig):
    backend: Literal["openvino", "onnxruntime", "tensorrt"] = "openvino"
    """openvino: NNCF -> OpenVINO IR; onnxruntime: ORT quantize_static -> QDQ ONNX;
    tensorrt: NVIDIA ModelOpt -> QDQ ONNX placed for TensorRT"""
    calibration: Calibration = "minmax"
    """activation range estimator. openvino: minmax, mean_minmax, percentile, histogram;
    onnxruntime: minmax, percentile, entropy; tensorrt: minmax, entropy"""
    samples: int | None = Field(default=None, ge=1)
    """calibration images (default: the recipe's data.calibration.samples)"""
    per_channel: bool = True
    """per-output-channel weight scales"""
    preset: Literal["performance", "mixed"] = "performance"
    """openvino: symmetric (performance) or asymmetric (mixed) activations"""
    bias_correction: bool = True
    """openvino: NNCF fast bias correction"""
    overflow_fix: Literal["first_layer", "enable", "disable"] = "first_layer"
    """openvino: 7-bit weights against u8*s8 overflow on CPUs without VNNI (all layers, first only, none)"""
    percentile: float = Field(default=99.999, gt=50, le=100)
    """percentile calibration: the kept percentile of |activation|"""
    activation_type: Literal["uint8", "int8"] = "uint8"
    """onnxruntime: activation integer type (uint8 suits x86 VNNI)"""
    reduce_range: bool | Literal["auto"] = "auto"
    """onnxruntime: 7-bit weights, which x86 CPUs without VNNI need (their u8*s8 pair sums saturate
    16 bits: on AVX2 ResNet/MobileNet lose ~2 points without it); auto: on when the CPU running the
    pass has no VNNI/AMX. Set it explicitly when quantizing for another CPU."""
    ignored_nodes: list[str] = Field(default_factory=list)
    """node names to keep in floating point"""

    @model_validator(mode="after")
    def _method_fits_backend(self) -> QuantizePTQConfig:
        allowed = CALIBRATION_METHODS[self.backend]
        if self.calibration not in allowed:
            raise ValueError(
                f"calibration {self.calibration!r} is not available with backend {self.backend} "
                f"(choose: {', '.join(allowed)})"
            )
        return self


@register_pass
class QuantizePTQ(Pass):
    name = "quantize_ptq"
    summary = "INT8 post-training quantization with calibration (NNCF for OpenVINO, ORT static QDQ for ONNX)"
    Config = QuantizePTQConfig
    consumes = frozenset({Form.TORCH, Form.EXPORTED, Form.ONNX, Form.OPENVINO})
    needs_data = True
    quantizes = True
    libraries = ("torch", "nncf", "openvino", "onnx", "onnxruntime")

    def __init__(self, config: Any = None, /, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if self.config.backend == "tensorrt":
            self.libraries = (*self.libraries, "nvidia-modelopt")

    def accepts(self, form: Form) -> bool:
        if self.config.backend != "openvino":
            return form is Form.ONNX
        return form in self.consumes

    def output_form(self, input_form: Form) -> Form:
        return Form.OPENVINO if self.config.backend == "openvino" else Form.ONNX

    def check_input(self, form: Form, step: str) -> Form:
        if self.config.backend != "openvino" and form is not Form.ONNX:
            from ..errors import PipelineOrderError

            raise PipelineOrderError(
                f"{step}: quantize_ptq with backend {self.config.backend} takes an ONNX model, got {form.value}; "
                "put export_onnx before it"
            )
        return super().check_input(form, step)

    def preflight(self, artifact: ModelArtifact | None, data: Any) -> None:
        if self.config.backend == "tensorrt":
            try:
                import modelopt.onnx.quantization  # noqa: F401
            except ImportError as exc:
                from ..errors import ConfigError

                raise ConfigError(f"{self.field}.backend: tensorrt needs NVIDIA ModelOpt's ONNX quantization "
                                  f"(pip install 'compressor[tensorrt]'): {exc}") from exc

    # ------------------------------------------------------------------ calibration data
    def _calibration(self, artifact: ModelArtifact, ctx: PassContext) -> np.ndarray:
        assert ctx.data is not None
        size = tuple(artifact.input_spec.sample_shape[1:])
        images = ctx.data.calibration_images(size, artifact.preprocessing.color, self.config.samples)  # type: ignore[arg-type]
        return preprocess(images, artifact.preprocessing)

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        x = self._calibration(artifact, ctx)
        if self.config.backend == "openvino":
            return self._run_nncf(artifact, x, ctx)
        if self.config.backend == "tensorrt":
            return self._run_modelopt(artifact, x, ctx)
        return self._run_ort(artifact, x, ctx)

    # ------------------------------------------------------------------ NNCF / OpenVINO
    def _run_nncf(self, artifact: ModelArtifact, x: np.ndarray, ctx: PassContext) -> PassResult:
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        from ..targets.openvino import to_openvino_model

        cfg = self.config
        model = to_openvino_model(artifact)
        estimators = {
            "minmax": RangeEstimatorParametersSet.MINMAX,
            "mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX,
            "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE,
            "histogram": RangeEstimatorParametersSet.HISTOGRAM,
        }
        from nncf.quantization.advanced_parameters import OverflowFix

        overflow = {"first_layer": OverflowFix.FIRST_LAYER, "enable": OverflowFix.ENABLE,
                    "disable": OverflowFix.DISABLE}[cfg.overflow_fix]
        advanced = AdvancedQuantizationParameters(
            overflow_fix=overflow,
            activations_range_estimator_params=estimators[cfg.calibration],
            weights_quantization_params=None if cfg.per_channel else QuantizationParameters(per_channel=False),
            disable_bias_correction=not cfg.bias_correction,
        )
        dataset = nncf.Dataset([x[i : i + 1] for i in range(len(x))])
        ignored = nncf.IgnoredScope(names=cfg.ignored_nodes, validate=True) if cfg.ignored_nodes else None
        quantized = nncf.quantize(
            model,
            dataset,
            preset=nncf.QuantizationPreset.PERFORMANCE if cfg.preset == "performance" else nncf.QuantizationPreset.MIXED,
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(x),
            fast_bias_correction=True,
            ignored_scope=ignored,
            advanced_parameters=advanced,
        )
        path = ctx.work_dir / "model.xml"
        ov.save_model(quantized, str(path), compress_to_fp16=False)
        fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
        metrics = {"backend": "nncf/openvino", "calibration": cfg.calibration, "samples": len(x),
                   "fake_quantize_nodes": fq}
        return PassResult(artifact.derive(Form.OPENVINO, path=path, precision="int8"), metrics)

    # ------------------------------------------------------------------ ONNX Runtime
    def _run_ort(self, artifact: ModelArtifact, x: np.ndarray, ctx: PassContext) -> PassResult:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        cfg = self.config
        assert artifact.path is not None
        pre = ctx.work_dir / "preprocessed.onnx"
        quant_pre_process(str(artifact.path), str(pre), skip_symbolic_shape=False)
        input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(range(len(x)))

            def get_next(self) -> dict[str, Any] | None:
                i = next(self._it, None)
                return None if i is None else {input_name: x[i : i + 1]}

            def rewind(self) -> None:
                self._it = iter(range(len(x)))

        methods = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }
        path = ctx.work_dir / "model.onnx"
        reduce_range = cfg.reduce_range if cfg.reduce_range != "auto" else not has_vnni()
        quantize_static(
            str(pre),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if cfg.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[cfg.calibration],
            nodes_to_exclude=cfg.ignored_nodes or None,
            extra_options={"CalibPercentile": cfg.percentile, "WeightSymmetric": True,
                           "ActivationSymmetric": cfg.activation_type == "int8"},
        )
        pre.unlink(missing_ok=True)
        proto = onnx.load(str(path))
        q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
        dq = sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)
        from ..targets.onnxruntime import cpu_isa

        metrics = {"backend": "onnxruntime", "calibration": cfg.calibration, "samples": len(x),
                   "activation_type": cfg.activation_type, "reduce_range": reduce_range, "cpu_isa": cpu_isa(),
                   "quantize_nodes": q, "dequantize_nodes": dq}
        return PassResult(artifact.derive(Form.ONNX, path=path, precision="int8"), metrics)

    # ------------------------------------------------------------------ TensorRT (ModelOpt)
    def _run_modelopt(self, artifact: ModelArtifact, x: np.ndarray, ctx: PassContext) -> PassResult:
        import onnx

        from .. import qdq_rules

        cfg = self.config
        assert artifact.path is not None
        path = ctx.work_dir / "model.onnx"
        quantize_for_tensorrt(artifact.path, path, x, cfg.calibration, cfg.ignored_nodes)
        if not cfg.per_channel:
            log.warning("%s: ModelOpt always quantizes weights per channel for TensorRT", self.field)
        rules = qdq_rules.check(onnx.load(str(path)))
        if not rules.ok:
            log.warning("%s: the QDQ graph breaks TensorRT placement rules: %s", self.field,
                        "; ".join(map(str, rules.violations[:5])))
        metrics = {"backend": "nvidia-modelopt (TensorRT QDQ)", "calibration": cfg.calibration, "samples": len(x),
                   "calibration_provider": "onnxruntime CPU", "tensorrt_qdq_rules": rules.to_json()}
        return PassResult(artifact.derive(Form.ONNX, path=path, precision="int8", qdq_for="tensorrt"), metrics)


def has_vnni() -> bool:
    """Whether the CPU has an 8-bit dot-product instruction (VNNI or AMX) that cannot saturate."""
    from ..environment import cpu_flags

    return bool({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"} & cpu_flags())


def quantize_for_tensorrt(src: Any, dst: Any, x: np.ndarray, calibration: str = "entropy",
                          exclude: list[str] | None = None) -> None:
    """NVIDIA ModelOpt's INT8 ONNX quantization for TensorRT, calibrated with ONNX Runtime on the CPU."""
    import contextlib
    import io

    import modelopt.onnx.quantization as moq

    log_buffer = io.StringIO()
    with contextlib.redirect_stdout(log_buffer), _ort_quantization_restored():
        moq.quantize(
            str(src),
            quantize_mode="int8",
            calibration_data=x,
            calibration_method={"minmax": "max", "entropy": "entropy"}[calibration],
            calibration_eps=["cpu"],  # calibrate with ONNX Runtime on the CPU
            nodes_to_exclude=exclude or None,
            high_precision_dtype="fp32",  # TensorRT picks FP16 for the rest at build time
            output_path=str(dst),
            log_level="WARNING",
        )
    if not Path(dst).exists():
        raise RuntimeError(f"ModelOpt wrote no model: {log_buffer.getvalue()[-500:]}")


def _ort_quantization_restored() -> Any:
    """ModelOpt monkey-patches ONNX Runtime's quantization classes when it runs; put them back
    afterwards, so that ORT's own ``quantize_static`` (backend onnxruntime) still works in the
    same process."""
    import contextlib
    import importlib

    modules = ["onnxruntime.quantization.calibrate", "onnxruntime.quantization.onnx_quantizer",
               "onnxruntime.quantization.qdq_quantizer", "onnxruntime.quantization.base_quantizer"]

    @contextlib.contextmanager
    def restored() -> Any:
        saved: list[tuple[Any, dict[str, Any]]] = []
        for name in modules:
            mod = importlib.import_module(name)
            saved.append((mod, dict(vars(mod))))
            for value in list(vars(mod).values()):
                if isinstance(value, type) and value.__module__ == name:
                    saved.append((value, dict(vars(value))))
        try:
            yield
        finally:
            for owner, before in saved:
                now = vars(owner)
                for key in [k for k in now if k not in before]:
                    delattr(owner, key)
                for key, value in before.items():
                    if now.get(key) is not value and key not in ("__dict__", "__weakref__", "__doc__"):
                        setattr(owner, key, value)

    return restored()
