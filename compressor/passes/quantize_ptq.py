"""quantize_ptq: INT8 post-training quantization with calibration on class-balanced images.

Three backends, each the library made for it, each in its own module under ``_ptq/``:

* ``openvino`` (:mod:`._ptq.openvino_nncf`): NNCF ``nncf.quantize`` on an OpenVINO model
  (converted from torch or ONNX), producing an IR with FakeQuantize nodes that the CPU plugin runs
  as INT8 (VNNI/AMX).
* ``onnxruntime`` (:mod:`._ptq.onnxruntime_static`): ONNX Runtime ``quantize_static`` into a QDQ
  ONNX graph (per-channel signed weights; unsigned activations by default, which x86 VNNI kernels
  handle fastest).
* ``tensorrt`` (:mod:`._ptq.modelopt_qdq`): NVIDIA Model Optimizer's ONNX quantization
  (``modelopt.onnx.quantization``) into the explicit-quantization QDQ graph TensorRT wants
  (symmetric INT8, per-channel weights, per-tensor activations, Q/DQ placed so conv + bias +
  activation and residual adds fuse), calibrated here on the CPU with ONNX Runtime; the placement
  is checked by :mod:`compressor.qdq_rules` and reported.

With ``max_drop`` (an accuracy budget in top-1 points on validation images of the training split),
each backend keeps the most sensitive layers in float until the budget holds
(:mod:`._ptq.accuracy_budget`): until the upper confidence bound of the drop (:mod:`compressor.bound`,
at ``confidence``) is within it; the pass metrics then carry an ``accuracy_budget`` block whose
``met`` says whether it did.

``model_type: transformer`` (and ``smooth_quant``) gives attention models what each library
recommends, as settings of the one quantizer call each backend makes (:mod:`._ptq.transformer`):
NNCF's ModelType.TRANSFORMER with SmoothQuant, ONNX Runtime's quantizable ops less LayerNorm, softmax
and the elementwise ops NNCF keeps in float; the pass metrics' ``int8_inputs`` count, per op type,
the ops that take an INT8 input, so the graph shows what was kept in float.

This module keeps the config, the registration and the dispatch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..artifact import Form, ModelArtifact
from ..data import preprocess
from ..environment import default_threads
from ..errors import ConfigError, PipelineOrderError
from ..pass_base import Pass, PassContext, PassResult
from ..registry import register_pass
from ._nncf import NNCFQuantizationConfig, resolve_overflow_fix
from ._ptq import modelopt_qdq, onnxruntime_static, openvino_nncf, transformer
from ..bound import DEFAULT_CONFIDENCE, fixed_count_problem
from ._ptq.accuracy_budget import LEAST_IMAGES, Budget, make_budget

if TYPE_CHECKING:
    from ..devices import Device

Calibration = Literal["minmax", "mean_minmax", "percentile", "histogram", "entropy"]
CALIBRATION_METHODS = {
    "openvino": ("minmax", "mean_minmax", "percentile", "histogram"),
    "onnxruntime": ("minmax", "percentile", "entropy"),
    "tensorrt": ("minmax", "entropy"),
}
BACKENDS = {
    "openvino": openvino_nncf.quantize,
    "onnxruntime": onnxruntime_static.quantize,
    "tensorrt": modelopt_qdq.quantize,
}


class QuantizePTQConfig(NNCFQuantizationConfig):
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
    percentile: float = Field(default=99.999, gt=50, le=100)
    """percentile calibration: the kept percentile of |activation|"""
    activation_type: Literal["uint8", "int8"] = "uint8"
    """onnxruntime: activation integer type (uint8 suits x86 VNNI)"""
    reduce_range: bool | Literal["auto"] = "auto"
    """onnxruntime: 7-bit weights, which x86 CPUs without VNNI need (their u8*s8 pair sums saturate
    16 bits: on AVX2 ResNet/MobileNet lose ~2 points without it); auto: on when the device the
    engines are for (recipe ``device:``, default this machine) has no VNNI/AMX"""
    ignored_nodes: list[str] = Field(default_factory=list)
    """node names to keep in floating point"""
    max_drop: float | None = Field(default=None, ge=0)
    """accuracy budget: most top-1 points lost on validation images (held out of the training split,
    never the test split); where plain PTQ loses more, the most sensitive layers stay in float
    until it holds (openvino: NNCF quantize_with_accuracy_control; onnxruntime, tensorrt: ranked
    layers in the quantizer's excluded nodes). None: plain PTQ"""
    validation_samples: int | None = Field(default=None, ge=10)
    """max_drop: class-balanced validation images of the training split that calibration does not use;
    None: what the confidence bound needs (at least 500, grown where a setting's bound misses for lack
    of images, up to 10,000 and what the split holds)"""
    confidence: float = Field(default=DEFAULT_CONFIDENCE, ge=0.5, lt=1)
    """max_drop: met when the one-sided upper confidence bound of the drop, at this confidence, is within it"""
    max_kept_layers: int = Field(default=8, ge=1)
    """max_drop: most layers kept in float before the search gives up (the pass then reports
    accuracy_budget.met false with the best model found)"""
    kept_layer_latency: bool = True
    """max_drop: time the batch-1 latency each kept layer costs (the model with it in INT8 against without)"""
    model_type: Literal["cnn", "transformer"] = "cnn"
    """transformer: what each library recommends for attention models (ViT, Swin; see _ptq/transformer.py).
    openvino: NNCF's ModelType.TRANSFORMER (LayerNorm, softmax, residual Add, Multiply, Divide and the
    like stay in float, attention MatMuls get symmetric quantizers, SmoothQuant on the MatMuls, preset
    mixed unless preset is given); onnxruntime: only the ops NNCF's transformer mode also quantizes
    get Q/DQ (LayerNormalization, Softmax, Add, Mul and the like stay in float); tensorrt: ModelOpt
    places attention Q/DQ itself, so only the record changes. cnn: the libraries' defaults"""
    smooth_quant: float | Literal["auto", "off"] = "auto"
    """model_type transformer: SmoothQuant's alpha (0..1; how much of the activations' outlier range
    moves into the weights) on the MatMuls before calibration. auto: where it helps (openvino: NNCF's
    0.95 or none, whichever output is closer to the float model's on 32 calibration images;
    onnxruntime: off, its SmoothQuant needs neural-compressor 2.x); off: none. openvino, or
    onnxruntime where neural-compressor 2.x is installed"""

    @model_validator(mode="after")
    def _method_fits_backend(self) -> QuantizePTQConfig:
        allowed = CALIBRATION_METHODS[self.backend]
        if self.calibration not in allowed:
            raise ValueError(
                f"calibration {self.calibration!r} is not available with backend {self.backend} "
                f"(choose: {', '.join(allowed)})"
            )
        return self

    @field_validator("smooth_quant", mode="before")
    @classmethod
    def _smooth_quant_not_a_switch(cls, value: Any) -> Any:
        """YAML reads ``off``/``no``/``false`` as False (meaning off) and ``on``/``yes``/``true`` as True,
        which would otherwise pass as alpha 0.0 or 1.0."""
        if value is False:
            return "off"
        if value is True:
            raise ValueError("smooth_quant takes an alpha in 0..1, auto or off, not a switch (YAML's on/true/yes)")
        if isinstance(value, str) and value not in ("auto", "off"):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"smooth_quant takes an alpha in 0..1, auto or off; got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _smooth_quant_fits(self) -> QuantizePTQConfig:
        problem = transformer.smooth_quant_problem(self.backend, self.model_type, self.smooth_quant)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _validation_can_prove_the_budget(self) -> QuantizePTQConfig:
        problem = fixed_count_problem(self.max_drop, self.validation_samples, self.confidence)
        if problem:
            raise ValueError(problem)
        return self


def for_device(config: QuantizePTQConfig, device: Device) -> QuantizePTQConfig:
    """``config`` with its "auto" settings decided by the device the engines are for, never by the
    machine running the pass: reduce_range (ONNX Runtime) and overflow_fix (NNCF)."""
    config = resolve_overflow_fix(config, device)
    if config.reduce_range == "auto":
        config = config.model_copy(update={"reduce_range": device.reduce_range})
    return config


@register_pass
class QuantizePTQ(Pass):
    name = "quantize_ptq"
    summary = "INT8 post-training quantization with calibration (NNCF for OpenVINO, ORT static QDQ for ONNX)"
    Config = QuantizePTQConfig
    consumes = frozenset({Form.TORCH, Form.EXPORTED, Form.ONNX, Form.OPENVINO})
    needs_data = True
    quantizes = True
    uses_device = True  # reduce_range / overflow_fix "auto" follow the device
    libraries = ("torch", "nncf", "openvino", "onnx", "onnxruntime")

    def used_libraries(self) -> tuple[str, ...]:
        return (*self.libraries, "nvidia-modelopt") if self.config.backend == "tensorrt" else self.libraries

    def accepts(self, form: Form) -> bool:
        if self.config.backend != "openvino":
            return form is Form.ONNX
        return form in self.consumes

    def output_form(self, input_form: Form) -> Form:
        return Form.OPENVINO if self.config.backend == "openvino" else Form.ONNX

    def check_input(self, form: Form, step: str) -> Form:
        if self.config.backend != "openvino" and form is not Form.ONNX:
            raise PipelineOrderError(
                f"{step}: quantize_ptq with backend {self.config.backend} takes an ONNX model, got {form.value}; "
                "put export_onnx before it"
            )
        return super().check_input(form, step)

    def preflight(self, artifact: ModelArtifact | None, data: Any) -> None:
        if self.config.backend == "tensorrt":
            modelopt_qdq.check_available(self.step)
        if self.config.backend == "onnxruntime" and transformer.smooth_quant_alpha(self.config) is not None:
            missing = transformer.ort_smooth_quant_missing()
            if missing:
                raise ConfigError(f"{self.step}.{missing}")
        if self.config.max_drop is not None and data is not None:
            data.validation_indices(1, calibrated=self.config.samples)  # a DataError where none is left

    # ------------------------------------------------------------------ calibration data
    def _calibration(self, artifact: ModelArtifact, ctx: PassContext, count: int | None = None) -> np.ndarray:
        assert ctx.data is not None
        size = tuple(artifact.input_spec.sample_shape[1:])
        images = ctx.data.calibration_images(size, artifact.preprocessing, count or self.config.samples)  # type: ignore[arg-type]
        return preprocess(images, artifact.preprocessing)

    def _sweep(self, artifact: ModelArtifact, ctx: PassContext, built: PassResult, used: int,
               cfg: QuantizePTQConfig) -> dict[str, Any] | None:
        """With ``data.calibration.samples`` a list (and no ``samples`` of the pass's own): plain PTQ
        calibrated on each size, its top-1 on validation images (data.validation: by default of the
        training split, none that the sizes calibrate on; never an evaluated image); the built model is the largest size's."""
        assert ctx.data is not None
        sizes = ctx.data.config.calibration.sweep
        if not sizes or self.config.samples is not None:
            return None
        from ..explain import artifact_runner

        threads = ctx.threads or default_threads()
        size = tuple(artifact.input_spec.sample_shape[1:])
        images = ctx.data.validation_images(size, artifact.preprocessing,  # type: ignore[arg-type]
                                            self.config.validation_samples or LEAST_IMAGES, calibrated=max(sizes))
        labels = images.labels
        from ..streaming import in_memory

        xv = in_memory(images.preprocessed(artifact.preprocessing))  # streamed where many

        def top1(art: ModelArtifact) -> float:
            runner = artifact_runner(art, threads)
            try:
                runner.prepare(64)
                logits = np.concatenate([np.asarray(runner(xv[i : i + 64])) for i in range(0, len(xv), 64)])
            finally:
                runner.close()
            return round(100.0 * float((logits.argmax(1) == labels).mean()), 2)

        plain = cfg.model_copy(update={"max_drop": None})
        rows = []
        for n in sizes:
            x = self._calibration(artifact, ctx, n)
            if len(x) == used and self.config.max_drop is None:
                art = built.artifact
            else:
                work = ctx.work_dir / f"sweep-{n}"
                work.mkdir(parents=True, exist_ok=True)
                art = BACKENDS[self.config.backend](artifact, x, plain, work, self.step, budget=None).artifact
            rows.append({"samples_requested": n, "samples_used": len(x), "validation_top1": top1(art)})
        return {"validation_images": len(labels), "validation_split": ctx.data.config.calibration.split
                if ctx.data.validation_mode == "calibration" else ctx.data.config.validation.split,
                "validation_from": ctx.data.validation_where(max(sizes)),
                "float_top1": top1(artifact), "rows": rows, "built_with": used}

    def _budget(self, artifact: ModelArtifact, ctx: PassContext) -> Budget | None:
        """The accuracy budget and its validation images (training split, not calibration images)."""
        cfg = self.config
        if cfg.max_drop is None:
            return None
        assert ctx.data is not None
        return make_budget(ctx.data, artifact, max_drop=cfg.max_drop, confidence=cfg.confidence,
                           validation_samples=cfg.validation_samples, calibrated=cfg.samples,
                           max_kept_layers=cfg.max_kept_layers, threads=ctx.threads or default_threads(),
                           layer_latency=cfg.kept_layer_latency, what=self.step)

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        device = ctx.target_device()
        x = self._calibration(artifact, ctx)
        cfg = for_device(self.config, device)
        res = BACKENDS[cfg.backend](artifact, x, cfg, ctx.work_dir, self.step, budget=self._budget(artifact, ctx))
        sweep = self._sweep(artifact, ctx, res, len(x), cfg)
        if sweep is not None:
            res.metrics["calibration_sweep"] = sweep
        res.metrics["device"] = device.name
        return res
