"""The tflite target: conversion (litert-torch, PT2E, ai-edge-quantizer), the accuracy budget of
its PT2E path, and loading (see the package's docstring)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ...artifact import Form, ModelArtifact, eval_mode
from ...bound import DEFAULT_CONFIDENCE, fixed_count_problem
from ...data import preprocess
from ...environment import installed_version
from ...errors import TargetError, first_line
from ...fidelity.tapper import LayerInfo, Tapper
from ...intake import torchscript_for_target
from ...registry import register_target
from ...target_base import Availability, Engine, Runner, Target, TargetConfig
from .flatbuffer import float_io, flatbuffer_summary
from .pt2e import TRANSFORMER_FLOAT_OPS, keeping_quantizer, tag_sources, to_eval
from .runner import TFLiteRunner
from .taps import TFLiteTapper

log = logging.getLogger("compressor.targets.tflite")

_INSTALL = "install the tflite extra (litert-torch 0.10, ai-edge-litert 2.3; see pyproject.toml)"
PRECISION = {"none": "fp32", "fp16": "fp16", "dynamic_int8": "dynamic_int8", "int8": "int8"}


class TFLiteConfig(TargetConfig):
    quantization: Literal["none", "fp16", "dynamic_int8", "int8"] = "int8"
    """none: FP32; fp16: FP16 weights; dynamic_int8: int8 weights, activations quantized at run time;
    int8: full integer with calibration on the recipe's data"""
    int8_method: Literal["pt2e", "ai_edge_quantizer"] = "pt2e"
    """int8: PT2E quantization in torch before conversion (histogram activation ranges), or
    ai-edge-quantizer static_wi8_ai8 on the FP32 flatbuffer (min/max ranges)"""
    per_channel: bool = True
    """int8 / dynamic_int8: per-output-channel weight scales (else one per tensor)"""
    samples: int | None = Field(default=None, ge=1)
    """int8: calibration images (default: the recipe's data.calibration.samples)"""
    calibration_batch: int = Field(default=32, ge=1)
    """int8 (pt2e): images per calibration forward pass (batch 1 if the model cannot be exported
    with a dynamic batch dimension)"""
    io: Literal["float", "quantized"] = "float"
    """int8: float: a QUANTIZE op on the input and a DEQUANTIZE op on the output make the model take
    and return float32 (XNNPACK runs them with the rest); quantized: keep the converter's int8 input
    and output (the runner then quantizes batches in numpy)"""
    max_drop: float | None = Field(default=None, ge=0)
    """int8 (pt2e): accuracy budget, most top-1 points lost on validation images of the training
    split that calibration does not use (never the test split); where plain INT8 loses more, the
    layers that lose most (per-layer taps against the float model) stay in float, one more per try"""
    validation_samples: int | None = Field(default=None, ge=10)
    """max_drop: class-balanced validation images; None: what the confidence bound needs (at least 500,
    grown where a setting's bound misses for lack of images, up to 10,000 and what the split holds)"""
    confidence: float = Field(default=DEFAULT_CONFIDENCE, ge=0.5, lt=1)
    """max_drop: met when the one-sided upper confidence bound of the drop, at this confidence, is within it"""
    max_kept_layers: int = Field(default=8, ge=1)
    """max_drop: most layers kept in float before giving up (accuracy_budget.met false, best kept)"""
    kept_layer_latency: bool = True
    """max_drop: time what each kept layer costs at batch 1 (one more conversion per kept layer)"""
    model_type: Literal["cnn", "transformer"] = "cnn"
    """int8 (pt2e): transformer: the residual adds and multiplies stay in float, as NNCF's transformer
    mode keeps them (litert-torch's quantizer already leaves LayerNorm, softmax and the attention
    matmuls in float); cnn: the quantizer's defaults"""
    export: Literal["auto", "strict", "non_strict"] = "auto"
    """int8 (pt2e): torch.export mode of the capture; auto tries strict (which records the source
    functions the quantizer's add / pool patterns match) and falls back to non-strict"""

    @model_validator(mode="after")
    def _max_drop_needs_pt2e_int8(self) -> TFLiteConfig:
        """max_drop keeps layers in float inside the PT2E INT8 quantizer: with any other quantization
        or int8_method nothing would honour it, so it is refused rather than silently ignored."""
        if self.max_drop is None:
            return self
        if self.quantization != "int8":
            raise ValueError(f"max_drop applies to quantization int8 (int8_method pt2e) only; quantization "
                             f"{self.quantization} has no layers to keep in float: remove max_drop")
        if self.int8_method != "pt2e":
            raise ValueError(f"max_drop applies to int8_method pt2e only (it keeps layers in float inside the "
                             f"PT2E quantizer); int8_method {self.int8_method} cannot: remove max_drop or use pt2e")
        return self

    @model_validator(mode="after")
    def _model_type_needs_pt2e_int8(self) -> TFLiteConfig:
        if self.model_type == "transformer" and (self.quantization != "int8" or self.int8_method != "pt2e"):
            raise ValueError("model_type transformer applies to quantization int8 with int8_method pt2e (it keeps "
                             "ops in float inside the PT2E quantizer): remove model_type or use them")
        return self

    @model_validator(mode="after")
    def _validation_can_prove_the_budget(self) -> TFLiteConfig:
        problem = fixed_count_problem(self.max_drop, self.validation_samples, self.confidence)
        if problem:
            raise ValueError(problem)
        return self


