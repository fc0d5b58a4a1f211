"""Serving-shaped measurement of a run's engines: from image bytes to a class index, as a deployed
classifier runs (camera or upload -> decode -> preprocess -> engine -> arg-max).

Per engine (``evaluation.serving: true`` in a recipe, or ``compress serve RUN_DIR``):

* **Synchronous batch 1**, end to end on one thread: decode and resize (the model's Preprocessing,
  through :mod:`compressor.data`'s own decode), normalize, infer (the runner the report times,
  ``Target.load``), arg-max; frames per second, latency p50/p99 and the time of each stage.
* **Preprocessing folded into the engine** where the runtime can (OpenVINO's PrePostProcessor: u8
  NHWC of the photo's own size in; resize, mean and scale inside the model; a center crop's box is
  cut on the host, as a view; the u8 frame is in the model's channel order, so ``color: BGR`` feeds
  B, G, R as OpenCV decodes them): the same frames, the share of each frame's time spent outside the
  engine against host preprocessing, and whether both give the same classes.
* **Asynchronous, N requests in flight**, each runtime its own way (:mod:`compressor.serving_runtimes`),
  double-buffered: decode threads fill a bounded queue while the engine runs the frames before, so
  decoding frame i+1 overlaps inference of frame i. Every N asked for (OpenVINO adds the plugin's
  optimal request count) is timed end to end and inference only (the same pool fed with frames
  decoded beforehand); the best N is reported, and end-to-end throughput as a share of inference-only.
* **Dynamic batching**: at the best N, batches of B frames taken from the decode queue, for every B
  asked for; the B with the highest end-to-end throughput whose p99 latency stays within
  ``latency_ms`` (for engines that take a batch of the server's choosing).
* **Memory**: peak RSS of a fresh process per engine to load it and run one request, with N in
  flight (one copy of the weights where the runtime shares it), and N unshared copies for contrast.
* **Referee** (OpenVINO): ``benchmark_app -api async`` on the same IR with the same compile
  properties and request count; our inference-only figure should be within 10 % of its.

Latency of a frame runs from the moment its bytes are taken up for decoding to the moment its class
index is known, so queueing in front of a busy engine counts; throughput counts the frames finished
in a timed window after a warm-up.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .artifact import Preprocessing
from .errors import ConfigError, first_line
from .run_dir import SERVING_FILES

if TYPE_CHECKING:
    from .data import DataBundle
    from .serving_runtimes import Backend, Pool
    from .target_base import Engine

log = logging.getLogger(__name__)

GOAL_E2E_SHARE = 0.9
"""end-to-end throughput as a share of the engine's inference-only throughput (the issue's goal)"""
GOAL_REFEREE = 0.10
"""our inference-only throughput within this share of benchmark_app's"""


