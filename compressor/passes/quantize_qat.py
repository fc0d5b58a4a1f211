"""quantize_qat: INT8 quantization-aware training with NNCF, started from PTQ calibration.

NNCF's QAT flow for PyTorch: ``nncf.quantize`` on the eager module inserts fake quantizers
(per-channel symmetric int8 weights, int8/uint8 activations) whose ranges come from the same
post-training calibration ``quantize_ptq`` uses; the model is then fine-tuned with the shared
training loop (the quantizer scales train with the weights). The output is a *fake-quantized*
torch model:

* ``ov.convert_model`` (the openvino target, or ``quantize_ptq``-style conversion) turns its
  quantizers into FakeQuantize nodes, an INT8 OpenVINO IR like PTQ's;
* the TorchScript ONNX exporter turns them into ``QuantizeLinear``/``DequantizeLinear`` pairs, a
  QDQ graph for ONNX Runtime like ``quantize_ptq`` with backend onnxruntime. The model switches
  its quantizers to NNCF's QDQ export mode by itself while ``torch.onnx.is_in_onnx_export()``;
  the dynamo exporter cannot trace NNCF's quantizers (they read a tensor with ``.item()``).

The model travels as a small wrapper (``QATModel``) around the input module. It keeps batch-norm
statistics and dropout in eval mode while training (NNCF's advice for QAT), and it pickles through
NNCF's own checkpoint format (``nncf.torch.get_config`` + state dict, restored with
``nncf.torch.load_from_config``), because NNCF's quantizer modules themselves cannot be pickled.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from ..artifact import Form, ModelArtifact
from ..data import preprocess
from ..errors import ConfigError
from ..pass_base import Pass, PassContext, PassResult
from ..registry import register_pass
from ..hooks import library_output
from ..training import TrainConfig, evaluate_top1, train, training_data
from ._nncf import NNCFQuantizationConfig, nncf_quantize_arguments, resolve_overflow_fix

log = logging.getLogger(__name__)


# QAT starts from a calibrated INT8 model: a short run at a small learning rate, no weight decay
# (it would also shrink the quantizer scales). Fields a recipe leaves out of ``train`` take these
# values, not TrainConfig's defaults for training from scratch (lr 1e-3 wrecks a calibrated model).
QAT_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 1.0, "lr": 1e-5, "weight_decay": 0.0, "warmup_fraction": 0.0}


class QuantizeQATConfig(NNCFQuantizationConfig):
    calibration_samples: int | None = Field(default=None, ge=1)
    """images for the PTQ calibration that initialises the quantizer ranges (default: the recipe's
    data.calibration.samples)"""
    freeze_bn: bool = True
    """keep batch-norm layers in eval mode while training (fixed statistics, as calibrated)"""
    disable_dropout: bool = True
    """keep dropout layers in eval mode while training (NNCF's advice for QAT)"""
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**QAT_TRAIN_DEFAULTS))
    """the fine-tuning run; fields not given take QAT defaults (1 epoch, AdamW at lr 1e-5, no warm-up,
    no weight decay), the rest TrainConfig's"""

    @field_validator("train", mode="before")
    @classmethod
    def _qat_train_defaults(cls, value: Any) -> Any:
        if isinstance(value, TrainConfig):
            value = value.model_dump(exclude_unset=True)
        if isinstance(value, dict):
            return {**QAT_TRAIN_DEFAULTS, **value}
        return value


