"""quantize_ptq backend tensorrt: NVIDIA Model Optimizer's ONNX quantization
(``modelopt.onnx.quantization``) into the explicit-quantization QDQ graph TensorRT wants (symmetric
INT8, per-channel weights, per-tensor activations, Q/DQ placed so conv + bias + activation and
residual adds fuse), calibrated here on the CPU with ONNX Runtime; the placement is checked by
:mod:`compressor.qdq_rules` and reported."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import qdq_rules
from ...artifact import Form, ModelArtifact
from ...errors import ConfigError
from ...pass_base import PassResult
from . import accuracy_budget, transformer
from .accuracy_budget import Budget

if TYPE_CHECKING:
    from ..quantize_ptq.config import QuantizePTQConfig

log = logging.getLogger(__name__)


def check_available(step: str) -> None:
    """Refuse, before anything runs, a recipe whose machine lacks ModelOpt's ONNX quantization."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{step}.backend: tensorrt needs NVIDIA ModelOpt's ONNX quantization "
                          f"(pip install 'compressor[tensorrt]'): {exc}") from exc


def quantize(artifact: ModelArtifact, x: np.ndarray, config: QuantizePTQConfig, work_dir: Path,
             step: str, budget: Budget | None = None) -> PassResult:
    """ModelOpt's QDQ for TensorRT; with ``budget``, the layers the search picks go into ModelOpt's
    ``nodes_to_exclude`` (see :mod:`.accuracy_budget`; measured on ONNX Runtime's CPU provider)."""
    import onnx

    assert artifact.path is not None
    path = work_dir / "model.onnx"
    extra: dict[str, Any] = {}
    if budget is None:
        quantize_for_tensorrt(artifact.path, path, x, config.calibration, config.ignored_nodes)
    else:
        plain = work_dir / "try-0.onnx"
        quantize_for_tensorrt(artifact.path, plain, x, config.calibration, config.ignored_nodes)
        path, extra["accuracy_budget"] = accuracy_budget.search_onnx(
            artifact.path, plain, budget,
            lambda exclude, dst: quantize_for_tensorrt(artifact.path, dst, x, config.calibration,
                                                       [*config.ignored_nodes, *exclude]),
            work_dir, producer_outputs_quantized=False, method="nvidia-modelopt nodes_to_exclude",
            latency_runtime="onnxruntime CPU (the QDQ graph; TensorRT builds its engine elsewhere)")
    if not config.per_channel:
        log.warning("%s: ModelOpt always quantizes weights per channel for TensorRT", step)
    rules = qdq_rules.check(onnx.load(str(path)))
    if not rules.ok:
        log.warning("%s: the QDQ graph breaks TensorRT placement rules: %s", step,
                    "; ".join(map(str, rules.violations[:5])))
    metrics = {"backend": "nvidia-modelopt (TensorRT QDQ)", "calibration": config.calibration, "samples": len(x),
               "calibration_provider": "onnxruntime CPU", "tensorrt_qdq_rules": rules.to_json(),
               **transformer.record(config), **extra}
    return PassResult(artifact.derive(Form.ONNX, path=path, precision="int8", qdq_for="tensorrt"), metrics)


def quantize_for_tensorrt(src: Any, dst: Any, x: np.ndarray, calibration: str = "entropy",
                          exclude: list[str] | None = None) -> None:
    """NVIDIA ModelOpt's INT8 ONNX quantization for TensorRT, calibrated with ONNX Runtime on the CPU."""
    import modelopt.onnx.quantization as moq

    log_buffer = io.StringIO()
    with contextlib.redirect_stdout(log_buffer), ort_quantization_restored():
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


_ORT_QUANTIZATION_MODULES = ("onnxruntime.quantization.calibrate", "onnxruntime.quantization.onnx_quantizer",
                             "onnxruntime.quantization.qdq_quantizer", "onnxruntime.quantization.base_quantizer",
                             "onnxruntime.quantization.registry")


@contextlib.contextmanager
def ort_quantization_restored() -> Iterator[None]:
    """ModelOpt monkey-patches ONNX Runtime's quantization classes when it runs, and edits its operator
    registries in place (``configure_ort`` deletes Relu, Reshape, Transpose, ... from QDQRegistry); put
    both back afterwards, so that ORT's own ``quantize_static`` (backend onnxruntime) gives the same
    graph in a process where the TensorRT path ran before as in a fresh one (it did not: the Relu after
    a Conv kept its own QDQ pair, and a cluster worker that had not built a TensorRT engine wrote other
    bytes)."""
    saved: list[tuple[Any, dict[str, Any]]] = []
    tables: list[tuple[dict, dict]] = []
    for name in _ORT_QUANTIZATION_MODULES:
        mod = importlib.import_module(name)
        saved.append((mod, dict(vars(mod))))
        for key, value in list(vars(mod).items()):
            if isinstance(value, type) and value.__module__ == name:
                saved.append((value, dict(vars(value))))
            elif isinstance(value, dict) and not key.startswith("_"):  # a registry, edited in place
                tables.append((value, dict(value)))
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
        for table, before in tables:
            if table != before:
                table.clear()
                table.update(before)
