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

This package keeps the registration and the dispatch; the config is in :mod:`.config`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...artifact import Form, ModelArtifact
from ...data import preprocess
from ...environment import default_threads
from ...errors import ConfigError, PipelineOrderError
from ...pass_base import Pass, PassContext, PassResult
from ...registry import register_pass
from .._ptq import modelopt_qdq, onnxruntime_static, openvino_nncf, transformer
from .._ptq.accuracy_budget import LEAST_IMAGES, Budget, make_budget
from .config import CALIBRATION_METHODS, Calibration, QuantizePTQConfig, for_device

__all__ = ["BACKENDS", "CALIBRATION_METHODS", "Calibration", "QuantizePTQ", "QuantizePTQConfig", "for_device"]

BACKENDS = {
    "openvino": openvino_nncf.quantize,
    "onnxruntime": onnxruntime_static.quantize,
    "tensorrt": modelopt_qdq.quantize,
}


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
        from ...fidelity.explain import artifact_runner

        threads = ctx.threads or default_threads()
        size = tuple(artifact.input_spec.sample_shape[1:])
        images = ctx.data.validation_images(size, artifact.preprocessing,  # type: ignore[arg-type]
                                            self.config.validation_samples or LEAST_IMAGES, calibrated=max(sizes))
        labels = images.labels
        from ...streaming import in_memory

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