@register_pass
class QuantizeQAT(Pass):
    name = "quantize_qat"
    summary = "INT8 quantization-aware training (NNCF): PTQ-initialised fake quantizers, fine-tuned"
    Config = QuantizeQATConfig
    consumes = frozenset({Form.TORCH})
    produces = Form.TORCH
    needs_data = True
    quantizes = True
    uses_device = True  # overflow_fix "auto" follows the device
    libraries = ("torch", "nncf")

    def preflight(self, artifact: ModelArtifact | None, data: Any) -> None:
        if artifact is not None and artifact.form is Form.TORCH:
            try:
                _check_module(artifact.model)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{self.step}: {exc}") from None

    def run(self, artifact: ModelArtifact, ctx: PassContext) -> PassResult:
        cfg = self.config
        assert ctx.data is not None
        _check_module(artifact.model)
        size = tuple(artifact.input_spec.sample_shape[1:])
        images = ctx.data.calibration_images(size, artifact.preprocessing, cfg.calibration_samples)  # type: ignore[arg-type]
        x_cal = preprocess(images, artifact.preprocessing)
        tdata = training_data(artifact, ctx.data, cfg.train)

        fp32 = copy.deepcopy(artifact.model).eval()  # the input artifact stays untouched
        fp32_top1 = _val_top1(fp32, tdata)
        wrapped = qat_model_class()(fp32, freeze_bn=cfg.freeze_bn, disable_dropout=cfg.disable_dropout)
        qmodel = self._ptq_init(wrapped, x_cal, ctx)
        quantizers = list_quantizers(qmodel)
        ptq_top1 = _val_top1(qmodel, tdata)

        # the PTQ start is a checkpoint too: QAT that does not beat it on validation keeps it
        result = train(qmodel, tdata, cfg.train, description="quantize_qat", initial_val=ptq_top1,
                       progress=ctx.progress)
        qmodel.eval()
        qat_top1 = _val_top1(qmodel, tdata)

        metrics = {
            "backend": "nncf/torch",
            "preset": cfg.preset,
            "device": ctx.target_device().name,
            "samples": len(x_cal),
            "quantizers": len(quantizers),
            "per_channel_quantizers": sum(q.per_channel for q in quantizers),
            "validation_images": len(tdata.y_val),
            "fp32_val_top1": fp32_top1,
            "ptq_val_top1": ptq_top1,
            "qat_val_top1": qat_top1,
            "train": result.to_json(),
        }
        log.info("quantize_qat: val top-1 fp32 %s, PTQ %s -> QAT %s", fp32_top1, ptq_top1, qat_top1)
        meta: dict[str, Any] = {"precision": "int8", "qat": True}
        if "graph" in artifact.meta:  # e.g. "fx" from fuse: the model is now an eager wrapper with NNCF hooks
            meta["graph"] = "nncf"
        return PassResult(artifact.derive(Form.TORCH, model=qmodel, **meta), metrics)

    def ensures(self, before: ModelArtifact, result: PassResult, ctx: PassContext) -> None:
        """The trained quantizers still give numbers: finite logits on two calibration images."""
        import torch

        size = tuple(before.input_spec.sample_shape[1:])
        images = ctx.data.calibration_images(size, before.preprocessing, self.config.calibration_samples)  # type: ignore[union-attr,arg-type]
        with torch.no_grad():
            probe = result.artifact.model(torch.from_numpy(preprocess(images[:2], before.preprocessing)))
        if not torch.isfinite(probe).all():
            raise RuntimeError("the fine-tuned model produces NaN/inf logits (learning rate too high?)")

    def _ptq_init(self, model: Any, x: np.ndarray, ctx: PassContext) -> Any:
        import nncf
        import torch

        _ensure_kernels()
        batches = [torch.from_numpy(x[i : i + 1]) for i in range(len(x))]
        cfg = resolve_overflow_fix(self.config, ctx.target_device())
        with library_output("NNCF"):  # its progress bars: only with -v
            return nncf.quantize(model.eval(), nncf.Dataset(batches), **nncf_quantize_arguments(cfg, len(batches)))


def _check_module(model: Any) -> None:
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("quantize_qat needs an eager nn.Module or an FX GraphModule, not a TorchScript model "
                        "(give it as a pickled nn.Module or a state dict with --arch)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize_qat needs a torch nn.Module, got {type(model).__name__}")
    if list_quantizers(model):
        raise ValueError("the model is already fake-quantized (quantize_qat ran before); quantize once")


def _val_top1(model: Any, tdata: Any) -> float | None:
    if not len(tdata.y_val):
        return None
    return round(evaluate_top1(model, tdata.x_val, tdata.y_val, tdata), 2)


# ---------------------------------------------------------------------- the QAT model


def list_quantizers(model: Any) -> list[Any]:
    """NNCF's fake-quantizer modules in ``model`` (empty for a model NNCF never touched)."""
    import sys

    if "nncf" not in sys.modules:  # NNCF never ran in this process: no quantizers anywhere
        return []
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for m in model.modules() if isinstance(m, BaseQuantizer)]


