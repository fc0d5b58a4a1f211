"""The measurement session of a run: the source model, the stages (where asked), the baselines and
every engine as rows of one session (top-1, agreement, latency timed in rounds interleaved over all
of them, throughput, size), with the machine's load recorded while timing."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from .artifact import Form, ModelArtifact, state_dict_bytes
from .data import DataBundle
from .errors import CompressorError
from .evaluate import EvaluationConfig, ResultRow, TorchRunner, measure_all, timing_method
from .hooks import HookList
from .machine_load import LoadMonitor
from .records import RunResult, TargetFailure
from .target_base import Target
from .targets.onnxruntime import OrtRunner

log = logging.getLogger(__name__)


def timed_here(device: str) -> dict[str, Any]:
    """Where a row is timed: this machine (its host name and CPU) and the device the run names."""
    import socket

    from .environment import cpu_model

    return {"node": socket.gethostname(), "device": device, "cpu": cpu_model()}


def session_rows(result: RunResult, cfg: EvaluationConfig, threads: int,
                 source_name: str = "source") -> tuple[list[ResultRow], dict[str, Target]]:
    """The rows of a session, each with a fresh runner: the source, the stages (``cfg.stages``) and every
    engine of ``result`` (an engine that cannot load is a failure of the run, not a row). Returns the rows
    and the target of each engine row."""
    source = result.source
    rows = [ResultRow(
        name=source_name,
        target="torch" if source.form is not Form.ONNX else "onnxruntime",
        precision=source.precision,
        runner=source_runner(source, threads),
        size_bytes=int(source.meta.get("source_size_bytes", 0)),
        engine=source.meta.get("source_file"),
    )]
    if cfg.stages:
        for record, art in zip(result.records, result.artifacts[1:]):
            if art.form is Form.TORCH:
                rows.append(ResultRow(
                    name=f"stage{record.index}-{record.name}", target="torch", precision=art.precision,
                    runner=TorchRunner(art.torch_module(), threads=threads, fixed_batch=art.meta.get("fixed_batch")),
                    size_bytes=len(state_dict_bytes(art.model)),
                ))
    targets: dict[str, Target] = {}
    for engine in result.engines:
        target = engine.builder
        name, runtime = engine.name, dict(engine.info.get("runtime_build", {}))
        try:
            if engine.built:
                runner = target.load(engine, threads=threads)
            else:  # e.g. TensorRT without a GPU: the same graph on the closest runtime here
                proxy, runner = target.load_proxy(engine, threads=threads)
                name = f"{engine.name}-proxy-{proxy}"
                runtime = {"proxy": f"{proxy} runs the graph {target.name} would build; "
                                    f"{engine.info['not_built']}", **runtime}
        except Exception as exc:
            runtime_failure(result, target, engine.name, exc)
            continue
        targets[name] = target
        rows.append(ResultRow(name=name, target=engine.target, precision=engine.precision, runner=runner,
                                size_bytes=engine.size_bytes, engine=str(engine.path), runtime=runtime))
    return rows, targets


def measure_run(data: DataBundle, cfg: EvaluationConfig, threads: int, result: RunResult, *, hooks: HookList,
                screen: Callable[[list[ResultRow], RunResult], list[ResultRow]] | None = None,
                timed_on: dict[str, Any] | None = None, source_name: str = "source") -> None:
    """Every row in one measurement session: the source, the stages (if asked), the baselines
    and the engines; batch-1 latency is timed in rounds interleaved over all of them. ``timed_on``
    goes into every row (where it was timed); ``source_name`` names the source's row (a cluster's
    second device session times the source again, as ``source@DEVICE``)."""
    source = result.source
    size = tuple(source.input_spec.sample_shape[1:])
    # streamed: decoded by worker processes (or read from the decoded-image store) batch by batch
    x = data.evaluation_images(size, source.preprocessing).preprocessed(source.preprocessing)  # type: ignore[arg-type]
    labels = x.labels
    rows, targets = session_rows(result, cfg, threads, source_name)

    def failed(row: ResultRow, exc: Exception) -> None:
        runtime_failure(result, targets.get(row.name), row.name, exc)

    if screen is not None:
        kept = screen(rows, result)
        ids = {id(k) for k in kept}
        for s in rows:
            if id(s) not in ids:
                s.runner.close()
        rows = kept
    for s in rows:
        hooks.on_measure_start(s.name)
    monitor = LoadMonitor()
    measured = measure_all(rows, x=x, labels=labels, cfg=cfg, threads=threads,
                           progress=hooks.on_message, on_error=failed, load=monitor)
    result.timing_load = monitor.summary()
    result.timing = timing_method(cfg)
    if result.timing_load["under_load"]:
        log.warning("timing ran under load: %s", "; ".join(result.timing_load["reasons"]))
    for m in measured:
        m.timed_on = timed_on
        result.measurements.append(m)
        hooks.on_measure_end(m)


def runtime_failure(result: RunResult, target: Target | None, engine: str, exc: Exception) -> None:
    detail = str(exc) if isinstance(exc, CompressorError) else f"{type(exc).__name__}: {exc}"
    message = f"engine {engine!r} failed to run on its runtime: {detail}"
    log.error(message)
    result.failures.append(TargetFailure(target.name if target else engine, target.step if target else engine,
                                         message, unavailable=False))


def source_runner(source: ModelArtifact, threads: int) -> Any:
    if source.form is Form.ONNX:
        return OrtRunner(source.path, threads=threads)  # type: ignore[arg-type]
    return TorchRunner(source.torch_module(), threads=threads, fixed_batch=source.meta.get("fixed_batch"))


def p50_at_threads(loaders: dict[str, Any], counts: list[int], one: np.ndarray,
                   cfg: Any) -> tuple[dict[tuple[str, int], float], dict[str, Any]]:
    """Batch-1 p50 (ms) of each ``loaders[name](threads)`` runner at each of ``counts`` threads, all
    timed in one interleaved session (evaluate.latency) with the machine's load recorded
    (load.LoadMonitor). Returns ({(name, threads): p50}, the load summary)."""
    from .evaluate import latency

    runners, keys = [], []
    try:
        for name, load in loaders.items():
            for n in counts:
                runners.append(load(n))
                keys.append((name, n))
        monitor = LoadMonitor()
        monitor.before()
        samples = latency(runners, one, cfg)
        monitor.during()
    finally:
        for r in runners:
            getattr(r, "close", lambda: None)()
    return {k: float(np.median(s)) for k, s in zip(keys, samples)}, monitor.summary()
