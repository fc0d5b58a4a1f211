"""tflite: a LiteRT (TFLite) flatbuffer made by Google's PyTorch converter (litert-torch, formerly
ai-edge-torch) and run by the LiteRT interpreter (ai-edge-litert) on its default XNNPACK delegate.

Quantization (``quantization``):

* ``none``: the FP32 flatbuffer from ``litert_torch.convert``.
* ``fp16``: the FP32 flatbuffer with conv / depthwise / fully-connected weights cast to FP16 by
  ai-edge-quantizer (``float_casting``, weight-only). Half the size; XNNPACK on x86 unpacks the
  weights and computes in FP32, so it is no faster than FP32.
* ``dynamic_int8``: per-channel int8 weights by ai-edge-quantizer (``dynamic_wi8_afp32``);
  activations are quantized at run time by the kernels.
* ``int8``: full integer. PT2E: the module is captured with ``torch.export``, annotated by
  litert-torch's ``PT2EQuantizer`` (per-channel symmetric int8 weights, int8 activations from
  histogram observers), calibrated on the recipe's calibration images, and converted by
  ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))``. Every conv, add,
  pool and the classifier then run as int8 kernels.
  The converter gives the model an int8 input and output; ``io: float`` (the default) adds a
  QUANTIZE op on the input and a DEQUANTIZE op on the output so that it takes and returns float32
  like the other engines (XNNPACK runs both in the same partition; faster than doing it in numpy).
  ``int8_method: ai_edge_quantizer`` quantizes the FP32 flatbuffer with ai-edge-quantizer's
  ``static_wi8_ai8`` (min/max calibration in the LiteRT interpreter) instead.

The engine's ``info`` counts the flatbuffer's operators by type and tensor types; the runner's
``runtime_info`` says how many partitions XNNPACK took and which operators it left to the
built-in kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..artifact import Form, ModelArtifact, eval_mode, plain_graph_module
from ..bound import DEFAULT_CONFIDENCE, fixed_count_problem
from ..data import preprocess
from ..environment import installed_version
from ..errors import TargetError, first_line
from ..registry import register_target
from ..fidelity.tapper import LayerInfo, Tapper
from ..target_base import Availability, Engine, Runner, Target, TargetConfig

log = logging.getLogger(__name__)

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
    """the default (int8) calibrates on the recipe's data; instances set it from their config"""

    def requires_data(self) -> bool:
        return self.config.quantization == "int8"

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
            module = _from_torchscript(module, sample)
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
        quantizer = (_keeping_quantizer(keep_float, float_ops) if keep_float or float_ops
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
        _to_eval(quantized)
        info.update(route="pt2e (torchao prepare_pt2e/convert_pt2e, litert_torch PT2EQuantizer) + litert_torch.convert",
                    export=mode, calibration_batch=batch, per_channel=cfg.per_channel,
                    activation_observer="histogram", weights="int8 symmetric " + (
                        "per-channel" if cfg.per_channel else "per-tensor"), model_type=cfg.model_type)
        config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
        return self._convert(quantized, sample, artifact, quant_config=config)

    def _within_budget(self, module: Any, sample: Any, x: np.ndarray, content: bytes, info: dict[str, Any],
                       artifact: ModelArtifact, data: Any, tmp_dir: Path) -> bytes:
        """max_drop on the PT2E path: rank the layers by the SQNR each one loses against the float
        model (taps on validation images), then convert again with the top 1, 2, ... layers (their
        batch norm and activation, and the pooling / reshaping after them) left unannotated, so
        they run in float, until the validation drop holds. The metrics go to engine.json's
        ``accuracy_budget`` (the run fails its acceptance when ``met`` is false)."""
        from ..environment import default_threads
        from ..passes._ptq.accuracy_budget import latency_costs, make_budget, metrics_block, try_row
        from ..taps import TFLiteTapper, TorchTapper

        cfg = self.config
        budget = make_budget(data, artifact, max_drop=cfg.max_drop, confidence=cfg.confidence,
                             validation_samples=cfg.validation_samples, calibrated=cfg.samples,
                             max_kept_layers=cfg.max_kept_layers, threads=default_threads(),
                             layer_latency=cfg.kept_layer_latency, what=self.step)
        work = tmp_dir / ".budget"
        work.mkdir()

        def saved(blob: bytes, tag: str) -> Path:
            path = work / f"{tag}.tflite"
            path.write_bytes(blob)
            return path

        def runs(blob: bytes, tag: str) -> Any:
            path = saved(blob, tag)

            def run(x: np.ndarray) -> np.ndarray:
                runner = TFLiteRunner(path, threads=budget.threads)
                try:
                    return np.concatenate([runner(x[i : i + 64]) for i in range(0, len(x), 64)])
                finally:
                    runner.close()

            return run

        import torch

        def float_logits(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([module(torch.from_numpy(x[i : i + 64])).numpy() for i in range(0, len(x), 64)])

        budget.set_reference(float_logits)
        plain = budget.verdict(runs(content, "plain"))
        best, best_verdict, kept, tries = content, plain, [], []
        ranking: list[dict[str, Any]] = []
        if not budget.holds(plain):
            ref = TorchTapper(module)
            tap = TFLiteTapper(saved(content, "plain"), ref.layers, threads=budget.threads)
            xs = budget.x[:64]
            want, got = ref(xs), tap(xs)
            from ..explain import LayerStats, lowest_sqnr

            prev = 60.0
            for name in ref.plan.layers:
                if name not in got:
                    continue
                acc = LayerStats()
                acc.add(want[name], got[name], None)
                low = lowest_sqnr(acc.result(None))
                low = 99.0 if low is None else low
                ranking.append({"layer": name, "sqnr_db": round(low, 2), "loss_db": round(max(0.0, prev - low), 2)})
                prev = min(prev, low)
            ranking.sort(key=lambda r: -r["loss_db"])
            modules = {layer.name: layer.modules for layer in ref.layers}
            for k in range(1, min(cfg.max_kept_layers, len(ranking)) + 1):
                layers = [r["layer"] for r in ranking[:k]]
                keep = tuple(m for layer in layers for m in modules.get(layer, (layer,)))
                blob = self._convert_pt2e(module, sample, x, {}, artifact, keep_float=keep)
                found = budget.verdict(runs(blob, f"keep{k}"))
                tries.append(try_row(found, kept=layers, int8_top1=budget.reference_top1 - found.point))
                if found.point < best_verdict.point or (found.point == best_verdict.point and not kept) \
                        or budget.holds(found):
                    best, best_verdict, kept = blob, found, layers
                if budget.holds(found):
                    break
        plain, best_verdict = budget.current(plain, runs(content, "plain")), budget.current(best_verdict,
                                                                                           runs(best, "best"))
        rows = [{"node": layer, "source_module": layer, "op_type": "CONV_2D/FULLY_CONNECTED", "latency_cost_ms": None}
                for layer in kept]
        extra: dict[str, Any] = {"ranking": ranking}
        if kept and budget.layer_latency:
            variants = {}
            for layer in kept:
                others = tuple(m for other in kept if other != layer for m in modules.get(other, (other,)))
                blob = self._convert_pt2e(module, sample, x, {}, artifact, keep_float=others) if others else content
                variants[layer] = TFLiteRunner(saved(blob, f"without-{layer}"), threads=budget.threads)
            final_p50, costs = latency_costs(TFLiteRunner(saved(best, "final"), threads=budget.threads), variants,
                                             budget.x[:1])
            for r in rows:
                r["latency_cost_ms"] = round(costs[r["node"]], 4)
            extra["latency_ms"] = {"budgeted": round(final_p50, 4), "runtime": "tflite (XNNPACK)",
                                   "threads": budget.threads}
        info["accuracy_budget"] = metrics_block(budget, method="per-layer SQNR loss ranking, layers left "
                                                "unannotated in PT2E", plain=plain, final=best_verdict, kept=rows,
                                                tries=tries, **extra)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        return best

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
                    _tag_sources(captured)
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
        from ..taps import TFLiteTapper

        return TFLiteTapper(engine.path, reference, threads=threads)


_MOVES = {"max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d", "avg_pool2d", "flatten", "view", "reshape",
          "permute", "squeeze", "unsqueeze", "getitem", "hardtanh", "relu", "relu6", "dropout", "mean"}


TRANSFORMER_FLOAT_OPS = ("add", "cat", "concat", "mul")
"""aten ops that ``model_type: transformer`` leaves unannotated, as NNCF's transformer mode keeps them in
float: the residual adds, and the concatenation of ViT's class token with the patch tokens, whose one
INT8 scale crushes the class token the classifier reads. The LiteRT converter still makes that
concatenation an INT8 CONCATENATION (its input from the patch embedding is INT8, the class token a
constant): on a 224x224 ViT of 4 layers the head's SQNR stays at 13.7 dB where the blocks' are 28.7"""


def _keeping_quantizer(keep: tuple[str, ...], ops: tuple[str, ...] = ()) -> Any:
    """A litert_torch PT2EQuantizer that leaves the nodes of the ``keep`` modules and the aten ``ops``
    unannotated (they then run in float), and with them the data-movement ops whose only input is
    such a node (which the quantizer would otherwise quantize with their input's scale)."""
    from litert_torch.quantize import pt2e_quantizer

    from ..taps import aten_layer_name, stack_path

    wanted = set(keep)

    def module_of(node: Any) -> set[str]:
        names = {stack_path(value) for value in (node.meta.get("nn_module_stack") or {}).values()}
        layer = aten_layer_name(node)  # a graph that kept no module names (TorchScript): its weight's
        return names | {layer} if layer else names

    class Keeping(pt2e_quantizer.PT2EQuantizer):
        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            stripped: set[Any] = set()
            for node in model.graph.nodes:
                if module_of(node) & wanted or (node.op == "call_function" and _op_name(node) in ops):
                    node.meta.pop("quantization_annotation", None)
                    stripped.add(node)
            changed = True
            while changed:
                changed = False
                for node in model.graph.nodes:
                    if node in stripped or node.op != "call_function":
                        continue
                    name = _op_name(node)
                    inputs = [a for a in node.args if hasattr(a, "op")]
                    if name in _MOVES and inputs and all(a in stripped for a in inputs):
                        node.meta.pop("quantization_annotation", None)
                        stripped.add(node)
                        changed = True
            return model

    return Keeping()


def _op_name(node: Any) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


class TFLiteRunner(Runner):
    """One LiteRT interpreter per batch size (the input resized, then tensors allocated), XNNPACK
    delegate with exactly ``threads`` threads. Float NCHW batches in, float logits out; quantized
    inputs and outputs are (de)quantized with the model's own scales. A graph that cannot be
    resized to a batch is run sample by sample at batch 1 (``runtime_info`` says so)."""

    def __init__(self, path: Path, *, threads: int) -> None:
        self.name = "tflite"
        self.path = Path(path)
        self.threads = threads
        self._interpreters: dict[int, Any] = {}
        self._looped: set[int] = set()
        self._io: dict[int, tuple[dict, dict]] = {}

    def _make(self, batch: int) -> Any:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(self.path), num_threads=self.threads)
        inp = interp.get_input_details()[0]
        if batch != int(inp["shape"][0]):
            interp.resize_tensor_input(inp["index"], [batch, *[int(d) for d in inp["shape"][1:]]], strict=False)
        interp.allocate_tensors()
        out = interp.get_output_details()[0]
        if int(out["shape"][0]) != batch:
            raise ValueError(f"output batch {out['shape'][0]} after resizing the input to {batch}")
        return interp

    def prepare(self, batch: int) -> None:
        if batch in self._interpreters or batch in self._looped:
            return
        if 1 not in self._interpreters:
            self._add(1, self._make(1))
        if batch == 1:
            return
        try:
            self._add(batch, self._make(batch))
        except Exception as exc:
            log.warning("tflite: cannot resize %s to batch %d (%s); running it sample by sample", self.path, batch, exc)
            self._looped.add(batch)

    def _add(self, batch: int, interp: Any) -> None:
        self._interpreters[batch] = interp
        self._io[batch] = (interp.get_input_details()[0], interp.get_output_details()[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = len(x)
        if batch not in self._interpreters and batch not in self._looped:
            self.prepare(batch)
        if batch in self._looped:
            return np.concatenate([self._run(1, x[i : i + 1]) for i in range(batch)])
        return self._run(batch, x)

    def _run(self, batch: int, x: np.ndarray) -> np.ndarray:
        interp = self._interpreters[batch]
        inp, out = self._io[batch]
        interp.set_tensor(inp["index"], _quantize(x, inp))
        interp.invoke()
        return _dequantize(interp.get_tensor(out["index"]), out)

    def runtime_info(self) -> dict[str, Any]:
        import ai_edge_litert

        if 1 not in self._interpreters:
            self.prepare(1)
        interp = self._interpreters[1]
        inp, out = self._io[1]
        partitions, undelegated = delegation(interp)
        return {
            "runtime": f"ai-edge-litert {ai_edge_litert.__version__}",
            "threads": self.threads,
            "delegate": "XNNPACK" if partitions else "none (built-in kernels)",
            "xnnpack_partitions": partitions,
            "undelegated_ops": dict(undelegated.most_common()),
            "input_dtype": np.dtype(inp["dtype"]).name,
            "output_dtype": np.dtype(out["dtype"]).name,
            "input_quantization": _qparams(inp),
            "output_quantization": _qparams(out),
            "batching": ("resized interpreter per batch size" if not self._looped else
                         f"batch 1 loop for batch sizes {sorted(self._looped)} (input cannot be resized)"),
            "batch_sizes": sorted(self._interpreters),
        }

    def close(self) -> None:
        self._interpreters.clear()
        self._io.clear()


# ---------------------------------------------------------------------- helpers


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return np.ascontiguousarray(x, dtype=np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.multiply(x, np.float32(1.0 / scale), dtype=np.float32)
    q += np.float32(zero)
    np.rint(q, out=q)
    np.clip(q, info.min, info.max, out=q)
    return q.astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]) == np.float32:
        return y.copy()
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - np.float32(zero)) * np.float32(scale)


def _qparams(detail: dict) -> dict[str, float] | None:
    scale, zero = detail["quantization"]
    return None if not scale else {"scale": float(scale), "zero_point": int(zero)}


def _from_torchscript(module: Any, sample: Any) -> Any:
    """A TorchScript module as the FX graph module of an equivalent torch.export program."""
    import torch

    try:
        from torch._export.converter import TS2EPConverter

        # frozen first (conv+BN folded: PT2E would otherwise match its conv-BN patterns for a
        # long while), and without the program's batch-1 guard: the TorchScript module took any
        # batch, and PT2E calibrates in batches
        frozen = torch.jit.freeze(module.eval())
        return plain_graph_module(TS2EPConverter(frozen, (sample,)).convert().module())
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise TargetError(f"tflite: the TorchScript model cannot be converted to a torch.export program "
                          f"(litert-torch converts only those): {reason}; give an nn.Module or a .pt2 instead") from exc


def _to_eval(module: Any) -> None:
    """Put a converted PT2E graph in eval mode (plain .eval() is refused on exported graphs)."""
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(module)
    except Exception:  # only silences litert-torch's "converted in training mode" warning
        pass
    module.training = False


def _tag_sources(graph_module: Any) -> None:
    """Non-strict torch.export records no ``source_fn_stack``; litert-torch's PT2EQuantizer finds
    add / mul / cat / pooling partitions by it. Tag those aten nodes as strict export would."""
    import operator

    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    sources = {
        aten.add.Tensor: operator.add, aten.add_.Tensor: operator.add,
        aten.mul.Tensor: operator.mul, aten.mul_.Tensor: operator.mul,
        aten.cat.default: torch.cat,
        aten.max_pool2d.default: F.max_pool2d, aten.max_pool2d_with_indices.default: F.max_pool2d,
        aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    }
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in sources and not node.meta.get("source_fn_stack"):
            node.meta["source_fn_stack"] = [(node.name, sources[node.target])]


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


def flatbuffer_summary(content: bytes) -> dict[str, Any]:
    """Operators of the main subgraph by type, and by type with their tensor types
    (``CONV_2D:INT8,INT8,INT32->INT8``), read from the flatbuffer with LiteRT's schema."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(content, 0)
    graph = model.Subgraphs(0)
    by_type: Counter[str] = Counter()
    by_dtype: Counter[str] = Counter()
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, str(builtin))
        if name == "CUSTOM" and code.CustomCode():
            name = f"CUSTOM:{code.CustomCode().decode()}"
        ins = [types.get(graph.Tensors(t).Type(), "?") for t in op.InputsAsNumpy() if t >= 0] \
            if op.InputsLength() else []
        outs = [types.get(graph.Tensors(t).Type(), "?") for t in op.OutputsAsNumpy()] if op.OutputsLength() else []
        by_type[name] += 1
        by_dtype[f"{name}:{','.join(ins)}->{','.join(outs)}"] += 1
    tensor_types: Counter[str] = Counter(types.get(graph.Tensors(i).Type(), "?") for i in range(graph.TensorsLength()))
    inp = graph.Tensors(graph.Inputs(0))
    out = graph.Tensors(graph.Outputs(0))
    return {
        "ops": graph.OperatorsLength(),
        "op_types": dict(by_type.most_common()),
        "op_dtypes": dict(by_dtype.most_common()),
        "tensor_types": dict(tensor_types.most_common()),
        "input": {"type": types.get(inp.Type()), "shape": inp.ShapeAsNumpy().tolist()},
        "output": {"type": types.get(out.Type()), "shape": out.ShapeAsNumpy().tolist()},
        "float_compute_ops": sum(n for k, n in by_dtype.items() if k.split(":")[0] in _COMPUTE and "->FLOAT32" in k),
    }


def float_io(content: bytes) -> tuple[bytes, bool]:
    """Give a model with quantized (int8) input/output float32 ones: a QUANTIZE op before the first
    op and a DEQUANTIZE op after the last, both with the tensors' own scales, which XNNPACK runs in
    the same partition. Returns the model and whether it changed."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    graph = model.subgraphs[0]
    quantized = (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16)
    changed = False

    def opcode(builtin: int, version: int) -> int:
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def float_twin(index: int, suffix: str) -> int:
        old = graph.tensors[index]
        new = schema.TensorT()
        new.shape, new.shapeSignature, new.hasRank = list(old.shape), old.shapeSignature, old.hasRank
        new.type, new.name = schema.TensorType.FLOAT32, (old.name or b"") + suffix.encode()
        buffer = schema.BufferT()
        model.buffers.append(buffer)
        new.buffer = len(model.buffers) - 1
        graph.tensors.append(new)
        return len(graph.tensors) - 1

    def retarget(kind: str, old: int, new: int) -> None:
        for sig in model.signatureDefs or []:
            for m in getattr(sig, kind) or []:
                if m.tensorIndex == old:
                    m.tensorIndex = new

    for pos, index in enumerate(list(graph.inputs)):
        if graph.tensors[index].type in quantized:
            new = float_twin(index, "_float")
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.QUANTIZE, 2), [new], [index]
            graph.operators.insert(0, op)
            graph.inputs[pos] = new
            retarget("inputs", index, new)
            changed = True
    for pos, index in enumerate(list(graph.outputs)):
        if graph.tensors[index].type in quantized:
            new = float_twin(index, "_float")
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.DEQUANTIZE, 2), [index], [new]
            graph.operators.append(op)
            graph.outputs[pos] = new
            retarget("outputs", index, new)
            changed = True
    if not changed:
        return content, False
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), True


_COMPUTE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "MEAN", "SUM", "AVERAGE_POOL_2D",
            "MAX_POOL_2D", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONCATENATION"}


def delegation(interp: Any) -> tuple[int, Counter[str]]:
    """How many partitions XNNPACK took, and the original operators left to the built-in kernels.

    An operator runs outside the delegate exactly when one of its outputs feeds a delegate
    partition or the model's output without being produced by a partition, or feeds such an
    operator; the walk goes backwards from those tensors."""
    nodes = interp._get_ops_details()
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    if not delegates:
        return 0, Counter(n["op_name"] for n in nodes)
    delegated_out = {int(t) for d in delegates for t in d["outputs"]}
    originals = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {int(t): n for n in originals for t in n["outputs"]}
    frontier = [int(t) for d in delegates for t in d["inputs"]]
    frontier += [int(d["index"]) for d in interp.get_output_details()]
    outside: dict[int, dict] = {}
    while frontier:
        t = frontier.pop()
        if t in delegated_out or t not in producer:
            continue
        node = producer[t]
        if node["index"] in outside:
            continue
        outside[node["index"]] = node
        frontier.extend(int(i) for i in node["inputs"] if i >= 0)
    return len(delegates), Counter(n["op_name"] for n in outside.values())
