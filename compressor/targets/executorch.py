"""executorch: PyTorch's own on-device runtime. The model is captured with ``torch.export``, lowered
to XNNPACK (``to_edge_transform_and_lower`` with ``XnnpackPartitioner``), serialized to a ``.pte``
program and run by ExecuTorch's Python runtime (``executorch.runtime``), whose XNNPACK delegate
uses ExecuTorch's own thread pool.

Quantization (``quantization``):

* ``none``: FP32; the delegate runs the exported graph's own float kernels.
* ``int8``: PT2E with ExecuTorch's ``XNNPACKQuantizer`` (symmetric int8 weights, per output channel
  by default; int8 activations from its observers), calibrated on the recipe's calibration images
  as the tflite target does, ``convert_pt2e``, then lowered: XNNPACK fuses each Q/DQ pair into its
  int8 kernels. The program takes and returns float32.

The program is exported with a dynamic batch dimension up to ``max_batch`` where the model allows
it (else at batch 1); the runner splits larger batches. ``program.pt2`` beside ``model.pte`` is the
exported program before lowering (the float capture, or the converted INT8 graph): the tapper
lowers it again with the layers' outputs as extra program outputs. ExecuTorch's own debugging
route (ETDump with a debug buffer, read by the Inspector) records only what crosses a delegate's
boundary: inside an XNNPACK partition it gives per-kernel timings but no intermediate tensors, so
it cannot tap the engine's layers.

``max_drop`` (int8): the accuracy budget of the tflite target on ExecuTorch's quantizer. The layers
are ranked by the SQNR each one loses against the float model (the engine's taps on validation
images), and the top 1, 2, ... layers are left unannotated in the quantizer (they, their activation
and the data movement after them run in float) until the validation drop holds.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..artifact import Form, ModelArtifact, eval_mode
from ..bound import DEFAULT_CONFIDENCE, fixed_count_problem
from ..data import preprocess
from ..environment import installed_version
from ..errors import TargetError, first_line
from ..fidelity.tapper import LayerInfo, Quantizer, TapPlan, Tapper
from ..intake import torchscript_for_target
from ..registry import register_target
from ..target_base import Availability, Engine, Runner, Target, TargetConfig

log = logging.getLogger(__name__)

_INSTALL = "install the executorch extra (executorch 1.5.1; see pyproject.toml)"
PROGRAM = "model.pte"
EXPORTED = "program.pt2"
"""the exported program a .pte was lowered from, kept beside it for the tapper"""


class ExecuTorchConfig(TargetConfig):
    quantization: Literal["none", "int8"] = "int8"
    """none: FP32; int8: PT2E with ExecuTorch's XNNPACKQuantizer, calibrated on the recipe's data"""
    per_channel: bool = True
    """int8: per-output-channel symmetric weight scales (else one per tensor)"""
    samples: int | None = Field(default=None, ge=1)
    """int8: calibration images (default: the recipe's data.calibration.samples)"""
    calibration_batch: int = Field(default=32, ge=1)
    """int8: images per calibration forward pass"""
    max_batch: int = Field(default=64, ge=1)
    """largest batch the program takes in one call (its memory is planned for it); larger batches are
    split. 1: a static batch-1 program"""
    max_drop: float | None = Field(default=None, ge=0)
    """int8: accuracy budget in top-1 points on validation images (data.validation); where plain INT8
    loses more, the layers that lose most (per-layer taps against the float model) stay in float, one
    more per try"""
    validation_samples: int | None = Field(default=None, ge=10)
    """max_drop: validation images; None: what the confidence bound needs (at least 500, grown as needed)"""
    confidence: float = Field(default=DEFAULT_CONFIDENCE, ge=0.5, lt=1)
    """max_drop: met when the one-sided upper confidence bound of the drop is within it"""
    max_kept_layers: int = Field(default=8, ge=1)
    """max_drop: most layers kept in float before giving up (accuracy_budget.met false, best kept)"""
    kept_layer_latency: bool = True
    """max_drop: time what each kept layer costs at batch 1 (one more lowering per kept layer)"""

    @model_validator(mode="after")
    def _budget_applies(self) -> ExecuTorchConfig:
        if self.max_drop is not None and self.quantization != "int8":
            raise ValueError("max_drop applies to quantization int8 only (it keeps layers in float inside the "
                             "PT2E quantizer): remove max_drop")
        problem = fixed_count_problem(self.max_drop, self.validation_samples, self.confidence)
        if problem:
            raise ValueError(problem)
        return self


@register_target
class ExecuTorchTarget(Target):
    name = "executorch"
    summary = "ExecuTorch .pte lowered to XNNPACK, ExecuTorch's Python runtime (FP32, INT8 through PT2E)"
    Config = ExecuTorchConfig
    consumes = frozenset({Form.TORCH, Form.EXPORTED})
    libraries = ("executorch", "torchao")
    needs_data = True
    """int8 (the default) calibrates on the recipe's data; Target.requires_data reads the config"""

    @classmethod
    def availability(cls) -> Availability:
        try:
            from executorch.runtime import Runtime
        except ImportError as exc:
            return Availability(False, f"executorch is not installed ({exc}); {_INSTALL}")
        except Exception as exc:  # a broken install (e.g. a torch it was not built for) fails in other ways
            return Availability(False, f"executorch cannot be imported: {type(exc).__name__}: {first_line(exc)}")
        try:
            backends = Runtime.get().backend_registry.registered_backend_names
        except Exception as exc:
            return Availability(False, f"the ExecuTorch runtime does not start: {type(exc).__name__}: "
                                       f"{first_line(exc)}")
        if "XnnpackBackend" not in backends:
            return Availability(False, f"this ExecuTorch runtime has no XNNPACK backend (it has: "
                                       f"{', '.join(backends)})")
        return Availability(True, f"executorch {installed_version('executorch')} runtime, XNNPACK delegate")

    @classmethod
    def tune_candidates(cls, max_drop: float) -> list[dict[str, Any]]:
        """The engines ``compress tune`` tries for this target, cheapest first: its branch name,
        precision, description and target config."""
        return [
            {"name": "et_fp32", "precision": "fp32", "what": "ExecuTorch FP32 (XNNPACK)",
             "config": {"quantization": "none"}},
            {"name": "et_int8", "precision": "int8", "what": "ExecuTorch INT8 (PT2E, XNNPACKQuantizer)",
             "config": {"quantization": "int8"}},
            {"name": "et_int8_budget", "precision": "int8", "what": f"ExecuTorch INT8, sensitive layers kept in float "
             f"(max_drop {max_drop} on validation images)", "config": {"quantization": "int8", "max_drop": max_drop}},
        ]

    def engine_precision(self, artifact: ModelArtifact) -> str:
        return artifact.precision if self.config.quantization == "none" else "int8"

    # ------------------------------------------------------------------ building
    def _build(self, artifact: ModelArtifact, tmp_dir: Path, data: Any = None) -> tuple[list[Path], dict[str, Any]]:
        import torch

        cfg = self.config
        module = eval_mode(artifact.torch_module())
        if isinstance(module, torch.jit.ScriptModule):  # torch.export captures modules: TorchScript converted first
            sample = torch.zeros(artifact.input_spec.with_batch(1), dtype=torch.float32)
            module = torchscript_for_target("executorch", module, sample)
        info: dict[str, Any] = {"quantization": cfg.quantization}
        started = time.perf_counter()
        if cfg.quantization == "int8":
            x = self._calibration(artifact, data)
            capture = self._capture(module, x, artifact)
            graph = self._quantize(capture, x, artifact)
            info.update(calibration_samples=len(x), route="torch.export + PT2E (XNNPACKQuantizer) + "
                        "to_edge_transform_and_lower (XnnpackPartitioner)", per_channel=cfg.per_channel,
                        weights="int8 symmetric " + ("per-channel" if cfg.per_channel else "per-tensor"))
            if cfg.max_drop is not None:
                graph = self._within_budget(module, capture, x, graph, info, artifact, data, tmp_dir)
        else:
            x = np.zeros(artifact.input_spec.with_batch(1), dtype=np.float32)
            capture = self._capture(module, x, artifact)
            graph = capture.graph
            info["route"] = "torch.export + to_edge_transform_and_lower (XnnpackPartitioner)"
        lowered = self._lower(graph, capture, artifact)
        (tmp_dir / PROGRAM).write_bytes(lowered.pte)
        lowered.save_program(tmp_dir / EXPORTED)
        info.update(export=capture.mode, batch_capacity=capture.max_batch, input_shape=list(artifact.input_spec.shape),
                    lowering=lowered.summary, convert_seconds=round(time.perf_counter() - started, 2),
                    runtime_build={"lowering": f"executorch {installed_version('executorch')}",
                                   "torch": installed_version("torch")})
        return [tmp_dir / PROGRAM], info

    def _calibration(self, artifact: ModelArtifact, data: Any) -> np.ndarray:
        if data is None:
            raise TargetError(f"{self.step}: target 'executorch' with quantization int8 needs calibration data; "
                              "add a data section or --data")
        images = data.calibration_images(tuple(artifact.input_spec.sample_shape[1:]), artifact.preprocessing,
                                         self.config.samples)
        return preprocess(images, artifact.preprocessing)

    def _capture(self, module: Any, x: np.ndarray, artifact: ModelArtifact) -> Capture:
        """torch.export of the module with a dynamic batch up to ``max_batch`` where it allows it, else at batch 1."""
        import torch

        errors = []
        top = self.config.max_batch
        # the example is as large as the bound: exported from a smaller one, ExecuTorch 1.5 planned the input
        # of a tiny CNN for 15 images where the bound said 64
        example = torch.from_numpy(np.resize(np.ascontiguousarray(x, dtype=np.float32), (top, *x.shape[1:])))
        if top > 1:
            dynamic = ({0: torch.export.Dim("batch", min=1, max=top)},)
            try:
                ep = torch.export.export(module, (example,), dynamic_shapes=dynamic)
                return Capture(ep.module(), example, dynamic, top, "dynamic batch")
            except Exception as exc:
                errors.append(f"dynamic batch: {type(exc).__name__}: {first_line(exc, 300)}")
        try:
            ep = torch.export.export(module, (example[:1],))
            return Capture(ep.module(), example[:1], None, 1, "static batch 1")
        except Exception as exc:
            errors.append(f"batch 1: {type(exc).__name__}: {first_line(exc, 300)}")
            raise self._error("; ".join(errors), artifact, "torch.export") from exc

    def _quantize(self, capture: Capture, x: np.ndarray, artifact: ModelArtifact,
                  keep_float: tuple[str, ...] = ()) -> Any:
        import torch
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = xnnpack_quantizer(self.config.per_channel, keep_float)
        try:
            prepared = prepare_pt2e(_copy_graph(capture.graph), quantizer)
            step = min(self.config.calibration_batch, capture.max_batch)
            with torch.no_grad():
                for i in range(0, len(x), step):
                    prepared(torch.from_numpy(np.ascontiguousarray(x[i : i + step])))
            return convert_pt2e(prepared)
        except Exception as exc:
            raise self._error(exc, artifact, "PT2E quantization") from exc

    def _lower(self, graph: Any, capture: Capture, artifact: ModelArtifact) -> Lowered:
        try:
            return lower(graph, capture)
        except Exception as exc:
            raise self._error(exc, artifact, "lowering to XNNPACK") from exc

    def _error(self, exc: BaseException | str, artifact: ModelArtifact, stage: str) -> TargetError:
        producer = (f"the graph produced by pass {artifact.lineage[-1]['pass']!r}" if artifact.lineage
                    else "the source model (no pass ran before it)")
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {first_line(exc, 400)}"
        return TargetError(f"{self.step}: target 'executorch' ({stage}) failed on {producer}: {text}")

    def _within_budget(self, module: Any, capture: Capture, x: np.ndarray, plain: Any, info: dict[str, Any],
                       artifact: ModelArtifact, data: Any, tmp_dir: Path) -> Any:
        """max_drop: :func:`compressor.fidelity.budget.keep_float_search` (the budget loop the tflite target
        runs too) with ExecuTorch programs; engine.json gets ``accuracy_budget``."""
        from ..environment import default_threads
        from ..fidelity.budget import keep_float_search, make_budget

        cfg = self.config
        budget = make_budget(data, artifact, max_drop=cfg.max_drop, confidence=cfg.confidence,
                             validation_samples=cfg.validation_samples, calibrated=cfg.samples,
                             max_kept_layers=cfg.max_kept_layers, threads=default_threads(),
                             layer_latency=cfg.kept_layer_latency, what=self.step)
        work = Path(tempfile.mkdtemp(prefix=".budget-", dir=tmp_dir))
        count = iter(range(10**6))

        def build(keep: tuple[str, ...]) -> Built:
            graph = plain if not keep else self._quantize(capture, x, artifact, keep_float=keep)
            lowered = self._lower(graph, capture, artifact)
            path = work / f"try{next(count)}.pte"
            path.write_bytes(lowered.pte)
            return Built(graph, path, lowered)

        try:
            best, block = keep_float_search(
                budget, module, build, runner=lambda c: ExecuTorchRunner(c.path, threads=budget.threads),
                tapper=lambda c, ref: ExecuTorchTapper(c.lowered.program, ref, threads=budget.threads, capture=capture),
                method="per-layer SQNR loss ranking (ExecuTorch taps), layers left unannotated in PT2E "
                       "(XNNPACKQuantizer)", runtime="executorch (XNNPACK)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        info["accuracy_budget"] = block
        return best.graph

    # ------------------------------------------------------------------ running
    def load(self, engine: Engine, *, threads: int) -> Runner:
        return ExecuTorchRunner(engine.path, threads=threads)

    def tapper(self, engine: Engine, reference: list[LayerInfo], *, threads: int) -> Tapper:
        exported = engine.path.parent / EXPORTED
        if not exported.is_file():
            raise NotImplementedError(f"target 'executorch' taps the program the engine was lowered from "
                                      f"({exported.name} beside {engine.path.name}), which is missing")
        import torch

        return ExecuTorchTapper(torch.export.load(str(exported)), reference, threads=threads)


# ---------------------------------------------------------------------- capture, quantizer, lowering


@dataclass
class Capture:
    """A torch.export capture: its graph module, example input, dynamic shapes and batch bound."""

    graph: Any
    example: Any
    dynamic: Any
    max_batch: int
    mode: str


@dataclass
class Lowered:
    pte: bytes
    program: Any  # the ExportedProgram lowered
    summary: dict[str, Any]

    def save_program(self, path: Path) -> None:
        import torch

        torch.export.save(self.program, str(path))


@dataclass
class Built:
    """One program a budget search tried: its graph, .pte file and lowering."""

    graph: Any
    path: Path
    lowered: Lowered


def _copy_graph(gm: Any) -> Any:
    import copy

    return copy.deepcopy(gm)


def export_again(graph: Any, capture: Capture) -> Any:
    """The ExportedProgram of a (quantized or tapped) graph module, with the capture's input shapes."""
    import torch

    return torch.export.export(graph, (capture.example,), dynamic_shapes=capture.dynamic)


def lower(graph: Any, capture: Capture) -> Lowered:
    """Export ``graph`` again, lower it to XNNPACK and serialize it; with what XNNPACK took."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = export_again(graph, capture)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    summary = delegation(edge.exported_program().graph)
    return Lowered(bytes(edge.to_executorch().buffer), program, summary)


def delegation(graph: Any) -> dict[str, Any]:
    """How many XNNPACK partitions the lowered graph calls, and the operators left outside them."""
    calls, outside = 0, Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "call_delegate" in name:
            calls += 1
        elif name != "getitem":
            outside[name] += 1
    return {"xnnpack_partitions": calls, "undelegated_ops": dict(outside.most_common())}


_MOVES = {"max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d", "avg_pool2d", "flatten", "view", "reshape",
          "permute", "squeeze", "unsqueeze", "getitem", "hardtanh", "relu", "relu6", "dropout", "mean", "clamp"}
"""ops that follow a kept layer in float where every input they take is float"""


def xnnpack_quantizer(per_channel: bool, keep_float: tuple[str, ...] = ()) -> Any:
    """ExecuTorch's XNNPACKQuantizer (symmetric int8), leaving the nodes of the ``keep_float`` modules
    unannotated, and with them the data-movement ops whose every input is such a node (its own
    ``set_module_name`` takes no None config)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from ..fidelity.naming import stack_path

    config = get_symmetric_quantization_config(is_per_channel=per_channel)
    if not keep_float:
        return XNNPACKQuantizer().set_global(config)
    wanted = set(keep_float)

    def kept(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(stack_path(v) in wanted for v in stack.values())

    class Keeping(XNNPACKQuantizer):
        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            floated = {n for n in model.graph.nodes if n.op == "call_function" and kept(n)}
            for node in model.graph.nodes:
                inputs = [a for a in node.all_input_nodes if a.op == "call_function"]
                if node in floated or (_op(node) in _MOVES and inputs and all(a in floated for a in inputs)):
                    node.meta.pop("quantization_annotation", None)
                    floated.add(node)
            return model

    return Keeping().set_global(config)


def _op(node: Any) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0] if node.op == "call_function" else ""


# ---------------------------------------------------------------------- runner


def _runtime() -> Any:
    from executorch.runtime import Runtime

    return Runtime.get()


_POOL_LOCK = threading.Lock()
_RUNNING = [0]
"""calls executing now, in any runner: the pool is resized only while none is (resizing it under a
running call is what makes the reset "unsafe")"""


def set_threads(threads: int) -> int:
    """Size ExecuTorch's process-wide thread pool (XNNPACK's workers) to ``threads`` where no call is
    running; the size it has."""
    with _running(threads) as size:
        return size


@contextlib.contextmanager
def _running(threads: int) -> Iterator[int]:
    """One call on ExecuTorch's process-wide thread pool, sized to ``threads`` first where no other call
    is running; yields the pool's size."""
    from executorch.extension.pybindings import portable_lib

    with _POOL_LOCK:
        if _RUNNING[0] == 0 and portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        _RUNNING[0] += 1
        size = int(portable_lib._threadpool_get_thread_count())
    try:
        yield size
    finally:
        with _POOL_LOCK:
            _RUNNING[0] -= 1


class ExecuTorchRunner(Runner):
    """One loaded ``forward`` method of a .pte; float NCHW batches in, float logits out. Batches above
    the program's capacity (its planned batch bound) are run in slices. ExecuTorch's thread pool is
    one per process: each call sizes it to ``threads`` first where another runner changed it and no
    call is running (runners called at once, as serving's N in flight, share it: ``runtime_info``
    says the size it had at the last call)."""

    def __init__(self, path: Path | bytes, *, threads: int, pad: bool = False) -> None:
        self.name = "executorch"
        self.path = path
        self.threads = threads
        self.pad = pad
        """a static-batch program: the last slice is padded to its batch"""
        program = _runtime().load_program(path if isinstance(path, bytes) else Path(path))
        self.method = program.load_method("forward")
        self._program = program
        sizes = list(self.method.metadata.input_tensor_meta(0).sizes())
        self.capacity = int(sizes[0])
        self.outputs = int(self.method.metadata.num_outputs())
        self.pool = set_threads(threads)

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output of the program for ``x`` (sliced to the capacity and joined)."""
        import torch

        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = []
        for i in range(0, len(x), self.capacity):
            part = x[i : i + self.capacity]
            if self.pad and len(part) < self.capacity:
                part = np.concatenate([part, np.zeros((self.capacity - len(part), *part.shape[1:]), np.float32)])
            with _running(self.threads) as self.pool:
                outs = self.method.execute([torch.from_numpy(part)])
            parts.append([o.numpy()[: len(x) - i] for o in outs])  # execute clones its outputs
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[0]

    def runtime_info(self) -> dict[str, Any]:
        return {"runtime": f"executorch {installed_version('executorch')}", "threads": self.pool,
                "thread_pool": "ExecuTorch's process-wide pool (XNNPACK workers)", "delegate": "XNNPACK",
                "batch_capacity": self.capacity,
                "batching": "one call per batch" if self.capacity > 1 else "batch 1 loop (static batch-1 program)"}

    def close(self) -> None:
        self.method = None
        self._program = None


# ---------------------------------------------------------------------- taps


_FOLLOW = {"clamp", "_native_batch_norm_legit_no_training", "native_batch_norm", "getitem"}
"""besides naming.TORCH_FOLLOW_FUNCS: what a layer's batch norm and activation become in an exported graph"""
_QUANTIZE = "quantize_per_tensor"
TAP_BATCH = 8
"""the tap program's static batch (the last slice of a batch is padded to it)"""


def tap_points(graph: Any) -> tuple[list[tuple[str, Any]], list[str], dict[str, Quantizer],
                                    dict[str, tuple[float, float]]]:
    """The layers of an exported (float or PT2E-converted) graph and the node each is tapped at: its
    conv / linear node, followed while the single consumer is a batch norm or an activation, then
    the quantizer that follows, if any (the one rule of :mod:`compressor.fidelity.tapper`): its int8
    output, dequantized by the tapper. (As an extra output, the dequantized value of a quantizer
    that feeds an INT8 mean made XNNPACK 1.5 fail its shape propagation; the int8 one does not.)
    Returns ([(layer, node)], unnamed layers' node names, {layer: activation quantizer range},
    {layer: (scale, zero point)})."""
    from ..fidelity.naming import ATEN_LAYERS, TORCH_FOLLOW_FUNCS, aten_layer_name

    follow = _FOLLOW | set(TORCH_FOLLOW_FUNCS)
    taps: list[tuple[str, Any]] = []
    unnamed: list[str] = []
    quantizers: dict[str, Quantizer] = {}
    scales: dict[str, tuple[float, float]] = {}
    seen: set[str] = set()
    for node in graph.graph.nodes:
        if _op(node) not in ATEN_LAYERS:
            continue
        name = aten_layer_name(node)
        if name is None:
            unnamed.append(node.name)
            continue
        if name in seen:
            continue
        seen.add(name)
        end = node
        while len(end.users) == 1 and _op(next(iter(end.users))) in follow:
            end = next(iter(end.users))
        users = list(end.users)
        if len(users) == 1 and _op(users[0]) == _QUANTIZE:
            end = users[0]
            scale, zero, low, high = (float(a) for a in end.args[1:5])
            quantizers[name] = Quantizer((low - zero) * scale, (high - zero) * scale)
            scales[name] = (scale, zero)
        taps.append((name, end))
    return taps, unnamed, quantizers, scales


class ExecuTorchTapper(Tapper):
    """Taps an ExecuTorch engine: the program it was lowered from, lowered again to XNNPACK with each
    layer's tap as an extra program output, run by the same runtime and kernels. (ETDump's debug
    buffer sees no tensor inside an XNNPACK partition.) ``reference``: the reference model's layers;
    layers the reference does not have go to ``plan.unmapped``."""

    def __init__(self, program: Any, reference: list[LayerInfo] | None = None, *, threads: int,
                 capture: Capture | None = None) -> None:
        import torch

        graph = program.module()
        taps, unnamed, quantizers, self._scales = tap_points(graph)
        known = {layer.name for layer in reference} if reference else None
        mapped = [(name, node) for name, node in taps if known is None or name in known]
        self.plan = TapPlan(layers=[name for name, _ in mapped],
                            unmapped=unnamed + [name for name, _ in taps if known is not None and name not in known],
                            quantizers={n: q for n, q in quantizers.items() if known is None or n in known},
                            note="the engine's program lowered again to XNNPACK with the layers' outputs as extra "
                                 "program outputs (ExecuTorch's ETDump sees no tensor inside an XNNPACK partition)")
        out = next(n for n in graph.graph.nodes if n.op == "output")
        results = out.args[0]
        first = results[0] if isinstance(results, (tuple, list)) else results
        extra = list(dict.fromkeys(node for _, node in mapped if node is not first))  # no output twice
        self._index = [0 if node is first else 1 + extra.index(node) for _, node in mapped]
        out.args = ((first, *extra),)
        graph.graph._codegen = torch.fx.graph.CodeGen()  # a flat tuple out; the input stays the one tensor
        graph.recompile()
        # at a static batch: lowered with a dynamic one, ExecuTorch 1.5 ran an INT8 program whose extra
        # outputs left a flatten outside the delegate with a wrong input size (et_view: 80 elements for 320)
        shape = tuple(capture.example.shape[1:]) if capture is not None else _input_shape(program)
        static = Capture(graph, torch.zeros(TAP_BATCH, *shape), None, TAP_BATCH, "static")
        self.runner = ExecuTorchRunner(lower(graph, static).pte, threads=threads, pad=True)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.runner.run_all(x)
        got = {}
        for name, i in zip(self.plan.layers, self._index):
            scale, zero = self._scales.get(name, (None, 0.0))
            value = outs[i]
            got[name] = value if scale is None else (value.astype(np.float32) - np.float32(zero)) * np.float32(scale)
        return got

    def close(self) -> None:
        self.runner.close()


def _input_shape(program: Any) -> tuple[int, ...]:
    """The shape of a saved ExportedProgram's one input, less its batch."""
    spec = next(s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
    return tuple(int(d) for d in node.meta["val"].shape[1:])
