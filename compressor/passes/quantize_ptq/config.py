"""quantize_ptq's config: its fields, their checks, and the "auto" settings the device decides.

The backends (``passes/_ptq/*``) import it from here, not from the pass, so that the pass may import
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ...bound import DEFAULT_CONFIDENCE, fixed_count_problem
from .._nncf import NNCFQuantizationConfig, resolve_overflow_fix
from .._ptq import transformer

if TYPE_CHECKING:
    from ...devices import Device

Calibration = Literal["minmax", "mean_minmax", "percentile", "histogram", "entropy"]
CALIBRATION_METHODS = {
    "openvino": ("minmax", "mean_minmax", "percentile", "histogram"),
    "onnxruntime": ("minmax", "percentile", "entropy"),
    "tensorrt": ("minmax", "entropy"),
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
    until it holds (the keep-float loop: ranked layers in the quantizer's excluded nodes or NNCF's
    ignored scope; openvino may use NNCF's quantize_with_accuracy_control, see accuracy_control).
    None: plain PTQ"""
    accuracy_control: Literal["keep_float", "nncf"] = "keep_float"
    """max_drop, openvino: how the budget is met. keep_float: the loop every backend runs (layers ranked
    by the output NMSE left with each one's quantizers bypassed, re-quantized by nncf.quantize with the
    top ones in the ignored scope until the budget holds); nncf: NNCF's quantize_with_accuracy_control
    (its own ranking and loop). keep_float is the default because it measured better
    (benchmarks/results/accuracy_control: on MobileNetV2 with a planted outlier channel both met a
    1-point budget; keep_float kept 1 layer in float after validating 1 model in 27 s, p50 +1 %; NNCF
    kept 7 after 8 in 115 s, p50 +12 %)"""
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

    @model_validator(mode="after")
    def _accuracy_control_is_openvino(self) -> QuantizePTQConfig:
        if "accuracy_control" in self.model_fields_set and self.backend != "openvino":
            raise ValueError(f"accuracy_control is for backend openvino; backend {self.backend} always meets "
                             "max_drop by the keep-float loop")
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
