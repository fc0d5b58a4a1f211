"""Measurement session: interleaved batch-1 timing and a failing runtime that does not stop the others."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.evaluate import EvaluationConfig, ResultRow, TorchRunner, latency, measure_all
from compressor.fidelity.metrics import sqnr_db
from compressor.target_base import Runner

from .conftest import digits_tensors


class Broken(Runner):
    """A runtime that fails on its first batch, as a converter bug would."""

    name = "broken"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise RuntimeError("unsupported op Foo")


class Machine:
    """A fake clock for the fake runners: every call takes 1 ms plus ``drift`` ms per call made before
    it (a machine that slows down as it runs). ``calls`` logs (runner, batch, ms) in one global order,
    with latency's round messages in between."""

    def __init__(self, drift: float = 0.01) -> None:
        self.now, self.drift, self.n, self.calls = 0.0, drift, 0, []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)

    def run(self, who: str, batch: int) -> None:
        ms = 1.0 + self.drift * self.n
        self.now += ms / 1e3
        self.n += 1
        self.calls.append((who, batch, ms))


class Fake(Runner):
    def __init__(self, name: str, machine: Machine) -> None:
        self.name, self.machine, self.prepared = name, machine, []

    def prepare(self, batch: int) -> None:
        self.prepared.append(batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.machine.run(self.name, len(x))
        return np.tile(np.arange(10, dtype=np.float32), (len(x), 1))


@pytest.fixture
def machine(monkeypatch):
    """The fake clock in place of the one the batch-1 timing reads (the one internal this file patches)."""
    import time

    m = Machine()
    monkeypatch.setattr(time, "perf_counter", m.perf_counter)
    monkeypatch.setattr(time, "sleep", m.sleep)
    return m


def _rounds(log: list) -> list[list[tuple[str, int]]]:
    """The batch-1 calls after each 'round k/n' progress message, as (runner, consecutive calls) visits."""
    rounds: list[list[tuple[str, int]]] = []
    for item in log:
        if item == "paced":
            break
        if isinstance(item, str):
            assert item == f"batch-1 latency, round {len(rounds) + 1}", item
            rounds.append([])
        elif rounds and item[1] == 1:  # batch 1: not the accuracy or throughput batches
            visits = rounds[-1]
            if visits and visits[-1][0] == item[0]:
                visits[-1] = (item[0], visits[-1][1] + 1)
            else:
                visits.append((item[0], 1))
    return rounds


def _progress(machine: Machine):
    """A progress callback that puts latency's round messages into the machine's call log."""

    def say(msg: str) -> None:
        if msg.startswith("batch-1 latency, round "):
            machine.calls.append(msg.rsplit("/", 1)[0])
        elif msg.startswith("paced"):
            machine.calls.append("paced")

    return say


def test_latency_rounds_time_every_runner_alike(machine):
    """Warm-up for each runner, then rounds that visit every runner once, in an order shuffled each
    round, each visit an untimed warm block then the runner's share of timed batch-1 runs; so a
    machine that drifts while timing moves every runner's latency alike."""
    warmup, rounds, runs = 2, 4, 20
    cfg = EvaluationConfig(warmup=warmup, latency_runs=runs, latency_min_seconds=0, latency_rounds=rounds,
                           latency_warm_ms=10)
    names = ["r0", "r1", "r2"]
    runners = [Fake(n, machine) for n in names]
    samples = latency(runners, np.zeros((5, 3, 4, 4), np.float32), cfg, progress=_progress(machine))

    calls = [c for c in machine.calls if not isinstance(c, str)]
    assert all(b == 1 for _, b, _ in calls), "batch-1 latency must run batches of 1"
    assert all(r.prepared == [1] for r in runners)
    assert [who for who, _, _ in calls[: 3 * warmup]] == [n for n in names for _ in range(warmup)]  # warm-up
    visits = _rounds(machine.calls)
    assert len(visits) == rounds
    for visit in visits:  # every runner once a round
        assert sorted(who for who, _ in visit) == names, visit
    assert len({tuple(who for who, _ in visit) for visit in visits}) > 1, visits  # shuffled, not one fixed order
    for visit in visits[1::2]:  # every other round mirrors the one before
        assert [who for who, _ in visit] == [who for who, _ in visits[visits.index(visit) - 1]][::-1]
    per_round = runs // rounds
    # each visit: untimed calls for 10 ms (at least 3, at >= 1 ms each) then the per_round timed ones
    assert all(3 + per_round <= n <= 10 + per_round for visit in visits for _, n in visit), visits

    assert [len(s) for s in samples] == [runs] * 3  # each runner timed alike
    for name, got in zip(names, samples):
        assert all(v > 0 for v in got)
        # the samples are the last per_round calls of each of the runner's visits, as the clock saw them
        own = iter([ms for who, _, ms in calls if who == name][warmup:])
        timed = []
        for n in (n for visit in visits for who, n in visit if who == name):
            timed += [next(own) for _ in range(n)][-per_round:]
        np.testing.assert_allclose(got, timed, rtol=1e-6)
    # the drift (1 ms growing by 0.01 ms a call) falls on all three alike: near-equal means, where
    # timing the runners one after the other would give r2 ~40% more than r0
    means = [float(np.mean(s)) for s in samples]
    assert max(means) / min(means) < 1.03, means


def test_measure_all_interleaves_every_subject(machine):
    """measure_all times every subject's batch-1 latency in the same interleaved rounds."""
    cfg = EvaluationConfig(warmup=1, latency_runs=12, latency_min_seconds=0, latency_rounds=4, batch_size=8,
                           throughput_batch=4, throughput_seconds=0.01)
    runners = [Fake(n, machine) for n in ("a", "b", "c")]
    subjects = [ResultRow(r.name, "fake", "fp32", r, 1) for r in runners]
    x, labels = np.zeros((16, 3, 4, 4), np.float32), np.full(16, 9)
    rows = measure_all(subjects, x=x, labels=labels, cfg=cfg, threads=1, progress=_progress(machine))
    assert [r.top1 for r in rows] == [100.0] * 3 and [r.latency_ms["runs"] for r in rows] == [12] * 3
    visits = _rounds(machine.calls)
    assert len(visits) == 4 and all(sorted(who for who, _ in v) == ["a", "b", "c"] for v in visits), visits
    p50 = [r.latency_ms["p50"] for r in rows]
    assert max(p50) / min(p50) < 1.05, p50
    # then the paced figure: 30 requests a second (min(paced_runs, latency_runs) = 12 each)
    assert all(r.paced_latency_ms["runs"] == 12 and r.paced_latency_ms["rate_hz"] == 30.0 for r in rows)


def test_failing_runtime_is_dropped_and_others_measured(trained_tiny):
    x, y = digits_tensors("test")
    cfg = EvaluationConfig(warmup=1, latency_runs=10, latency_min_seconds=0, latency_rounds=2,
                           throughput_seconds=0.05, throughput_batch=8)
    subjects = [ResultRow("source", "torch", "fp32", TorchRunner(trained_tiny, threads=1), 1),
                ResultRow("bad", "broken", "int8", Broken(), 1),
                ResultRow("copy", "torch", "fp32", TorchRunner(trained_tiny, threads=1), 1)]
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


class Scaled(Runner):
    """Fixed logits, times a gain and plus an offset: a known error against the unscaled ones."""

    def __init__(self, logits: np.ndarray, gain: float = 1.0, offset: float = 0.0) -> None:
        self.logits, self.gain, self.offset, self.seen = logits, gain, offset, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.logits[self.seen : self.seen + len(x)] * self.gain + self.offset
        self.seen = (self.seen + len(x)) % len(self.logits)
        return out


def test_sqnr_of_every_row_against_the_source():
    assert sqnr_db(np.ones((4, 3)), np.ones((4, 3))) is None  # identical: infinite, reported as none
    assert sqnr_db(np.ones((4, 3)), np.full((4, 3), 1.1)) == pytest.approx(20.0)  # 10% error in amplitude
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 10)).astype(np.float32)
    cfg = EvaluationConfig(warmup=0, latency_runs=10, latency_min_seconds=0, latency_rounds=1, batch_size=5,
                           throughput_batch=2, throughput_seconds=0.01)
    rows = [ResultRow("source", "fake", "fp32", Scaled(logits), 1),
            ResultRow("same", "fake", "fp32", Scaled(logits), 1),
            ResultRow("noisy", "fake", "int8", Scaled(logits, gain=1.01), 1),
            ResultRow("worse", "fake", "int8", Scaled(logits, gain=1.1), 1)]
    measured = measure_all(rows, x=np.zeros((16, 3, 4, 4), np.float32), labels=np.zeros(16, int), cfg=cfg, threads=1)
    sqnr = {m.name: m.output_sqnr_db for m in measured}
    assert sqnr["source"] is None and sqnr["same"] is None
    assert sqnr["noisy"] == pytest.approx(40.0, abs=1e-3) and sqnr["worse"] == pytest.approx(20.0, abs=1e-3)
    assert all(m.to_json()["output_sqnr_db"] == sqnr[m.name] for m in measured)
