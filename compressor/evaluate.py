"""Measurements: accuracy (top-1, top-5, agreement with the source model), batch-1 latency
percentiles, throughput at a larger batch, and file size. Every runtime is measured with the same
thread count, recorded in the result."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .artifact import eval_mode
from .fidelity.metrics import sqnr_from_sums
from .machine_load import LoadMonitor
from .target_base import Runner

log = logging.getLogger(__name__)


class ExplainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: int = Field(default=64, ge=1, description="held-out images (never the test split)")
    threshold_db: float = Field(default=15.0, description="a layer whose SQNR or channel SQNR is below this is flagged")
    sensitivity: bool = Field(default=True, description="rank layers by the output SQNR won back without their quantizer")
    disagreement_db: float = Field(default=10.0, gt=0, description="same layer, same precision, two engines this far apart")
    drift_outside: float = Field(default=0.01, ge=0, le=1,
                                 description="warn when this share of a layer's activations falls outside its calibrated range")
    drift_range_used: float = Field(default=0.25, ge=0, le=1,
                                    description="warn when the activations use less than this share of the calibrated range")
    batch_size: int = Field(default=16, ge=1)


class EvaluationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threads: int | None = Field(default=None, ge=1, description="threads for every runtime; default: all cores")
    batch_size: int = Field(default=100, ge=1, description="batch size for the accuracy pass")
    warmup: int = Field(default=20, ge=0, description="batch-1 runs before timing")
    latency_runs: int = Field(default=300, ge=10, description="timed batch-1 runs (at least)")
    latency_min_seconds: float = Field(default=2.0, ge=0, description="keep timing batch-1 runs at least this long")
    latency_rounds: int = Field(default=20, ge=1,
                                description="rounds of batch-1 timing: each visits every engine once (an order "
                                            "shuffled every other round, mirrored in the next) and times a warm "
                                            "block of consecutive calls")
    latency_warm_ms: float = Field(default=20.0, ge=0,
                                   description="untimed calls before each timed block, for at least this long: the "
                                               "engine timed before goes quiet, this one's cores and caches warm up")
    latency_seed: int = Field(default=0, description="seed of the order the engines are visited in each round")
    latency_pin: bool = Field(
        default=True,
        description="pin the calling thread to one core and the runtimes' worker threads to the others while "
                    "timing, as a serving thread is: left free, the scheduler puts a worker now beside, now on top "
                    "of the calling thread, and a 2-thread engine flips between two speeds from block to block")
    paced_rate_hz: float | None = Field(
        default=30.0, gt=0, le=1000,
        description="also time batch-1 requests arriving at this rate, the cores idle between them (a camera: 30); "
                    "null: no paced figure")
    paced_runs: int = Field(default=30, ge=3, description="paced requests per engine (at most latency_runs)")
    latency_figure: Literal["loop", "paced"] = Field(
        default="loop", description="the figure speedups, acceptance's latency limits and tune judge: back-to-back "
                                    "calls (loop) or requests at paced_rate_hz (paced)")
    throughput_batch: int = Field(default=64, ge=1)
    throughput_seconds: float = Field(default=3.0, gt=0)
    stages: bool = Field(default=False, description="also measure every intermediate torch model (eager)")
    explain: bool | ExplainConfig = Field(
        default=False, description="where accuracy is lost: per layer, per pass, sensitivity (explain.json/.md/.png)")
    serving: bool = Field(
        default=False, description="after the rows, serve every engine from image bytes to class index (synchronous, "
                                   "N requests in flight, preprocessing folded in, dynamic batching, memory, "
                                   "benchmark_app): the report's serving section (compressor/serving.py)")
    serving_images: int = Field(default=64, ge=1, le=10_000, description="serving: evaluation images served, cyclically")
    serving_in_flight: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=lambda: [1, 2, 4], min_length=1,
        description="serving: requests in flight to try (OpenVINO adds its optimal count); the best is reported")
    serving_seconds: float = Field(default=2.0, gt=0, le=600, description="serving: timed seconds per figure")
    serving_latency_ms: float = Field(default=100.0, gt=0,
                                      description="serving: dynamic batching takes the batch size with the highest "
                                                  "throughput whose p99 latency stays within this")
    serving_batches: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16], min_length=1, description="serving: batch sizes dynamic batching tries")

    @model_validator(mode="after")
    def _paced_figure_needs_a_rate(self) -> EvaluationConfig:
        if self.latency_figure == "paced" and self.paced_rate_hz is None:
            raise ValueError("latency_figure paced needs paced_rate_hz (requests per second), not null")
        return self

    def explain_config(self) -> ExplainConfig | None:
        if self.explain is False:
            return None
        return ExplainConfig() if self.explain is True else self.explain


@dataclass
class Measurement:
    """One row of the report."""

    name: str
    target: str
    precision: str
    top1: float
    top5: float
    agreement: float
    latency_ms: dict[str, float]
    throughput_ips: float
    size_bytes: int
    threads: int
    throughput_batch: int
    engine: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    latency_samples_ms: list[float] = field(default_factory=list, repr=False)
    paced_latency_ms: dict[str, float] | None = None  # requests at EvaluationConfig.paced_rate_hz
    predictions: np.ndarray | None = field(default=None, repr=False)
    output_sqnr_db: float | None = None  # logits against the source row's; None for the source itself or exact
    logits: np.ndarray | None = field(default=None, repr=False)
    timed_on: dict[str, Any] | None = None
    """the node and device the row was timed on (measure.timed_here; a cluster's session actor)"""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "precision": self.precision,
            "top1": self.top1,
            "top5": self.top5,
            "agreement": self.agreement,
            "output_sqnr_db": self.output_sqnr_db,
            "latency_ms": self.latency_ms,
            "paced_latency_ms": self.paced_latency_ms,
            "throughput_ips": self.throughput_ips,
            "throughput_batch": self.throughput_batch,
            "size_bytes": self.size_bytes,
            "threads": self.threads,
            "engine": self.engine,
            "runtime": self.runtime,
            **({"timed_on": self.timed_on} if self.timed_on else {}),
        }


