"""Measurement session: interleaved batch-1 timing and a failing runtime that does not stop the others."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.evaluate import EvaluationConfig, Subject, TorchRunner, latency, measure_all
from compressor.target_base import Runner

from .conftest import digits_tensors


class Broken(Runner):
    """A runtime that fails on its first batch, as a converter bug would."""

    name = "broken"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("unsupported op Foo")


def test_latency_rounds_time_every_runner_alike(trained_tiny):
    x, _ = digits_tensors("test")
    cfg = EvaluationConfig(warmup=1, latency_runs=20, latency_min_seconds=0, latency_rounds=4)
    runners = [TorchRunner(trained_tiny, threads=1), TorchRunner(trained_tiny, threads=1)]
    samples = latency(runners, x.numpy(), cfg)
    assert [len(s) for s in samples] == [20, 20]
    assert all(v > 0 for s in samples for v in s)


def test_failing_runtime_is_dropped_and_others_measured(trained_tiny):
    x, y = digits_tensors("test")
    cfg = EvaluationConfig(warmup=1, latency_runs=10, latency_min_seconds=0, latency_rounds=2,
                           throughput_seconds=0.05, throughput_batch=8)
    subjects = [Subject("source", "torch", "fp32", TorchRunner(trained_tiny, threads=1), 1),
                Subject("bad", "broken", "int8", Broken(), 1),
                Subject("copy", "torch", "fp32", TorchRunner(trained_tiny, threads=1), 1)]
    errors: list[str] = []
    rows = measure_all(subjects, x=x.numpy(), labels=y.numpy(), cfg=cfg, threads=1,
                       on_error=lambda s, e: errors.append(f"{s.name}: {e}"))
    assert [r.name for r in rows] == ["source", "copy"]
    assert errors == ["bad: unsupported op Foo"]
    assert rows[1].agreement == 100.0 and rows[0].top1 == rows[1].top1 > 80
    assert rows[1].latency_ms["runs"] == 10 and len(rows[1].latency_samples_ms) == 10
    assert rows[1].throughput_ips > 0
    with pytest.raises(RuntimeError):
        measure_all(subjects[:2], x=x.numpy(), labels=y.numpy(), cfg=cfg, threads=1)
