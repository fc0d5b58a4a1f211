"""How each runtime serves an engine: N requests in flight its own way, preprocessing folded into the
engine where it can, a batch size of the server's choosing, and (OpenVINO) the referee.

* OpenVINO: one model compiled with the THROUGHPUT hint, an ``AsyncInferQueue`` of N infer requests
  over it (the plugin's OPTIMAL_NUMBER_OF_INFER_REQUESTS among the N tried): one copy of the
  weights, N requests on the plugin's streams. Preprocessing folds in with the PrePostProcessor:
  u8 NHWC of any height and width in, Pillow's bilinear resize, mean and scale inside the model.
  The referee is ``benchmark_app -api async`` on the same IR with the same compile properties.
* ONNX Runtime: one ``InferenceSession`` (ORT's Run may be called from several threads at once)
  with ``threads // N`` intra-op threads, called from N threads: one copy of the weights.
* LiteRT: an interpreter is not thread-safe, so N interpreters with ``threads // N`` threads each
  on N threads; each packs its own XNNPACK weights (the Python interpreter offers no shared weight
  cache), so N copies of the packed weights.
* Any other target: N runners from ``Target.load`` on N threads.

A :class:`Pool` takes a batch and a completion callback and keeps at most N batches in flight:
``start`` blocks while N are running.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifact import Preprocessing
from .target_base import Engine, Runner

Done = Callable[[np.ndarray], None]


class Pool(ABC):
    """At most ``in_flight`` batches running at once; ``done(logits)`` is called as each finishes
    (on a runtime or worker thread)."""

    in_flight: int = 1

    @abstractmethod
    def start(self, x: np.ndarray, done: Done) -> None:
        """Submit ``x``; blocks while ``in_flight`` batches are running."""

    @abstractmethod
    def wait(self) -> None:
        """Block until every submitted batch has finished (and re-raise a failure of one)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def bind(self, inputs: list[np.ndarray]) -> bool:
        """Give each request its own input from ``inputs`` once, for :meth:`start_bound` (inference only, as
        OpenVINO's benchmark_app feeds its requests); False where the runtime takes the input with every call."""
        return False

    def start_bound(self, done: Done) -> None:
        """Run the next free request on the input :meth:`bind` gave it; blocks while ``in_flight`` are running."""
        raise NotImplementedError


class ThreadPool(Pool):
    """N worker threads, worker k calling ``calls[k]`` (the same callable for all where the runtime
    lets several threads run one session). A semaphore keeps N batches in flight."""

    def __init__(self, calls: list[Callable[[np.ndarray], np.ndarray]], closers: list[Callable[[], None]] = ()) -> None:
        self.in_flight = len(calls)
        self._slots = threading.Semaphore(self.in_flight)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closers = list(closers)
        self._threads = [threading.Thread(target=self._work, args=(c,), daemon=True, name=f"serve-{k}")
                         for k, c in enumerate(calls)]
        for t in self._threads:
            t.start()

    def _work(self, call: Callable[[np.ndarray], np.ndarray]) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            x, done = job
            try:
                done(call(x))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller at wait()
                self._error = exc
            finally:
                self._slots.release()

    def start(self, x: np.ndarray, done: Done) -> None:
        self._raise()
        self._slots.acquire()
        self._jobs.put((x, done))

    def wait(self) -> None:
        for _ in range(self.in_flight):
            self._slots.acquire()
        for _ in range(self.in_flight):
            self._slots.release()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=30)
        for c in self._closers:
            c()