class TorchRunner(Runner):
    """PyTorch eager (or FX) inference on the CPU."""

    def __init__(self, module: Any, *, threads: int, name: str = "torch", fixed_batch: int | None = None) -> None:
        import torch

        self.name = name
        self.fixed_batch = fixed_batch
        self.threads = threads
        torch.set_num_threads(threads)
        self.module = eval_mode(module)
        self._torch = torch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        step = self.fixed_batch or len(x)
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), step):
                out = self.module(torch.from_numpy(x[i : i + step]))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                outs.append(out.float().numpy())
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def runtime_info(self) -> dict[str, Any]:
        torch = self._torch
        return {
            "runtime": f"pytorch {torch.__version__}",
            "mode": "eager" if not hasattr(self.module, "graph") else "graph",
            "fixed_batch": self.fixed_batch,
            "threads": torch.get_num_threads(),
            "isa": torch.backends.cpu.get_cpu_capability(),
        }


def accuracy(
    runner: Runner, x: Any, labels: np.ndarray, batch_size: int, reference: np.ndarray | None
) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    """top-1 %, top-5 %, agreement % with ``reference`` predictions, the top-1 predictions and the logits.
    ``x``: the model's input, an array or an :class:`compressor.streaming.ImageSet` read batch by batch."""
    from .streaming import consecutive

    runner.prepare(batch_size)
    tally = _Tally(len(labels))
    outputs = []
    start = 0
    for batch in consecutive(x, batch_size):
        logits = np.asarray(runner(batch), dtype=np.float32)
        outputs.append(logits)
        tally.add(start, logits, labels)
        start += len(logits)
    top1, top5 = tally.top1_top5(labels)
    preds = tally.preds
    agreement = 100.0 * float((preds == reference).mean()) if reference is not None else 100.0
    return top1, top5, agreement, preds, np.concatenate(outputs) if outputs else np.empty((0, 0), np.float32)


class _Tally:
    """Top-1 predictions and top-5 hits of one row, batch by batch."""

    def __init__(self, n: int) -> None:
        self.preds = np.empty(n, dtype=np.int64)
        self.top5_hits = 0
        self.signal = 0.0  # the SQNR's sums against the reference logits
        self.noise = 0.0

    def add(self, start: int, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1)[:, :k]
        self.preds[start : start + len(logits)] = top[:, 0]
        self.top5_hits += int((top == labels[start : start + len(logits), None]).any(axis=1).sum())
        return top[:, 0]

    def against(self, reference: np.ndarray, logits: np.ndarray) -> None:
        ref = reference.astype(np.float64)
        self.signal += float((ref ** 2).sum())
        self.noise += float(((ref - logits.astype(np.float64)) ** 2).sum())

    def sqnr_db(self) -> float | None:
        """As :func:`sqnr_db` of the whole logits, from the sums."""
        return sqnr_from_sums(self.signal, self.noise)

    def top1_top5(self, labels: np.ndarray) -> tuple[float, float]:
        n = max(len(labels), 1)
        return 100.0 * float((self.preds == labels).sum()) / n, 100.0 * self.top5_hits / n


