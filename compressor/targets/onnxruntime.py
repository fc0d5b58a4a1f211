"""onnxruntime: an ONNX engine (FP32, or INT8 QDQ) run by ONNX Runtime's CPU execution provider.

The report lists the kernels ORT really runs after its graph optimizations (e.g. QLinearConv
for a QDQ model whose Q/DQ pairs it fused) and the CPU's integer dot-product extensions.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..artifact import Form, ModelArtifact
from ..environment import widest_int8_isa
from ..fidelity.naming import OnnxGraph
from ..fidelity.tapper import LayerInfo, Logits, Tapper
from ..ort_session import cpu_session, session_options
from ..registry import register_target
from ..target_base import Availability, Engine, Runner, Target, TargetConfig


class OnnxRuntimeConfig(TargetConfig):
    graph_optimization: Literal["disabled", "basic", "extended", "all"] = "all"
    """ORT graph optimization level"""


@register_target
class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    summary = "ONNX Runtime, CPU execution provider (FP32 or INT8 QDQ)"
    Config = OnnxRuntimeConfig
    consumes = frozenset({Form.ONNX})
    """given a torch model (e.g. as an FP32 baseline), the pass manager runs export_onnx first"""
    libraries = ("onnxruntime",)

    @classmethod
    def availability(cls) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Availability(False, f"onnxruntime is not installed ({exc})")
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return Availability(False, "ONNX Runtime has no CPU execution provider")
        return Availability(True, f"onnxruntime {ort.__version__} CPUExecutionProvider")

    def _build(self, artifact: ModelArtifact, tmp_dir: Path, data: Any = None) -> tuple[list[Path], dict[str, Any]]:
        info: dict[str, Any] = {"graph_optimization": self.config.graph_optimization}
        files = []
        for f in artifact.files():
            shutil.copy2(f, tmp_dir / f.name)
            files.append(tmp_dir / f.name)
        return files, info

    def load_settings(self) -> dict[str, Any]:
        return {"graph_optimization": self.config.graph_optimization}

    def load(self, engine: Engine, *, threads: int) -> Runner:
        return OrtRunner(engine.path, threads=threads, graph_optimization=self.config.graph_optimization)


    def tapper(self, engine: Engine, reference: list[LayerInfo], *, threads: int) -> Tapper:
        return OnnxTapper(engine.path, threads=threads)

    @classmethod
    def reference_runner(cls, path: Path, *, threads: int) -> Runner:
        return OrtRunner(path, threads=threads)

    @classmethod
    def reference_tapper(cls, path: Path, *, threads: int) -> Tapper:
        return OnnxTapper(path, threads=threads)


class OrtRunner(Runner):
    def __init__(self, path: Path, *, threads: int, graph_optimization: str = "all") -> None:
        import onnxruntime as ort

        self.name = "onnxruntime"
        self.threads = threads
        self._optimized = Path(tempfile.mkdtemp(prefix="ort-")) / "optimized.onnx"
        opts = session_options(threads)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # the workers spin while a run is on, and stop when it returns: a pool still spinning after
        # its run would take the cores from whatever runs next (another engine timed in the session,
        # or the application's own work between requests)
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        opts.optimized_model_filepath = str(self._optimized)
        self.session = cpu_session(path, opts)
        self.input_name = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # e.g. a fixed-batch torch.export
        self.graph_optimization = graph_optimization

    def __call__(self, x: np.ndarray) -> np.ndarray:
        step = self.fixed_batch
        if step is None or len(x) == step:
            return self.session.run(None, {self.input_name: x})[0]
        return np.concatenate([self.session.run(None, {self.input_name: x[i : i + step]})[0]
                               for i in range(0, len(x), step)])

    def runtime_info(self) -> dict[str, Any]:
        import onnx
        import onnxruntime as ort

        kernels: Counter[str] = Counter()
        if self._optimized.exists():
            for node in onnx.load(str(self._optimized), load_external_data=False).graph.node:
                kernels[node.op_type] += 1
        return {
            "runtime": f"onnxruntime {ort.__version__}",
            "providers": self.session.get_providers(),
            "threads": self.threads,
            "spinning": "during a run only (session.force_spinning_stop)",
            "graph_optimization": self.graph_optimization,
            "fixed_batch": self.fixed_batch,
            "kernels": dict(kernels.most_common()),
            "isa": widest_int8_isa(),
        }

    def close(self) -> None:
        shutil.rmtree(self._optimized.parent, ignore_errors=True)


# ----------------------------------------------------------------------------- taps

class OnnxTapper(Tapper):
    """Taps an ONNX graph on ONNX Runtime: the taps (:class:`compressor.fidelity.naming.OnnxGraph`) as
    extra graph outputs; a quantized tap is read as its QuantizeLinear's integer output (so ORT's QDQ
    fusion is not disturbed) and dequantized here."""

    can_bypass = True

    def __init__(self, path: Path, *, threads: int) -> None:
        import onnx

        self.threads = threads
        self.graph = OnnxGraph(onnx.load(str(path)))
        self.plan = self.graph.plan
        self.session = cpu_session(self.graph.tapped().SerializeToString(), session_options(threads))
        self.input = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed = batch if isinstance(batch, int) and batch > 0 else None
        self.names = [o.name for o in self.session.get_outputs()]

    def _run(self, session: Any, x: np.ndarray) -> list[list[np.ndarray]]:
        step = self.fixed or len(x)
        return [session.run(None, {self.input: x[i : i + step]}) for i in range(0, len(x), step)]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        parts = self._run(self.session, x)
        index = {n: i for i, n in enumerate(self.names)}
        got = {}
        for layer in self.plan.layers:
            arr = np.concatenate([p[index[self.graph.taps[layer]]] for p in parts])
            if layer in self.graph.dequant:
                scale, zp = self.graph.dequant[layer]
                arr = (arr.astype(np.float32) - zp) * scale
            got[layer] = arr.astype(np.float32, copy=False)
        return got

    def bypassed(self, layer: str) -> Logits:
        session = cpu_session(self.graph.without_quantizer(layer).SerializeToString(),
                              session_options(self.threads))
        return lambda x: np.concatenate([p[0] for p in self._run(session, x)])