class Backend:
    """Serving one engine on its runtime. The generic one: ``Target.load`` runners on threads."""

    runtime = "generic"
    async_mode = "N runners (Target.load) on N threads"
    weights_shared = False
    shared_note = "each runner loads its own copy of the engine"

    def __init__(self, engine: Engine, *, threads: int, input_shape: tuple[int, ...]) -> None:
        assert engine.builder is not None, "an engine with the target that loads it"
        self.engine, self.target, self.threads = engine, engine.builder, threads
        self.input_shape = tuple(int(d) for d in input_shape)

    def sync_runner(self) -> Runner:
        """The runner the report times (Target.load): batch-1 synchronous serving uses it."""
        return self.target.load(self.engine, threads=self.threads)

    def in_flight_options(self, asked: list[int]) -> list[int]:
        return sorted(set(asked))

    def split_threads(self, n: int) -> int:
        return max(1, self.threads // n)

    def batch_refusal(self) -> str | None:
        """Why this engine takes no batch of the server's choosing (None: it does)."""
        return None

    def pool(self, n: int, batch: int = 1) -> Pool:
        runners = [self.target.load(self.engine, threads=self.split_threads(n)) for _ in range(n)]
        for r in runners:
            r.prepare(batch)
        return ThreadPool(list(runners), [r.close for r in runners])

    folded: tuple[str, ...] = ()
    """the preprocessing steps this runtime can take into the engine: ``normalize`` (u8 NHWC at the input
    size in; float conversion, layout, mean and std inside), ``resize`` (u8 NHWC of the photo's own size
    in; the resize too)"""

    def folding_refusal(self) -> str:
        return f"{self.engine.target}: no preprocessing folded into the engine here (host preprocessing only)"

    def folded_sync(self, prep: Preprocessing, what: str) -> Callable[[np.ndarray], np.ndarray]:
        raise NotImplementedError

    def folded_pool(self, prep: Preprocessing, n: int, what: str) -> Pool:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class OrtBackend(Backend):
    runtime = "onnxruntime"
    async_mode = "one InferenceSession (threads // N intra-op threads) run from N threads"
    weights_shared = True
    shared_note = "one session: its weights once, N concurrent Run calls"

    def runner(self, threads: int) -> Any:
        """The target's own runner (its session options); its session is run from several threads."""
        from .targets.onnxruntime import OrtRunner

        return OrtRunner(self.engine.path, threads=threads, graph_optimization=self.target.config.graph_optimization)

    folded = ("normalize",)

    def __init__(self, engine: Engine, *, threads: int, input_shape: tuple[int, ...]) -> None:
        super().__init__(engine, threads=threads, input_shape=input_shape)
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _folded_path(self, prep: Preprocessing) -> Path:
        """The engine's graph with preprocessing nodes prepended: a uint8 NHWC input, Cast, Transpose to
        NCHW, Mul by scale / std and Add -mean / std (per channel), into the graph's own input."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="serving-folded-")
        path = Path(self._tmp.name) / "folded.onnx"
        if path.is_file():
            return path
        model = onnx.load(str(self.engine.path))
        graph = model.graph
        initializers = {i.name for i in graph.initializer}
        inp = next(i for i in graph.input if i.name not in initializers)
        n, c, h, w = (d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim)
        a, b = _affine(prep, c)
        image = helper.make_tensor_value_info("image_u8", TensorProto.UINT8, [n, h, w, c])
        nodes = [helper.make_node("Cast", ["image_u8"], ["image_f32"], to=TensorProto.FLOAT),
                 helper.make_node("Transpose", ["image_f32"], ["image_nchw"], perm=[0, 3, 1, 2]),
                 helper.make_node("Mul", ["image_nchw", "serving_scale"], ["image_scaled"]),
                 helper.make_node("Add", ["image_scaled", "serving_shift"], [inp.name])]
        graph.initializer.extend([numpy_helper.from_array(a.reshape(1, c, 1, 1), "serving_scale"),
                                  numpy_helper.from_array(b.reshape(1, c, 1, 1), "serving_shift")])
        kept = [i for i in graph.input if i.name != inp.name]
        del graph.input[:]
        graph.input.extend([image, *kept])
        for k, node in enumerate(nodes):
            graph.node.insert(k, node)
        onnx.save(model, str(path))
        return path

    def folded_sync(self, prep: Preprocessing, what: str) -> Callable[[np.ndarray], np.ndarray]:
        from .targets.onnxruntime import OrtRunner

        assert what == "normalize"
        return OrtRunner(self._folded_path(prep), threads=self.threads,
                         graph_optimization=self.target.config.graph_optimization)

    def folded_pool(self, prep: Preprocessing, n: int, what: str) -> Pool:
        from .targets.onnxruntime import OrtRunner

        runner = OrtRunner(self._folded_path(prep), threads=self.split_threads(n),
                           graph_optimization=self.target.config.graph_optimization)
        return ThreadPool([runner] * n, [runner.close])

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def batch_refusal(self) -> str | None:
        import onnx

        graph = onnx.load(str(self.engine.path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        first = next(i for i in graph.input if i.name not in initializers)
        dim = first.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value") and dim.dim_value > 0:
            return f"the ONNX graph's batch dimension is fixed at {dim.dim_value}"
        return None

    def pool(self, n: int, batch: int = 1) -> Pool:
        runner = self.runner(self.split_threads(n))
        return ThreadPool([runner] * n, [runner.close])


class TFLiteBackend(Backend):
    runtime = "tflite"
    async_mode = "N LiteRT interpreters (threads // N threads each) on N threads"
    weights_shared = False
    shared_note = ("an interpreter is not thread-safe: N interpreters, each with its own XNNPACK packed "
                   "weights (the Python interpreter offers no shared weight cache)")

    def batch_refusal(self) -> str | None:
        from .targets.tflite import TFLiteRunner

        runner = TFLiteRunner(self.engine.path, threads=1)
        try:
            runner.prepare(2)
            if 2 not in runner.runtime_info()["batch_sizes"]:
                return "the LiteRT graph cannot be resized to a batch (it would run frame by frame)"
        finally:
            runner.close()
        return None


class OVPool(Pool):
    """An ``AsyncInferQueue`` of ``n`` infer requests of one compiled model."""

    def __init__(self, compiled: Any, n: int) -> None:
        import openvino as ov

        self.in_flight = n
        self._queue = ov.AsyncInferQueue(compiled, n)
        self._error: BaseException | None = None
        self._queue.set_callback(self._finished)

    def _finished(self, request: Any, userdata: tuple[Done, np.ndarray]) -> None:
        try:
            userdata[0](request.get_output_tensor(0).data)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller at wait()
            self._error = exc

    def start(self, x: np.ndarray, done: Done) -> None:
        # the request reads x in place (no copy): the userdata keeps it alive until the request is done
        self._queue.start_async({0: x}, (done, x), share_inputs=True)

    def bind(self, inputs: list[np.ndarray]) -> bool:
        import openvino as ov

        self._bound = [np.ascontiguousarray(inputs[k % len(inputs)]) for k in range(self.in_flight)]
        for request, x in zip(self._queue, self._bound):
            request.set_input_tensor(ov.Tensor(x, shared_memory=True))
        return True

    def start_bound(self, done: Done) -> None:
        self._queue.start_async(userdata=(done, None))

    def wait(self) -> None:
        self._queue.wait_all()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class OpenVINOBackend(Backend):
    runtime = "openvino"
    async_mode = "AsyncInferQueue of N infer requests on one model compiled with the THROUGHPUT hint"
    weights_shared = True
    shared_note = "one compiled model: its weights once, N infer requests on the plugin's streams"

    def __init__(self, engine: Engine, *, threads: int, input_shape: tuple[int, ...]) -> None:
        super().__init__(engine, threads=threads, input_shape=input_shape)
        import openvino as ov

        from .ov_core import core

        self._ov = ov
        self.core = core()
        self.plugin = self.target.config.device  # the OpenVINO plugin ("CPU")
        self.precision_hint = self.target.config.precision_hint
        self._compiled: dict[tuple[int, str], Any] = {}

    def compile_config(self, hint: str = "THROUGHPUT") -> dict[str, Any]:
        return {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": self.threads,
                "INFERENCE_PRECISION_HINT": self.precision_hint}

    def _model(self, batch: int) -> Any:
        ov = self._ov
        model = self.core.read_model(str(self.engine.path))
        # a static batch, as the target's runner compiles it (OpenVINO 2026.4's CPU plugin ran an NNCF
        # INT8 IR compiled with its dynamic batch dimension at 0 % top-1, the same IR reshaped at 79 %)
        model.reshape({model.inputs[0]: ov.PartialShape([batch, *self.input_shape[1:]])})
        return model

    def compiled(self, batch: int = 1) -> Any:
        key = (batch, "")
        if key not in self._compiled:
            self._compiled[key] = self.core.compile_model(self._model(batch), self.plugin, self.compile_config())
        return self._compiled[key]

    def optimal_requests(self) -> int:
        return int(self.compiled().get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def in_flight_options(self, asked: list[int]) -> list[int]:
        return sorted({*asked, self.optimal_requests()})

    def pool(self, n: int, batch: int = 1) -> Pool:
        return OVPool(self.compiled(batch), n)

    folded = ("normalize", "resize")

    def _folded_model(self, prep: Preprocessing, what: str) -> Any:
        ov = self._ov
        from openvino.preprocess import PrePostProcessor, ResizeAlgorithm

        channels = self.input_shape[1]
        a, b = _affine(prep, channels)
        ppp = PrePostProcessor(self._model(1))
        tensor = ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        steps = ppp.input().preprocess()
        if what == "resize":
            tensor.set_spatial_dynamic_shape()
            # the plugin's own resize, on u8 before the float conversion (its Pillow-exact
            # RESIZE_BILINEAR_PILLOW matched the host pixel for pixel but took 50-60 ms per 500x375 frame
            # on the AMD EPYC Zen 4 here, against 5 ms for RESIZE_LINEAR)
            steps.resize({"bicubic": ResizeAlgorithm.RESIZE_CUBIC, "nearest": ResizeAlgorithm.RESIZE_NEAREST}.get(
                getattr(prep, "interpolation", "bilinear"), ResizeAlgorithm.RESIZE_LINEAR))
        # x * scale / std - mean / std as PPP's "subtract mean, divide by scale": mean = -b/a, scale = 1/a
        steps.convert_element_type(ov.Type.f32).mean([float(-bb / aa) for aa, bb in zip(a, b)]) \
            .scale([float(1.0 / aa) for aa in a])
        return ppp.build()

    def folded_sync(self, prep: Preprocessing, what: str) -> Callable[[np.ndarray], np.ndarray]:
        compiled = self.core.compile_model(self._folded_model(prep, what), self.plugin, self.compile_config("LATENCY"))
        request = compiled.create_infer_request()

        def run(u8: np.ndarray) -> np.ndarray:
            request.infer({0: u8}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()

        return run

    def folded_pool(self, prep: Preprocessing, n: int, what: str) -> Pool:
        key = (1, what)
        if key not in self._compiled:
            self._compiled[key] = self.core.compile_model(self._folded_model(prep, what), self.plugin,
                                                          self.compile_config())
        return OVPool(self._compiled[key], n)

    def info(self) -> dict[str, Any]:
        compiled = self.compiled()
        return {"optimal_infer_requests": int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")),
                "streams": int(compiled.get_property("NUM_STREAMS")),
                "compile": {k: str(v) for k, v in self.compile_config().items()}}

    def referee(self, *, in_flight: int, seconds: int) -> dict[str, Any]:
        """``benchmark_app -api async`` on the engine's IR, compiled with the same properties
        (a -load_config file), the same static input shape and ``in_flight`` requests."""
        app = Path(sys.executable).with_name("benchmark_app")
        exe = str(app) if app.is_file() else shutil.which("benchmark_app")
        if exe is None:
            return {"error": "benchmark_app not found (it ships with the openvino pip package)"}
        with tempfile.TemporaryDirectory(prefix="serving-referee-") as tmp:
            cfg = Path(tmp) / "config.json"
            cfg.write_text(json.dumps({self.plugin: {k: str(v) for k, v in self.compile_config().items()}}))
            shape = "[" + ",".join(str(d) for d in self.input_shape) + "]"
            cmd = [exe, "-m", str(self.engine.path), "-d", self.plugin, "-api", "async", "-load_config", str(cfg),
                   "-shape", shape, "-nireq", str(in_flight), "-t", str(int(seconds))]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + 2 * seconds)
            except subprocess.TimeoutExpired:
                return {"error": "benchmark_app timed out", "command": _command(cmd, cfg)}
        found = re.search(r"Throughput:\s+([0-9.]+)\s*FPS", proc.stdout)
        if proc.returncode != 0 or not found:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"benchmark_app exit {proc.returncode}: {tail[0][:200]}", "command": _command(cmd, cfg)}
        return {"fps": float(found.group(1)), "in_flight": in_flight, "seconds": int(seconds),
                "command": _command(cmd, cfg), "compile": {k: str(v) for k, v in self.compile_config().items()}}

    def close(self) -> None:
        self._compiled.clear()


def _affine(prep: Preprocessing, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per channel with ``preprocess(u8) == u8 * a + b``: a = scale / std, b = -mean / std."""
    mean = np.asarray((list(prep.mean) * channels)[:channels], np.float64)
    std = np.asarray((list(prep.std) * channels)[:channels], np.float64)
    return (prep.scale / std).astype(np.float32), (-mean / std).astype(np.float32)


def _command(cmd: list[str], cfg: Path) -> str:
    """The referee's command line as a person would type it (the temporary config file by its content)."""
    return " ".join(Path(c).name if i == 0 else ("CONFIG.json" if c == str(cfg) else c) for i, c in enumerate(cmd))


BACKENDS: dict[str, type[Backend]] = {"openvino": OpenVINOBackend, "onnxruntime": OrtBackend,
                                      "tflite": TFLiteBackend}


def backend_for(engine: Engine, *, threads: int, input_shape: tuple[int, ...]) -> Backend:
    return BACKENDS.get(engine.target, Backend)(engine, threads=threads, input_shape=input_shape)