def latency_stats(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "runs": len(samples),
    }


def _threads_of_this_process() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: only the calling thread is pinned
        return []


@contextlib.contextmanager
def pinned(enabled: bool = True, others: bool = True) -> Iterator[int | None]:
    """Pin the calling thread to the first core it may run on and, with ``others``, every other thread
    of this process (the runtimes' workers, made before: ONNX Runtime's pool, OpenVINO's TBB arena,
    XNNPACK's pthreadpool) to the remaining cores; give every thread back its cores after. Linux's
    affinity is per thread, and the scheduler left to itself put an engine's worker now beside, now on
    top of the calling thread, so two copies of one ONNX Runtime file read up to 16 % apart in one
    session with only the caller pinned. Yields the caller's core, or None where there is nothing to
    pin (one core, no ``sched_setaffinity``, or ``enabled`` false). A thread that ends meanwhile, or
    refuses, is skipped."""
    getaff, setaff = getattr(os, "sched_getaffinity", None), getattr(os, "sched_setaffinity", None)
    cores = getaff(0) if enabled and getaff and setaff else set()
    if len(cores) < 2:
        yield None
        return
    core = min(cores)
    try:
        setaff(0, {core})
    except OSError:  # a container may refuse it: time unpinned
        yield None
        return
    moved: dict[int, set[int]] = {}
    if others:
        me = threading.get_native_id()
        for tid in _threads_of_this_process():
            if tid == me:
                continue
            try:
                before = getaff(tid)
                rest = before - {core}
                if rest and rest != before:
                    setaff(tid, rest)
                    moved[tid] = before
            except OSError:
                continue
    try:
        yield core
    finally:
        setaff(0, cores)
        for tid, before in moved.items():
            try:
                setaff(tid, before)
            except OSError:  # the thread has ended
                pass