def is_qat_model(model: Any) -> bool:
    """Whether ``model`` is this pass's output (a fake-quantized NNCF model)."""
    return _QAT_CLASS is not None and isinstance(model, _QAT_CLASS)


def _set_export_mode(model: Any, qdq: bool) -> None:
    from nncf.torch.quantization.layers import QuantizerExportMode

    mode = QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS if qdq else QuantizerExportMode.FAKE_QUANTIZE
    for q in list_quantizers(model):
        q.set_export_mode(mode)


def _onnx_mode_pre_hook(module: Any, args: Any) -> None:
    """Every call: QDQ export mode while torch.onnx exports the model, FakeQuantize mode otherwise
    (and, on the first call in a process, NNCF's kernels built without NNCF's time limit)."""
    import torch

    if not _KERNELS_READY:
        _ensure_kernels()
    _set_export_mode(module, qdq=torch.onnx.is_in_onnx_export())


_KERNELS_READY = False


def _ensure_kernels() -> None:
    """Build (or find built) NNCF's C++ fake-quantize kernels, once per process.

    NNCF builds them lazily on the first quantizer call, under a 60 s limit; a build takes one to
    two minutes on two cores (cached in the torch extensions directory, but rebuilt whenever a
    different ninja binary last built it), so the lazy build can time out. ``force_build_*`` has
    no limit, and torch skips ninja on the later lazy load in the same process.
    """
    global _KERNELS_READY
    if _KERNELS_READY:
        return
    import nncf.torch
    import nncf.torch.quantization.extensions  # registers the loaders that force_build_* runs
    import torch

    nncf.torch.force_build_cpu_extensions()
    if torch.cuda.is_available():  # the training loop runs on the GPU when there is one
        nncf.torch.force_build_cuda_extensions()
    _KERNELS_READY = True


_QAT_CLASS: Any = None


def qat_model_class() -> Any:
    """The QATModel class (made on first use, so importing this module does not import torch)."""
    global _QAT_CLASS
    if _QAT_CLASS is not None:
        return _QAT_CLASS
    import torch

    class QATModel(torch.nn.Module):
        """The module being quantized, wrapped: NNCF attaches its hooks to this wrapper (so
        nn.Sequential and FX GraphModule inputs both work with NNCF's eager backend)."""

        def __init__(self, model: Any, *, freeze_bn: bool = True, disable_dropout: bool = True) -> None:
            super().__init__()
            self.model = model
            self.freeze_bn = freeze_bn
            self.disable_dropout = disable_dropout
            self.register_forward_pre_hook(_onnx_mode_pre_hook)

        def forward(self, x: Any) -> Any:
            return self.model(x)

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            if mode:
                frozen: tuple[type, ...] = ()
                if self.freeze_bn:
                    frozen += (torch.nn.modules.batchnorm._BatchNorm,)
                if self.disable_dropout:
                    frozen += (torch.nn.modules.dropout._DropoutNd,)
                for m in self.model.modules():
                    if frozen and isinstance(m, frozen):
                        m.eval()
            return self

        def __reduce__(self) -> Any:
            import nncf.torch
            from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE

            if ATR_HOOK_STORAGE not in self._modules:  # not (yet) quantized: a plain wrapper
                return _restore_qat_model, (self.model, None, None, self._flags())
            state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
            return _restore_qat_model, (self.model, nncf.torch.get_config(self), state, self._flags())

        def _flags(self) -> dict[str, bool]:
            return {"freeze_bn": self.freeze_bn, "disable_dropout": self.disable_dropout, "training": self.training}

    QATModel.__module__ = __name__
    _QAT_CLASS = QATModel
    return QATModel


def _restore_qat_model(model: Any, nncf_config: dict[str, Any] | None, state: dict[str, Any] | None,
                       flags: dict[str, bool]) -> Any:
    """Unpickling (and deepcopy): NNCF's documented restore, load_from_config then the state dict."""
    restored = qat_model_class()(model, freeze_bn=flags["freeze_bn"], disable_dropout=flags["disable_dropout"])
    if nncf_config is not None:
        import nncf.torch

        restored = nncf.torch.load_from_config(restored, nncf_config)
        restored.load_state_dict(state)
    return restored.train(flags["training"])