@dataclass
class ServingSettings:
    threads: int
    images: int = 64
    in_flight: list[int] = field(default_factory=lambda: [1, 2, 4])
    seconds: float = 2.0
    latency_ms: float = 100.0
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    decoders: int | None = None
    """decode threads; None: as many as requests in flight, at most the cores"""
    memory: bool = True
    referee: bool = True

    @property
    def warm(self) -> float:
        """untimed seconds before each timed window"""
        return min(0.5, max(0.05, self.seconds / 4))

    @property
    def referee_seconds(self) -> int:
        return max(1, round(3 * self.seconds))

    def decoders_for(self, in_flight: int) -> int:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return self.decoders or max(1, min(in_flight, cores))

    @classmethod
    def from_evaluation(cls, cfg: Any, threads: int, **overrides: Any) -> ServingSettings:
        """The settings an EvaluationConfig's serving_* fields give, with ``overrides`` (None: not given)."""
        values = {"images": cfg.serving_images, "in_flight": list(cfg.serving_in_flight),
                  "seconds": cfg.serving_seconds, "latency_ms": cfg.serving_latency_ms,
                  "batches": list(cfg.serving_batches)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(threads=threads, **values)


# ---------------------------------------------------------------------- frames


@dataclass
class Frames:
    """The encoded images served, in order, with their labels."""

    blobs: list[bytes]
    labels: np.ndarray | None
    origin: str
    formats: dict[str, int]
    median_size: tuple[int, int]  # (width, height)

    def describe(self) -> dict[str, Any]:
        return {"count": len(self.blobs), "origin": self.origin, "formats": self.formats,
                "median_width": self.median_size[0], "median_height": self.median_size[1],
                "mean_bytes": int(np.mean([len(b) for b in self.blobs])) if self.blobs else 0}


def frames_from_data(data: DataBundle, count: int) -> Frames:
    """The first ``count`` evaluated images as encoded bytes: an image folder's files as they are (what
    a server receives), an in-memory split (digits, CIFAR-10's binary batches) encoded as JPEG at quality 95."""
    from PIL import Image

    src = data.evaluation_source
    idx = data.evaluation_indices()[:count]
    if src.paths is not None:
        blobs = [src.paths[int(i)].read_bytes() for i in idx]
        origin = f"the files of split {src.name!r}"
    else:
        assert src.arrays is not None
        blobs = []
        for i in idx:
            arr = src.arrays[int(i)]
            arr = arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            blobs.append(buf.getvalue())
        origin = f"split {src.name!r} (in memory), encoded as JPEG at quality 95"
    if not blobs:
        raise ConfigError("serving: the evaluation split has no images to serve")
    formats: Counter[str] = Counter()
    sizes = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            formats[img.format or "unknown"] += 1
            sizes.append(img.size)
    w, h = (int(np.median([s[k] for s in sizes])) for k in (0, 1))
    return Frames(blobs, src.labels[idx] if src.labels is not None else None, origin, dict(formats), (w, h))


# ---------------------------------------------------------------------- decoding


def host_u8(blob: bytes, size: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """uint8 (1, H, W, C) at the model's input size: the bytes decoded by :mod:`compressor.data`'s own
    decode (colour, resize, center crop as the Preprocessing says), as evaluation decodes a file."""
    from .data import ImageSource

    one = ImageSource(name="serving", classes=[], labels=np.zeros(1, np.int64), paths=[io.BytesIO(blob)])  # type: ignore[list-item]
    return one.load_images(np.zeros(1, np.int64), size, prep)


def opencv_u8(blob: bytes, size: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """:func:`host_u8` with the bytes decoded by OpenCV (``cv2.imdecode``, libjpeg-turbo) instead of
    Pillow; the resize and crop are still the model's Preprocessing's (:mod:`compressor.data`)."""
    import cv2

    from .data import ImageSource

    arr = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_GRAYSCALE if prep.color == "L" else cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError("OpenCV cannot decode the image")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    one = ImageSource(name="serving", classes=[], labels=np.zeros(1, np.int64), arrays=arr[None])
    return one.load_images(np.zeros(1, np.int64), size, prep)


def opencv_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cv2") is not None


def host_input(blob: bytes, size: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """float32 (1, C, H, W): :func:`host_u8`, then :func:`compressor.data.preprocess`."""
    from .data import preprocess

    return preprocess(host_u8(blob, size, prep), prep)


def crop_box(width: int, height: int, prep: Preprocessing) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) of a ``width`` x ``height`` photo that the Preprocessing's resize
    and center crop keep (None: the whole photo), so that an engine resizing that box to the input size
    sees what the host's resize-then-crop gives."""
    crop = getattr(prep, "center_crop", None)
    if crop is None:
        return None
    ch, cw = (crop, crop) if isinstance(crop, int) else (crop[0], crop[1])
    resize = getattr(prep, "resize", None)
    if resize is None:
        fh = fw = 1.0
    elif isinstance(resize, int):
        fh = fw = resize / min(width, height)
    else:
        fh, fw = resize[0] / height, resize[1] / width
    bh, bw = min(height, ch / fh), min(width, cw / fw)
    top, left = (height - bh) / 2, (width - bw) / 2
    return (int(round(left)), int(round(top)), int(round(left + bw)), int(round(top + bh)))


def native_u8(blob: bytes, prep: Preprocessing) -> np.ndarray:
    """uint8 (1, h, w, C) at the photo's own size (the center crop's box only, where there is one), in the
    model's channel order (BGR: reversed, as OpenCV decodes): what an engine with the resize folded in takes."""
    from PIL import Image

    from .preprocessing import channel_order, pil_mode

    with Image.open(io.BytesIO(blob)) as img:
        img = img.convert(pil_mode(prep))
        box = crop_box(img.size[0], img.size[1], prep)
        if box is not None:
            img = img.crop(box)
        arr = np.asarray(img)
    return channel_order(arr.reshape(1, arr.shape[0], arr.shape[1], -1), prep)


def classes_of(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return y.reshape(len(y), -1).argmax(axis=1)


# ---------------------------------------------------------------------- timing


def _stats(ms: list[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(ms, dtype=np.float64)
    if not len(arr):
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan"), "frames": 0}
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean()),
            "frames": int(len(arr))}


def measure_sync(blobs: list[bytes], stages: list[tuple[str, Callable[[Any], Any]]], *, seconds: float,
                 warm: float) -> tuple[dict[str, Any], list[int]]:
    """Frames one after another on this thread (pinned to one core, as the report's batch-1 timing),
    each through ``stages`` in order (the last gives the class index). Returns the figures and the class
    of every frame (one untimed pass over all of them first, which also warms up)."""
    from .evaluate import pinned

    clock = time.perf_counter
    names = [n for n, _ in stages]

    def one(blob: bytes) -> tuple[Any, list[float]]:
        value: Any = blob
        spent = []
        for _, fn in stages:
            t = clock()
            value = fn(value)
            spent.append(clock() - t)
        return value, spent

    with pinned(True):
        classes = [int(one(b)[0]) for b in blobs]
        i, until = 0, clock() + warm
        while clock() < until:
            one(blobs[i % len(blobs)])
            i += 1
        samples: list[list[float]] = []
        start = clock()
        while clock() - start < seconds or len(samples) < 3:
            samples.append(one(blobs[i % len(blobs)])[1])
            i += 1
        elapsed = clock() - start
    arr = np.asarray(samples) * 1e3
    totals = arr.sum(axis=1)
    stages_ms = {n: float(arr[:, k].mean()) for k, n in enumerate(names)}
    return {"fps": len(samples) / elapsed, "latency_ms": _stats(totals), "stages_ms": stages_ms,
            "outside_engine_share": float(1.0 - stages_ms["infer"] / totals.mean())}, classes


def stream(blobs: list[bytes], decode: Callable[[bytes], np.ndarray], pool: Pool, *, seconds: float, warm: float,
           decoders: int, depth: int, batch: int = 1) -> dict[str, Any]:
    """End to end, double-buffered: ``decoders`` threads decode frames into a queue of ``depth`` while
    this thread takes them (``batch`` at a time) into ``pool``, which runs up to its N at once; the class
    index is taken as each finishes."""
    clock = time.perf_counter
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    counter = itertools.count()
    failures: list[BaseException] = []
    done: list[tuple[float, float]] = []

    def decode_loop() -> None:
        try:
            while not stop.is_set():
                i = next(counter)
                t0 = clock()
                x = decode(blobs[i % len(blobs)])
                while not stop.is_set():
                    try:
                        ready.put((t0, x), timeout=0.05)
                        break
                    except queue.Full:
                        pass
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            failures.append(exc)
            stop.set()

    def finished(y: np.ndarray, t0s: list[float]) -> None:
        classes_of(y)  # the class index is part of every frame's work
        t1 = clock()
        done.extend((t0, t1) for t0 in t0s)

    workers = [threading.Thread(target=decode_loop, daemon=True, name=f"decode-{k}") for k in range(decoders)]
    for w in workers:
        w.start()
    start = clock()
    t_from = start + warm
    t_to = t_from + seconds
    try:
        while clock() < t_to and not failures:
            items: list[tuple[float, np.ndarray]] = []
            while len(items) < batch and not failures:
                try:
                    items.append(ready.get(timeout=0.05))
                except queue.Empty:
                    pass
            if failures:
                break
            x = items[0][1] if batch == 1 else np.concatenate([it[1] for it in items])
            t0s = [it[0] for it in items]
            pool.start(x, lambda y, t0s=t0s: finished(y, t0s))
        pool.wait()
    finally:
        stop.set()
        while True:  # a decoder blocked on a full queue sees stop within its put timeout
            try:
                ready.get_nowait()
            except queue.Empty:
                break
        for w in workers:
            w.join(timeout=30)
    if failures:
        raise failures[0]
    in_window = [d for d in done if t_from <= d[1] <= t_to]
    timed = [(t1 - t0) * 1e3 for t0, t1 in done if t0 >= t_from and t1 <= t_to] or \
        [(t1 - t0) * 1e3 for t0, t1 in done]
    return {"fps": len(in_window) / seconds, "latency_ms": _stats(timed), "decoders": decoders, "queue": depth,
            "batch": batch}


def inference_only(inputs: list[np.ndarray], pool: Pool, *, seconds: float, warm: float, batch: int = 1) -> float:
    """Frames per second of ``pool`` fed, as fast as it takes them, with inputs decoded beforehand (given to
    each request once where the runtime lets it, as OpenVINO's benchmark_app does; else with each call)."""
    clock = time.perf_counter
    done: list[float] = []

    def finished(y: np.ndarray) -> None:
        done.append(clock())

    bound = pool.bind(inputs)
    start = clock()
    t_from, i = start + warm, 0
    t_to = t_from + seconds
    while clock() < t_to:
        if bound:
            pool.start_bound(finished)
        else:
            pool.start(inputs[i % len(inputs)], finished)
        i += 1
    pool.wait()
    return sum(1 for t in done if t_from <= t <= t_to) * batch / seconds


# ---------------------------------------------------------------------- one engine


def _guarded(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"error": ...}`` where it fails (one part of an engine's figures failing leaves the others)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the section, logged
        log.warning("serving: %s failed: %s: %s", what, type(exc).__name__, first_line(exc))
        return {"error": f"{type(exc).__name__}: {first_line(exc)}"}


def serve_engine(engine: Engine, frames: Frames, prep: Preprocessing, input_shape: list[int] | tuple[int, ...],
                 settings: ServingSettings, say: Callable[[str], None]) -> dict[str, Any]:
    """Every serving figure of one built engine (see the module's docstring)."""
    from .data import preprocess
    from .serving_runtimes import backend_for

    shape = tuple(int(d) for d in input_shape)
    size = (shape[2], shape[3])
    s = settings
    blobs = frames.blobs
    backend = backend_for(engine, threads=s.threads, input_shape=shape)
    row: dict[str, Any] = {"engine": engine.name, "target": engine.target, "precision": engine.precision,
                           "threads": s.threads, "runtime": backend.runtime, "async_mode": backend.async_mode,
                           "weights_shared": backend.weights_shared, "weights_note": backend.shared_note}
    try:
        # synchronous batch 1, host preprocessing (the runner the report times)
        say(f"serving {engine.name}: synchronous, host preprocessing")
        runner = backend.sync_runner()
        runner.prepare(1)
        try:
            sync, host_classes = measure_sync(blobs, [
                ("decode_resize", lambda b: host_u8(b, size, prep)),
                ("normalize", lambda u8: preprocess(u8, prep)),
                ("infer", runner), ("argmax", lambda y: classes_of(y)[0])], seconds=s.seconds, warm=s.warm)
        finally:
            runner.close()
        row["sync"] = {"host": sync}
        if frames.labels is not None:
            row["top1_host"] = 100.0 * float(np.mean(np.asarray(host_classes) == frames.labels))
        if opencv_available():  # the host's decode by OpenCV instead of Pillow (the serving extra)
            say(f"serving {engine.name}: synchronous, host preprocessing, OpenCV decode")
            runner = backend.sync_runner()
            runner.prepare(1)
            try:
                row["sync"]["opencv"], cv_classes = measure_sync(blobs, [
                    ("decode_resize", lambda b: opencv_u8(b, size, prep)), ("normalize", lambda u8: preprocess(u8, prep)),
                    ("infer", runner), ("argmax", lambda y: classes_of(y)[0])], seconds=s.seconds, warm=s.warm)
            finally:
                runner.close()
            row["opencv_agreement"] = 100.0 * float(np.mean(np.asarray(cv_classes) == np.asarray(host_classes)))
        row.update(_folded_sync(backend, frames, size, prep, host_classes, s, say))

        # asynchronous, N in flight, double-buffered
        inputs = [host_input(b, size, prep) for b in blobs]
        sweep = []
        for n in backend.in_flight_options(s.in_flight):
            say(f"serving {engine.name}: {n} request(s) in flight")
            pool = backend.pool(n)
            try:
                only = inference_only(inputs, pool, seconds=s.seconds, warm=s.warm)
                e2e = stream(blobs, lambda b: host_input(b, size, prep), pool, seconds=s.seconds, warm=s.warm,
                             decoders=s.decoders_for(n), depth=n)
            finally:
                pool.close()
            sweep.append({"in_flight": n, **e2e, "inference_only_fps": only})
        best = max(sweep, key=lambda r: r["fps"])
        best_only = max(r["inference_only_fps"] for r in sweep)
        row["async"] = {"sweep": sweep, "best_in_flight": best["in_flight"], "fps": best["fps"],
                        "latency_ms": best["latency_ms"], "inference_only_fps": best_only,
                        "e2e_share_of_inference_only": best["fps"] / best_only if best_only else None,
                        **backend.info()}
        if "opencv" in row["sync"]:
            n = best["in_flight"]
            say(f"serving {engine.name}: {n} in flight, host preprocessing, OpenCV decode")

            def opencv_async(n: int = n) -> dict[str, Any]:
                pool = backend.pool(n)
                try:
                    return stream(blobs, lambda b: preprocess(opencv_u8(b, size, prep), prep), pool, seconds=s.seconds,
                                  warm=s.warm, decoders=s.decoders_for(n), depth=n)
                finally:
                    pool.close()

            row["async"]["opencv"] = _guarded(f"{engine.name} OpenCV decode, asynchronous", opencv_async)
        folded_ok = [w for w, f in (row.get("sync_folded") or {}).items() if "error" not in f]
        if folded_ok:
            row["async"]["folded"] = {}
        for what in folded_ok:
            n = best["in_flight"]
            say(f"serving {engine.name}: {n} in flight, {what} folded into the engine")

            def folded_async(what: str = what, n: int = n) -> dict[str, Any]:
                pool = backend.folded_pool(prep, n, what)
                try:
                    return stream(blobs, folded_decoder(what, size, prep), pool, seconds=s.seconds, warm=s.warm,
                                  decoders=s.decoders_for(n), depth=n)
                finally:
                    pool.close()

            row["async"]["folded"][what] = _guarded(f"{engine.name} {what} folded, asynchronous", folded_async)
        ways = {"host": row["async"]["fps"], "host, OpenCV decode": (row["async"].get("opencv") or {}).get("fps", 0.0),
                **{f"{w} folded": f.get("fps", 0.0) for w, f in (row["async"].get("folded") or {}).items()}}
        row["async"]["e2e_best_with"] = max(ways, key=lambda k: ways[k])
        row["async"]["e2e_best_fps"] = ways[row["async"]["e2e_best_with"]]
        row["async"]["e2e_best_share"] = row["async"]["e2e_best_fps"] / best_only if best_only else None
        row["async"].update(cpu_bound(sync["stages_ms"], best_only, best["fps"], s.threads))
        row["dynamic_batching"] = _guarded(f"{engine.name} dynamic batching",
                                           lambda: _dynamic_batching(backend, blobs, inputs, size, prep, best["in_flight"],
                                                                     s, say, engine.name))
        if s.referee and engine.target == "openvino":
            row["referee"] = _guarded(f"{engine.name} benchmark_app", lambda: _referee(backend, inputs, s, say, engine))
    finally:
        backend.close()
    if s.memory:
        say(f"serving {engine.name}: peak memory (a fresh process)")
        row["memory"] = _guarded(f"{engine.name} memory", lambda: measure_memory(
            engine, threads=s.threads, input_shape=shape, in_flight=max(2, row["async"]["best_in_flight"])))
    return row


FOLDED = {"normalize": "decode and resize on the host; u8 to float, mean and std in the engine",
          "resize": "decode on the host (a center crop's box cut there); resize, mean and std in the engine"}


def folded_decoder(what: str, size: tuple[int, int], prep: Preprocessing) -> Callable[[bytes], np.ndarray]:
    """What the host does to a frame for an engine that took ``what`` in (see :data:`FOLDED`)."""
    if what == "normalize":
        return lambda b: host_u8(b, size, prep)
    return lambda b: native_u8(b, prep)


def cpu_bound(host_stages_ms: dict[str, float], inference_only_fps: float, e2e_fps: float,
              threads: int) -> dict[str, Any]:
    """The end-to-end throughput the machine's cores allow when each frame costs its host preprocessing
    (decode, resize, normalize: one core, from the synchronous figures) plus its share of the engine's
    inference-only throughput on ``threads`` cores; and how much of it double buffering reached."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    host_ms = host_stages_ms["decode_resize"] + host_stages_ms["normalize"]
    engine_core_ms = min(threads, cores) * 1e3 / inference_only_fps if inference_only_fps else float("inf")
    bound = cores * 1e3 / (host_ms + engine_core_ms)
    return {"cores": cores, "host_core_ms": host_ms, "engine_core_ms": engine_core_ms, "cpu_bound_fps": bound,
            "e2e_share_of_cpu_bound": e2e_fps / bound if bound else None}


def _folded_sync(backend: Backend, frames: Frames, size: tuple[int, int], prep: Preprocessing,
                 host_classes: list[int], s: ServingSettings, say: Callable[[str], None]) -> dict[str, Any]:
    """Synchronous batch 1 with each preprocessing the runtime can fold in: figures, and whether its
    classes are the host's on every frame."""
    if not backend.folded:
        return {"folded_refusal": backend.folding_refusal()}
    out: dict[str, Any] = {"sync_folded": {}, "folded_agreement": {}, "folded_differs": {}, "top1_folded": {}}
    for what in backend.folded:
        say(f"serving {backend.engine.name}: synchronous, {what} folded into the engine")

        def run(what: str = what) -> dict[str, Any]:
            folded = backend.folded_sync(prep, what)
            try:
                return measure_sync(frames.blobs, [("decode", folded_decoder(what, size, prep)), ("infer", folded),
                                                   ("argmax", lambda y: classes_of(y)[0])],
                                    seconds=s.seconds, warm=s.warm)
            finally:
                getattr(folded, "close", lambda: None)()

        result = _guarded(f"{backend.engine.name} {what} folded into the engine", run)
        if "error" in result:
            out["sync_folded"][what] = result
            continue
        figures, classes = result
        same = np.asarray(classes) == np.asarray(host_classes)
        out["sync_folded"][what] = figures
        out["folded_agreement"][what] = 100.0 * float(same.mean())
        out["folded_differs"][what] = [int(i) for i in np.flatnonzero(~same)[:20]]
        if frames.labels is not None:
            out["top1_folded"][what] = 100.0 * float(np.mean(np.asarray(classes) == frames.labels))
    return out


def _dynamic_batching(backend: Backend, blobs: list[bytes], inputs: list[np.ndarray], size: tuple[int, int],
                      prep: Preprocessing, in_flight: int, s: ServingSettings, say: Callable[[str], None],
                      name: str) -> dict[str, Any]:
    refusal = backend.batch_refusal()
    if refusal:
        return {"skipped": refusal}
    rows = []
    for b in sorted(set(s.batches)):
        say(f"serving {name}: dynamic batching, batch {b}")
        batches = [np.concatenate([inputs[(k * b + j) % len(inputs)] for j in range(b)])
                   for k in range(max(1, len(inputs) // b))]
        pool = backend.pool(in_flight, batch=b)
        try:
            only = inference_only(batches, pool, seconds=s.seconds, warm=s.warm, batch=b)
            e2e = stream(blobs, lambda x: host_input(x, size, prep), pool, seconds=s.seconds, warm=s.warm,
                         decoders=s.decoders_for(in_flight), depth=in_flight * b, batch=b)
        finally:
            pool.close()
        rows.append({"batch": b, "fps": e2e["fps"], "latency_ms": e2e["latency_ms"], "inference_only_fps": only,
                     "within_limit": bool(e2e["latency_ms"]["p99"] <= s.latency_ms)})
    ok = [r for r in rows if r["within_limit"]]
    out: dict[str, Any] = {"in_flight": in_flight, "latency_limit_ms": s.latency_ms, "sweep": rows}
    base = next((r for r in rows if r["batch"] == 1), None)
    if ok:
        best = max(ok, key=lambda r: r["fps"])
        out.update(best_batch=best["batch"], fps=best["fps"], p99_ms=best["latency_ms"]["p99"],
                   gain_over_batch1=(best["fps"] / base["fps"] - 1.0) if base and base["fps"] else None)
    else:
        out.update(best_batch=None, fps=None, note=f"no batch size kept p99 within {s.latency_ms:g} ms")
    fastest = max(rows, key=lambda r: r["inference_only_fps"])
    out["inference_only_best_batch"] = fastest["batch"]
    out["inference_only_best_fps"] = fastest["inference_only_fps"]
    return out


REFEREE_ROUNDS = 3
"""rounds of (ours, benchmark_app), alternating, for the referee's ratio of medians"""


def _referee(backend: Any, inputs: list[np.ndarray], s: ServingSettings, say: Callable[[str], None],
             engine: Engine) -> dict[str, Any]:
    """Our asynchronous inference-only throughput against ``benchmark_app -api async`` on the same IR and
    requests, in alternating rounds of the same length (one window each would compare two moments of a
    noisy machine, not two ways of running the engine): the ratio of the medians."""
    n = backend.optimal_requests()
    seconds = max(1, round(s.referee_seconds / REFEREE_ROUNDS))
    ours, theirs, info = [], [], {}
    for k in range(REFEREE_ROUNDS):
        say(f"serving {engine.name}: ours, then benchmark_app -api async ({seconds} s each, round {k + 1} "
            f"of {REFEREE_ROUNDS})")
        pool = backend.pool(n)
        try:
            ours.append(inference_only(inputs, pool, seconds=float(seconds), warm=s.warm))
        finally:
            pool.close()
        info = backend.referee(in_flight=n, seconds=seconds)
        if "command" in info:  # the run directory's engine, not this machine's path to it
            info["command"] = info["command"].replace(str(engine.path), f"engines/{engine.name}/{engine.path.name}")
        if "fps" not in info:
            return info
        theirs.append(info.pop("fps"))
    ratio = float(np.median(ours)) / float(np.median(theirs))
    return {**info, "benchmark_app_fps": float(np.median(theirs)), "ours_fps": float(np.median(ours)),
            "rounds": [{"ours_fps": a, "benchmark_app_fps": b} for a, b in zip(ours, theirs)],
            "ratio": ratio, "within": bool(abs(ratio - 1.0) <= GOAL_REFEREE)}


def measure_memory(engine: Engine, *, threads: int, input_shape: tuple[int, ...], in_flight: int,
                   timeout: float = 600) -> dict[str, Any]:
    """Peak RSS (VmHWM) of a fresh Python process that loads the engine and runs it: after importing the
    runtime, after loading it and running one request, with ``in_flight`` requests at once, and with
    ``in_flight`` unshared copies (:mod:`compressor.serving_memory`)."""
    assert engine.builder is not None
    spec = {"target": engine.target, "name": engine.name, "precision": engine.precision,
            "files": [str(p) for p in engine.files], "config": engine.builder.config.model_dump(mode="json"),
            "step": engine.builder.step, "threads": threads, "input_shape": list(input_shape), "in_flight": in_flight}
    proc = subprocess.run([sys.executable, "-m", "compressor.serving_memory"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory process exited {proc.returncode}: {tail[:200]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------- every engine


def serve_engines(engines: list[Engine], frames: Frames, prep: Preprocessing, input_shape: list[int],
                  settings: ServingSettings, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The serving section: settings, frames, machine, one row per built engine, the engines skipped."""
    from .environment import environment

    say = say or (lambda _m: None)
    env = environment(settings.threads)
    section: dict[str, Any] = {
        "settings": {**asdict(settings), "warm_seconds": settings.warm},
        "frames": frames.describe(), "input_shape": list(input_shape),
        "preprocessing": prep.model_dump(mode="json", exclude_none=True),
        "machine": {"cpu": env["cpu"], "isa_flags": env["isa_flags"], "cores": env["cores_available"]},
        "engines": [], "skipped": [],
    }
    started = time.perf_counter()
    for engine in engines:
        if not engine.built:
            section["skipped"].append({"engine": engine.name, "reason": "not built here: "
                                       + str(engine.info.get("not_built", "no engine on this machine"))})
            continue
        try:
            section["engines"].append(serve_engine(engine, frames, prep, input_shape, settings, say))
        except Exception as exc:  # noqa: BLE001 - one engine failing leaves the others' figures
            log.error("serving %s failed: %s", engine.name, first_line(exc))
            section["engines"].append({"engine": engine.name, "target": engine.target, "precision": engine.precision,
                                       "error": f"{type(exc).__name__}: {first_line(exc)}"})
    section["goals"] = goals(section)
    section["seconds"] = time.perf_counter() - started
    return section


def goals(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, per engine: end-to-end throughput within 0.9x of inference-only; our
    asynchronous inference-only throughput within 10 % of benchmark_app's (OpenVINO)."""
    out = []
    for r in section.get("engines", []):
        a = r.get("async") or {}
        if a.get("e2e_best_share") is not None:
            ceiling = (a["cpu_bound_fps"] / a["inference_only_fps"]) if a.get("cpu_bound_fps") and \
                a.get("inference_only_fps") else None
            out.append({"engine": r["engine"], "goal": f"end-to-end >= {GOAL_E2E_SHARE}x inference-only",
                        "value": round(a["e2e_best_share"], 3), "passed": bool(a["e2e_best_share"] >= GOAL_E2E_SHARE),
                        **({"note": f"the cores allow at most {ceiling:.2f}x with host preprocessing (CPU bound)"}
                           if ceiling is not None and ceiling < GOAL_E2E_SHARE else {})})
        if a.get("e2e_share_of_cpu_bound") is not None:
            share = a["e2e_share_of_cpu_bound"]
            out.append({"engine": r["engine"],
                        "goal": f"end-to-end (host preprocessing) >= {GOAL_E2E_SHARE}x what the cores allow (CPU bound)",
                        "value": round(share, 3), "passed": bool(share >= GOAL_E2E_SHARE)})
        ref = r.get("referee") or {}
        if "ratio" in ref:
            out.append({"engine": r["engine"], "goal": f"async inference-only within {GOAL_REFEREE:.0%} of benchmark_app",
                        "value": round(ref["ratio"], 3), "passed": bool(ref["within"])})
    return out


# ---------------------------------------------------------------------- in a run, and on a run directory


def serve_in_run(evaluation: Any, result: Any, data: DataBundle | None, report: dict[str, Any],
                 say: Callable[[str], None] | None = None) -> None:
    """``evaluation.serving``: after a run's measurements, serve every engine it built; adds
    report["serving"] (report.md renders it)."""
    if data is None:
        report["serving"] = {"skipped": "the recipe names no data: no images to serve"}
        return
    settings = ServingSettings.from_evaluation(evaluation, threads=result.threads)
    frames = frames_from_data(data, settings.images)
    source = result.source
    report["serving"] = serve_engines(result.engines, frames, source.preprocessing or Preprocessing(),
                                      list(source.input_spec.shape), settings, say)


def write_serving(section: dict[str, Any], out_dir: Path) -> list[Path]:
    """serving.json and serving.md, both or neither."""
    from .staging import atomic_write, json_text

    paths = [out_dir / name for name in SERVING_FILES]
    texts = [json_text(section), "\n".join(render_markdown(section, heading="#")) + "\n"]
    written: list[Path] = []
    try:
        for path, text in zip(paths, texts):
            atomic_write(path, text, what="serving figures")
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


# ---------------------------------------------------------------------- Markdown


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) else str(v)


def _lat(lat: dict[str, Any] | None) -> str:
    return f"{_f(lat.get('p50'), 2)} / {_f(lat.get('p99'), 2)}" if lat else "-"


def render_markdown(section: dict[str, Any] | None, *, heading: str = "##") -> list[str]:
    """The serving tables (report.md's section, or serving.md with ``heading='#'``)."""
    if not section:
        return []
    lines = ["", f"{heading} Serving: from image bytes to class index", ""]
    if "engines" not in section:
        return [*lines, f"Not measured: {section.get('skipped')}."]
    s, fr, m = section["settings"], section["frames"], section["machine"]
    sub = heading + "#"
    rows = section["engines"]
    served = [r for r in rows if "error" not in r]
    lines += ["| engine | sync b1 fps | sync p50 / p99 ms | best N | async e2e fps | async p50 / p99 ms | "
              "inference-only fps | best e2e fps (how) | e2e / inference-only | CPU bound fps | "
              f"best batch, p99 <= {_f(s['latency_ms'], 0)} ms | batched e2e fps | peak RSS MB: 1 request / N |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {r['error']} |" + " |" * 11)
            continue
        sync, a = r["sync"]["host"], r["async"]
        dyn = r.get("dynamic_batching") or {}
        batch = ("n/a" if "skipped" in dyn else "failed" if "error" in dyn else
                 "none" if dyn.get("best_batch") is None else dyn["best_batch"])
        mem = r.get("memory") or {}
        mem_cell = (f"{_f(mem.get('load_run_mb'), 0)} / {_f(mem.get('in_flight_mb'), 0)} (N={mem.get('in_flight')})"
                    if "load_run_mb" in mem else ("failed" if "error" in mem else "-"))
        lines.append(
            f"| {r['engine']} | {_f(sync['fps'])} | {_lat(sync['latency_ms'])} | {a['best_in_flight']} | {_f(a['fps'])} | "
            f"{_lat(a['latency_ms'])} | {_f(a['inference_only_fps'])} | {_f(a.get('e2e_best_fps'))} "
            f"({a.get('e2e_best_with', 'host')}) | {_f(a.get('e2e_best_share'), 2)} | {_f(a.get('cpu_bound_fps'))} | "
            f"{batch} | {_f(dyn.get('fps'))} | {mem_cell} |")
    lines += ["", f"Frames: {fr['count']} images ({', '.join(f'{k} {v}' for k, v in fr['formats'].items())}, median "
              f"{fr['median_width']}x{fr['median_height']}, {fr['mean_bytes']:,} bytes) from {fr['origin']}, "
              f"served cyclically; input {section['input_shape']}; {s['threads']} threads per engine; "
              f"machine {m['cpu']} ({', '.join(m['isa_flags']) or '-'}, {m['cores']} cores). Every figure is timed "
              f"for {_f(s['seconds'], 1)} s after {_f(s['warm_seconds'], 2)} s of warm-up. Latency runs from taking "
              "a frame's bytes up for decoding to knowing its class (queueing included). `sync`: one frame at a "
              "time on one thread (decode and resize by the model's preprocessing, normalize, infer, arg-max). "
              "`async`: N requests in flight, decoding threads filling a bounded queue while the engine runs "
              "(double buffering); best N by end-to-end fps. `inference-only`: the same requests fed with frames "
              "decoded beforehand (OpenVINO: given to each request once, as benchmark_app feeds its requests). "
              "`best e2e`: the best end-to-end fps with host preprocessing or with a step "
              "folded into the engine. `CPU bound`: what the cores allow when each frame costs its host "
              "preprocessing (one core) plus its share of the engine's inference-only throughput."]
    goals_ = section.get("goals") or []
    if goals_:
        lines += ["", f"{sub} Goals", "", "| engine | goal | value | verdict |", "|---|---|---|---|"]
        for g in goals_:
            note = f" ({g['note']})" if g.get("note") else ""
            lines.append(f"| {g['engine']} | {g['goal']} | {g['value']}{note} | {'pass' if g['passed'] else '**FAIL**'} |")
    lines += ["", f"{sub} Requests in flight", "",
              "| engine | how | N | decode threads | e2e fps | e2e p50 / p99 ms | inference-only fps |",
              "|---|---|---|---|---|---|---|"]
    for r in served:
        a = r["async"]
        for k, w in enumerate(a["sweep"]):
            best = " (best)" if w["in_flight"] == a["best_in_flight"] else ""
            lines.append(f"| {r['engine'] if k == 0 else ''} | {r['async_mode'] if k == 0 else ''} | "
                         f"{w['in_flight']}{best} | {w['decoders']} | {_f(w['fps'])} | {_lat(w['latency_ms'])} | "
                         f"{_f(w['inference_only_fps'])} |")
    notes = []
    for r in served:
        a = r["async"]
        if a.get("optimal_infer_requests") is not None:
            notes.append(f"{r['engine']}: OPTIMAL_NUMBER_OF_INFER_REQUESTS {a['optimal_infer_requests']}, "
                         f"{a.get('streams')} stream(s)")
        notes.append(f"{r['engine']}: host preprocessing {_f(a.get('host_core_ms'), 2)} core-ms a frame, the engine "
                     f"{_f(a.get('engine_core_ms'), 2)} core-ms: the {a.get('cores')} cores allow "
                     f"{_f(a.get('cpu_bound_fps'))} fps end to end; double buffering reached "
                     f"{_f(100 * (a.get('e2e_share_of_cpu_bound') or 0), 0)} % of it")
    lines += ["", *(f"- {n}" for n in notes)]
    lines += ["", f"{sub} Preprocessing on the host or in the engine", "",
              "| engine | preprocessing | stages ms | sync fps | outside the engine | same class as host | "
              "top-1 % | async e2e fps |", "|---|---|---|---|---|---|---|---|"]
    for r in served:
        h = r["sync"]["host"]
        lines.append(f"| {r['engine']} | host | " + " / ".join(f"{k} {_f(v, 3)}" for k, v in h["stages_ms"].items())
                     + f" | {_f(h['fps'])} | {h['outside_engine_share']:.0%} | - | {_f(r.get('top1_host'))} | "
                     f"{_f(r['async']['fps'])} (N={r['async']['best_in_flight']}) |")
        cv = r["sync"].get("opencv")
        if cv:
            lines.append(f"| | host, OpenCV decode | " + " / ".join(f"{k} {_f(v, 3)}" for k, v in cv["stages_ms"].items())
                         + f" | {_f(cv['fps'])} | {cv['outside_engine_share']:.0%} | {_f(r.get('opencv_agreement'))} % "
                         f"| - | {_f((r['async'].get('opencv') or {}).get('fps'))} |")
        if r.get("folded_refusal"):
            lines.append(f"| | folded | {r['folded_refusal']} | | | | | |")
        for what, f in (r.get("sync_folded") or {}).items():
            if "error" in f:
                lines.append(f"| | {what} folded | failed: {f['error']} | | | | | |")
                continue
            fa = ((r["async"].get("folded") or {}).get(what)) or {}
            lines.append(f"| | {what} folded: {FOLDED[what]} | "
                         + " / ".join(f"{k} {_f(v, 3)}" for k, v in f["stages_ms"].items())
                         + f" | {_f(f['fps'])} | {f['outside_engine_share']:.0%} | "
                         f"{_f(r['folded_agreement'].get(what))} % | {_f(r['top1_folded'].get(what))} | "
                         f"{_f(fa.get('fps'))} |")
    lines += ["", f"{sub} Dynamic batching", "",
              "| engine | batch | N | e2e fps | e2e p50 / p99 ms | within limit | inference-only fps |",
              "|---|---|---|---|---|---|---|"]
    for r in served:
        dyn = r.get("dynamic_batching") or {}
        if "sweep" not in dyn:
            lines.append(f"| {r['engine']} | n/a: {dyn.get('skipped') or dyn.get('error')} | | | | | |")
            continue
        for k, b in enumerate(dyn["sweep"]):
            best = " (best)" if b["batch"] == dyn.get("best_batch") else ""
            lines.append(f"| {r['engine'] if k == 0 else ''} | {b['batch']}{best} | {dyn['in_flight']} | {_f(b['fps'])} "
                         f"| {_lat(b['latency_ms'])} | {'yes' if b['within_limit'] else 'no'} | "
                         f"{_f(b['inference_only_fps'])} |")
    lines += ["", f"{sub} Memory (peak RSS of a fresh process per engine)", "",
              "| engine | after import MB | load + 1 request MB | N in flight MB | N unshared copies MB | weights |",
              "|---|---|---|---|---|---|"]
    for r in served:
        mem = r.get("memory")
        if not mem:
            continue
        if "error" in mem:
            lines.append(f"| {r['engine']} | failed: {mem['error']} | | | | |")
            continue
        lines.append(f"| {r['engine']} | {_f(mem['import_mb'], 0)} | {_f(mem['load_run_mb'], 0)} | "
                     f"{_f(mem['in_flight_mb'], 0)} (N={mem['in_flight']}) | {_f(mem.get('unshared_mb'), 0)} | "
                     f"{r['weights_note']} |")
    refs = [r for r in served if r.get("referee")]
    if refs:
        lines += ["", f"{sub} Referee: OpenVINO benchmark_app", "",
                  "| engine | benchmark_app fps | ours fps (inference-only, same requests) | ours / benchmark_app | "
                  "rounds (ours / theirs fps) | command |", "|---|---|---|---|---|---|"]
        for r in refs:
            ref = r["referee"]
            if "error" in ref:
                lines.append(f"| {r['engine']} | failed: {ref['error']} | | | | |")
                continue
            rounds = ", ".join(f"{_f(x['ours_fps'], 0)} / {_f(x['benchmark_app_fps'], 0)}" for x in ref.get("rounds", []))
            lines.append(f"| {r['engine']} | {_f(ref['benchmark_app_fps'])} | {_f(ref['ours_fps'])} | "
                         f"{_f(ref['ratio'], 3)} | {rounds or '-'} | `{ref['command']}` |")
    for sk in section.get("skipped") or []:
        lines.append(f"- **{sk['engine']}**: not served: {sk['reason']}")
    return lines