def latency(runners: list[Runner], sample: np.ndarray, cfg: EvaluationConfig,
            progress: Callable[[str], None] | None = None) -> list[list[float]]:
    """Batch-1 latency samples (ms) of every runner, timed in warm blocks of consecutive calls.

    Each runner gets ``warmup`` runs; then ``latency_rounds`` rounds each visit every runner once,
    in an order shuffled anew every other round (seeded by ``latency_seed``) and mirrored in the
    round after (so a linear drift of the machine falls on every runner alike). At each visit the runner
    first runs untimed for ``latency_warm_ms`` (and at least 3 calls): the runner timed before it
    has its thread pool go quiet (ONNX Runtime's spinning workers, OpenVINO's TBB and XNNPACK's
    pthreadpool spin for a while after a call), and this runner's cores and caches are warm. Then a
    timed block of its share of ``latency_runs`` calls and ``latency_min_seconds``. A figure then
    depends neither on which engines share the session nor on where its row sits in the round, and
    a slow spell of a noisy machine falls on every runner alike.
    """
    import random

    one = np.ascontiguousarray(sample[:1])
    for r in runners:
        r.prepare(1)
        for _ in range(cfg.warmup):
            r(one)
    rounds = cfg.latency_rounds
    runs = -(-cfg.latency_runs // rounds)
    seconds = cfg.latency_min_seconds / rounds
    warm = cfg.latency_warm_ms / 1e3
    samples: list[list[float]] = [[] for _ in runners]
    clock = time.perf_counter
    shuffle = random.Random(cfg.latency_seed).shuffle
    order = list(range(len(runners)))
    with pinned(cfg.latency_pin):
        for rnd in range(rounds):
            if progress:
                progress(f"batch-1 latency, round {rnd + 1}/{rounds}")
            if rnd % 2 == 0:
                shuffle(order)
            else:  # the mirror of the round before: a machine drifting while timing slows every engine alike
                order.reverse()
            for i in order:
                r, got = runners[i], samples[i]
                calls, start = 0, clock()
                while calls < 3 or clock() - start < warm:
                    r(one)
                    calls += 1
                n0, start = len(got), clock()
                while len(got) - n0 < runs or clock() - start < seconds:
                    t0 = clock()
                    r(one)
                    got.append((clock() - t0) * 1e3)
                    if len(got) - n0 >= 20 * runs:
                        break
    return samples


def paced_latency(runners: list[Runner], sample: np.ndarray, cfg: EvaluationConfig,
                  progress: Callable[[str], None] | None = None) -> list[list[float]]:
    """Batch-1 latency samples (ms) when requests arrive at ``paced_rate_hz`` and the cores idle in
    between, as a deployed engine fed by a camera sees them: each call starts one period after the
    previous one started (at once where a call outlasts the period). Blocks of calls per runner, in
    rounds shuffled as :func:`latency`'s; each block starts one period after the previous runner's
    last call, so no pool of another runtime is still spinning. ``runners`` are prepared for batch 1."""
    import random

    assert cfg.paced_rate_hz is not None
    one = np.ascontiguousarray(sample[:1])
    period = 1.0 / cfg.paced_rate_hz
    total = min(cfg.paced_runs, cfg.latency_runs)
    rounds = min(cfg.latency_rounds, total)
    per_block = -(-total // rounds)
    samples: list[list[float]] = [[] for _ in runners]
    clock = time.perf_counter
    shuffle = random.Random(cfg.latency_seed + 1).shuffle
    order = list(range(len(runners)))
    due = clock() + period
    with pinned(cfg.latency_pin):
        for rnd in range(rounds):
            if progress:
                progress(f"paced batch-1 latency ({cfg.paced_rate_hz:g}/s), round {rnd + 1}/{rounds}")
            shuffle(order)
            for i in order:
                r, got = runners[i], samples[i]
                for _ in range(min(per_block, total - len(got))):
                    wait = due - clock()
                    if wait > 0:
                        time.sleep(wait)
                    t0 = clock()
                    r(one)
                    got.append((clock() - t0) * 1e3)
                    due = max(t0 + period, clock())
    return samples


def paced_stats(samples: list[float], rate_hz: float) -> dict[str, float]:
    """latency_stats of paced samples, with the rate and whether it was kept up (p90 within a period)."""
    stats = latency_stats(samples)
    return {**stats, "rate_hz": rate_hz, "sustained": bool(stats["p90"] <= 1e3 / rate_hz)}


def timing_method(cfg: EvaluationConfig) -> dict[str, Any]:
    """How batch-1 latency is timed under ``cfg`` (report.json ``timing``)."""
    return {
        "figure": cfg.latency_figure,
        "loop": f"warm blocks of back-to-back calls, {cfg.latency_rounds} rounds, every engine once per round in "
                f"an order shuffled every other round and mirrored in the next (seed {cfg.latency_seed}), "
                f"{cfg.latency_warm_ms:g} ms of untimed calls before each block"
                + (", the calling thread pinned to one core and the runtimes' workers to the others" if cfg.latency_pin else ""),
        "paced_rate_hz": cfg.paced_rate_hz,
        "paced_runs": None if cfg.paced_rate_hz is None else min(cfg.paced_runs, cfg.latency_runs),
    }


def figure_ms(row: dict[str, Any], which: str = "loop") -> float:
    """A report row's batch-1 p50 (ms) by ``evaluation.latency_figure``: back-to-back calls or paced
    requests (the loop figure where the row has no paced one)."""
    paced = row.get("paced_latency_ms")
    return float(paced["p50"]) if which == "paced" and paced else float(row["latency_ms"]["p50"])


def throughput(runner: Runner, x: np.ndarray, cfg: EvaluationConfig) -> float:
    """Images per second at ``throughput_batch``, after one warm-up batch."""
    batch = cfg.throughput_batch
    reps = int(np.ceil(batch / len(x)))
    data = np.ascontiguousarray(np.concatenate([x] * reps)[:batch]) if reps > 1 else np.ascontiguousarray(x[:batch])
    runner.prepare(batch)
    runner(data)
    clock = time.perf_counter
    done, start = 0, clock()
    while True:
        runner(data)
        done += batch
        elapsed = clock() - start
        if elapsed >= cfg.throughput_seconds and done >= 2 * batch:
            return done / elapsed


@dataclass
class ResultRow:
    """Something to measure: a runner and what its row should say."""

    name: str
    target: str
    precision: str
    runner: Runner
    size_bytes: int
    engine: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)


def measure_all(
    rows: list[ResultRow],
    *,
    x: Any,
    labels: np.ndarray,
    cfg: EvaluationConfig,
    threads: int,
    progress: Callable[[str], None] | None = None,
    on_error: Callable[[ResultRow, Exception], None] | None = None,
    load: LoadMonitor | None = None,
) -> list[Measurement]:
    """Accuracy of every row (agreement against the first one's predictions), then batch-1
    latency in shuffled warm blocks across all of them (:func:`latency`), then the paced figure
    (:func:`paced_latency`, where ``paced_rate_hz`` is set), then throughput. Closes every runner. ``load``
    records how busy the machine was just before and during the latency rounds (machine_load.py).

    ``x``: the model's input, an array or an :class:`compressor.streaming.ImageSet`. The accuracy pass
    reads it once, batch by batch, and runs every row on each batch: only the predictions, the SQNR's
    sums and the first ``throughput_batch`` images (for latency and throughput) are kept, whatever
    the number of images.

    A row whose runner fails on the accuracy pass is dropped and handed to ``on_error`` (the
    others are still measured); without ``on_error`` the error propagates."""
    from .streaming import consecutive

    say = progress or (lambda _msg: None)
    results: list[Measurement] = []
    kept: list[ResultRow] = []
    n = len(labels)
    try:
        tallies = [_Tally(n) for _ in rows]
        alive = list(range(len(rows)))
        for s in rows:
            s.runner.prepare(cfg.batch_size)
        say(f"accuracy of {', '.join(s.name for s in rows)} on {n} images")
        sample_parts: list[np.ndarray] = []
        sampled = 0
        started, waited, start = time.perf_counter(), 0.0, 0
        batches = consecutive(x, cfg.batch_size)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t0
            if batch is None:
                break
            if sampled < cfg.throughput_batch:
                sample_parts.append(np.array(batch[: cfg.throughput_batch - sampled]))
                sampled += len(sample_parts[-1])
            reference = None
            for i in list(alive):
                s = rows[i]
                try:
                    logits = np.asarray(s.runner(batch), dtype=np.float32)
                except Exception as exc:
                    if on_error is None or i == alive[0]:
                        raise
                    on_error(s, exc)
                    alive.remove(i)
                    continue
                tallies[i].add(start, logits, labels)
                if reference is None:
                    reference = logits
                else:
                    tallies[i].against(reference, logits)
            start += len(batch)
        seconds = time.perf_counter() - started
        if n:
            log.info("accuracy pass: %d images, %d rows, %.1f s; %.1f s (%.0f %%) waiting for images", n, len(alive),
                     seconds, waited, 100.0 * waited / max(seconds, 1e-9))
        sample = np.concatenate(sample_parts) if sample_parts else np.zeros((0,), np.float32)
        reference_preds = tallies[alive[0]].preds if alive else None
        for i in alive:
            s, t = rows[i], tallies[i]
            top1, top5 = t.top1_top5(labels)
            first = not results
            kept.append(s)
            results.append(Measurement(
                name=s.name, target=s.target, precision=s.precision, top1=top1, top5=top5,
                agreement=100.0 if first else 100.0 * float((t.preds == reference_preds).mean()),
                latency_ms={}, throughput_ips=0.0, size_bytes=s.size_bytes, threads=threads,
                throughput_batch=cfg.throughput_batch, engine=s.engine, predictions=t.preds,
                output_sqnr_db=None if first else t.sqnr_db(),
            ))
        if load is not None:
            load.before()
        timed = latency([s.runner for s in kept], sample, cfg, say)
        if load is not None:
            load.during()
        for m, samples in zip(results, timed):
            m.latency_ms, m.latency_samples_ms = latency_stats(samples), samples
        if cfg.paced_rate_hz is not None:
            for m, samples in zip(results, paced_latency([s.runner for s in kept], sample, cfg, say)):
                m.paced_latency_ms = paced_stats(samples, cfg.paced_rate_hz)
        for m, s in zip(results, kept):
            say(f"{s.name}: throughput at batch {cfg.throughput_batch}")
            m.throughput_ips = throughput(s.runner, sample, cfg)
            m.runtime = {**s.runtime, **s.runner.runtime_info()}
            log.info("%s: top1 %.2f%% p50 %.3f ms %.1f img/s", m.name, m.top1, m.latency_ms["p50"], m.throughput_ips)
    finally:
        for s in rows:
            s.runner.close()
    return results