@contextlib.contextmanager
def _quiet_litert() -> Iterator[None]:
    """litert-torch prints a progress tree on stdout unless LITERT_TORCH_SHOW_PROGRESS is off."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    old = os.environ.get(key)
    os.environ[key] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@register_target
class TFLiteTarget(Target):
    name = "tflite"
    summary = "LiteRT / TFLite flatbuffer (litert-torch), LiteRT interpreter on XNNPACK (FP32, FP16, INT8)"
    Config = TFLiteConfig
    consumes = frozenset({Form.TORCH, Form.EXPORTED})
    """an ExportedProgram converts as the module it unpacks to; TorchScript through torch.export's converter"""
    libraries = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torchao")
    needs_data = True
    """full-integer int8, the default, calibrates; fp16 and dynamic_int8 need no data (Target.requires_data)"""

    @classmethod
    def availability(cls) -> Availability:
        try:
            import ai_edge_litert
            from ai_edge_litert.interpreter import Interpreter  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"ai-edge-litert is not installed ({exc}); {_INSTALL}")
        try:
            import litert_torch  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"litert-torch is not installed ({exc}); {_INSTALL}")
        except Exception as exc:  # a broken install (e.g. a mismatched torch) fails in other ways
            return Availability(False, f"litert-torch cannot be imported: {type(exc).__name__}: {exc}")
        return Availability(True, f"ai-edge-litert {ai_edge_litert.__version__} interpreter, XNNPACK delegate")

    def engine_precision(self, artifact: ModelArtifact) -> str:
        q = self.config.quantization
        return artifact.precision if q == "none" else PRECISION[q]

    # ------------------------------------------------------------------ conversion
    def _build(self, artifact: ModelArtifact, tmp_dir: Path, data: Any = None) -> tuple[list[Path], dict[str, Any]]:
        import torch

        cfg = self.config
        module = eval_mode(artifact.torch_module())
        sample = torch.zeros(artifact.input_spec.with_batch(1), dtype=torch.float32)
        if isinstance(module, torch.jit.ScriptModule):  # litert-torch converts via torch.export: no TorchScript
            module = torchscript_for_target("tflite", module, sample)
        path = tmp_dir / "model.tflite"
        info: dict[str, Any] = {"quantization": cfg.quantization, "input_shape": list(sample.shape)}
        started = time.perf_counter()
        with _quiet_litert():
            if cfg.quantization == "int8" and cfg.int8_method == "pt2e":
                x = self._calibration(artifact, data)
                content = self._convert_pt2e(module, sample, x, info, artifact)
                info["calibration_samples"] = len(x)
                if cfg.max_drop is not None:
                    content = self._within_budget(module, sample, x, content, info, artifact, data, tmp_dir)
            else:
                content = self._convert(module, sample, artifact)
                info["route"] = "litert_torch.convert"
                if cfg.quantization != "none":
                    x = self._calibration(artifact, data) if cfg.quantization == "int8" else None
                    content = self._ai_edge_quantize(content, x, info)
                    if x is not None:
                        info["calibration_samples"] = len(x)
        if cfg.quantization == "int8" and cfg.io == "float":
            content, changed = float_io(content)
            info["io"] = "float32 (QUANTIZE / DEQUANTIZE ops added)" if changed else "float32"
        elif cfg.quantization == "int8":
            info["io"] = "as converted (int8; the runner quantizes in numpy)"
        path.write_bytes(content)
        info["convert_seconds"] = round(time.perf_counter() - started, 2)
        info["flatbuffer"] = flatbuffer_summary(content)
        info["runtime_build"] = {"converter": f"litert-torch {installed_version('litert-torch')}",
                                 "interpreter": f"ai-edge-litert {installed_version('ai-edge-litert')}"}
        return [path], info

    def _calibration(self, artifact: ModelArtifact, data: Any) -> np.ndarray:
        if data is None:
            raise TargetError(f"{self.step}: target 'tflite' with quantization int8 needs calibration data; "
                              "add a data section or --data")
        size = tuple(artifact.input_spec.sample_shape[1:])
        images = data.calibration_images(size, artifact.preprocessing, self.config.samples)
        return preprocess(images, artifact.preprocessing)

    def _convert(self, module: Any, sample: Any, artifact: ModelArtifact, **kwargs: Any) -> bytes:
        import litert_torch

        try:
            edge = litert_torch.convert(module, (sample,), **kwargs)
            return bytes(edge.model_content())
        except Exception as exc:
            raise self._conversion_error(exc, artifact) from exc

    def _convert_pt2e(self, module: Any, sample: Any, x: np.ndarray, info: dict[str, Any],
                      artifact: ModelArtifact, keep_float: tuple[str, ...] = ()) -> bytes:
        import torch
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e import quantize_pt2e

        cfg = self.config
        float_ops = TRANSFORMER_FLOAT_OPS if cfg.model_type == "transformer" else ()
        quantizer = (keeping_quantizer(keep_float, float_ops) if keep_float or float_ops
                     else pt2e_quantizer.PT2EQuantizer()).set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=cfg.per_channel, is_dynamic=False))
        errors: list[str] = []
        quantized, last = None, None
        for captured, mode, batch in self._captures(module, sample, x, errors):
            try:
                prepared = quantize_pt2e.prepare_pt2e(captured, quantizer)
                with torch.no_grad():
                    for i in range(0, len(x), batch):
                        prepared(torch.from_numpy(x[i : i + batch]))
                quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            except Exception as exc:
                errors.append(f"{mode}, calibration batch {batch}: {type(exc).__name__}: {first_line(exc, 400)}")
                log.debug("tflite: PT2E with %s export at batch %d failed", mode, batch, exc_info=True)
                last = exc
                continue
            break
        if quantized is None:
            exc = RuntimeError("; ".join(errors))
            raise self._conversion_error(exc, artifact, stage="PT2E quantization") from last
        to_eval(quantized)
        info.update(route="pt2e (torchao prepare_pt2e/convert_pt2e, litert_torch PT2EQuantizer) + litert_torch.convert",
                    export=mode, calibration_batch=batch, per_channel=cfg.per_channel,
                    activation_observer="histogram", weights="int8 symmetric " + (
                        "per-channel" if cfg.per_channel else "per-tensor"), model_type=cfg.model_type)
        config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
        return self._convert(quantized, sample, artifact, quant_config=config)

    def _within_budget(self, module: Any, sample: Any, x: np.ndarray, content: bytes, info: dict[str, Any],
                       artifact: ModelArtifact, data: Any, tmp_dir: Path) -> bytes:
        """max_drop on the PT2E path, through the one budget loop (:func:`compressor.fidelity.budget.keep_float_search`):
        rank the layers by the SQNR each one loses against the float model (taps on validation images),
        then convert again with the top 1, 2, ... layers (their batch norm and activation, and the
        pooling / reshaping after them) left unannotated, so they run in float, until the validation
        drop holds. The metrics go to engine.json's ``accuracy_budget`` (the run fails its acceptance
        when ``met`` is false)."""
        import shutil

        from ...environment import default_threads
        from ...fidelity.budget import keep_float_search, make_budget

        cfg = self.config
        budget = make_budget(data, artifact, max_drop=cfg.max_drop, confidence=cfg.confidence,
                             validation_samples=cfg.validation_samples, calibrated=cfg.samples,
                             max_kept_layers=cfg.max_kept_layers, threads=default_threads(),
                             layer_latency=cfg.kept_layer_latency, what=self.step)
        work = tmp_dir / ".budget"
        work.mkdir()
        count = iter(range(10**6))

        def build(keep: tuple[str, ...]) -> Path:
            blob = self._convert_pt2e(module, sample, x, {}, artifact, keep_float=keep) if keep else content
            path = work / f"try{next(count)}.tflite"
            path.write_bytes(blob)
            return path

        best, info["accuracy_budget"] = keep_float_search(
            budget, module, build, runner=lambda path: TFLiteRunner(path, threads=budget.threads),
            tapper=lambda path, ref: TFLiteTapper(path, ref, threads=budget.threads),
            method="per-layer SQNR loss ranking, layers left unannotated in PT2E", runtime="tflite (XNNPACK)",
            op_type="CONV_2D/FULLY_CONNECTED")
        content = best.read_bytes()
        shutil.rmtree(work, ignore_errors=True)
        return content

    def _captures(self, module: Any, sample: Any, x: np.ndarray, errors: list[str]) -> Iterator[tuple[Any, str, int]]:
        """torch.export captures of the module for PT2E, best first: strict if possible (it records
        the source functions that the quantizer's add / pool patterns match), and with a dynamic
        batch dimension if possible (calibration then runs in batches)."""
        import torch

        cfg = self.config
        modes = {"auto": [True, False], "strict": [True], "non_strict": [False]}[cfg.export]
        batch = min(cfg.calibration_batch, len(x))
        for strict in modes:
            name = "strict" if strict else "non_strict"
            shapes: list[Any] = [None]
            if batch > 1:
                shapes.insert(0, ({0: torch.export.Dim("batch", min=1, max=max(1024, batch))},))
            for dynamic in shapes:
                example = torch.from_numpy(x[:batch]) if dynamic is not None else sample
                try:
                    captured = torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=strict).module()
                except Exception as exc:
                    errors.append(f"{name} export{' (dynamic batch)' if dynamic else ''}: "
                                  f"{type(exc).__name__}: {first_line(exc, 400)}")
                    continue
                if not strict:
                    tag_sources(captured)
                yield captured, name, batch if dynamic is not None else 1

    def _ai_edge_quantize(self, content: bytes, x: np.ndarray | None, info: dict[str, Any]) -> bytes:
        from ai_edge_quantizer import qtyping, quantizer

        cfg = self.config
        granularity = qtyping.QuantGranularity.CHANNELWISE if cfg.per_channel else qtyping.QuantGranularity.TENSORWISE
        qt = quantizer.Quantizer(bytearray(content))
        op_name = qtyping.TFLOperationName
        if cfg.quantization == "fp16":
            for op in (op_name.CONV_2D, op_name.DEPTHWISE_CONV_2D, op_name.FULLY_CONNECTED, op_name.CONV_2D_TRANSPOSE):
                qt.add_weight_only_config(regex=".*", operation_name=op, num_bits=16,
                                          algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
            info["route"] += " + ai-edge-quantizer float_casting (fp16 weights)"
        elif cfg.quantization == "dynamic_int8":
            qt.add_dynamic_config(regex=".*", operation_name=op_name.ALL_SUPPORTED, num_bits=8,
                                  granularity=granularity)
            info["route"] += " + ai-edge-quantizer dynamic_wi8_afp32"
        else:
            assert x is not None
            qt.add_static_config(regex=".*", operation_name=op_name.ALL_SUPPORTED, activation_num_bits=8,
                                 weight_num_bits=8, weight_granularity=granularity)
            info["route"] += " + ai-edge-quantizer static_wi8_ai8 (min/max calibration)"
        calibration = None
        if qt.need_calibration:
            assert x is not None
            from ai_edge_litert.interpreter import Interpreter

            signatures = Interpreter(model_content=content).get_signature_list()
            key = next(iter(signatures))
            name = signatures[key]["inputs"][0]
            calibration = qt.calibrate({key: [{name: x[i : i + 1]} for i in range(len(x))]}, num_threads=1)
        with contextlib.redirect_stdout(_DevNull()):
            result = qt.quantize(calibration, enable_progress_report=False)
        info["per_channel"] = cfg.per_channel
        return bytes(result.quantized_model)

    def _conversion_error(self, exc: BaseException, artifact: ModelArtifact, stage: str = "conversion") -> TargetError:
        op = unsupported_op(exc)
        producer = (f"the graph produced by pass {artifact.lineage[-1]['pass']!r}" if artifact.lineage
                    else "the source model (no pass ran before it)")
        what = f"cannot convert op {op}" if op else "conversion failed"
        return TargetError(f"{self.step}: target 'tflite' (litert-torch {stage}) {what} in {producer}: "
                           f"{type(exc).__name__}: {first_line(exc, 400)}")

    # ------------------------------------------------------------------ running
    def load(self, engine: Engine, *, threads: int) -> Runner:
        return TFLiteRunner(engine.path, threads=threads)

    def tapper(self, engine: Engine, reference: list[LayerInfo], *, threads: int) -> Tapper:
        return TFLiteTapper(engine.path, reference, threads=threads)


def unsupported_op(exc: BaseException) -> str | None:
    """The aten op named by a litert-torch lowering error, searched along the exception chain."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        for pattern in (r"Lowering not found: (\S+)", r"target=torch\.ops\.([\w.]+)", r"target=([\w.]+)\]"):
            m = re.search(pattern, text)
            if m:
                return m.group(1).rstrip(".,")
        e = e.__cause__ or e.__context__
    return None


class _DevNull:
    def write(self, _s: str) -> int:
        return 0

    def flush(self) -> None:
        pass
