"""Pipeline hooks: the pass manager calls every hook, in the order the hooks were given, at every stage
of a run in the order the stages run (run start, each pass, each target, the measurements, run end);
a cached pass and a failed target are announced too; and a hook that raises stops the run with its
own error without spoiling what the next run reuses."""

from __future__ import annotations

import logging

import pytest

from compressor import Engine, ModelArtifact, Pass, PassError, Pipeline, Target, get_pass, get_target
from compressor.data import DataConfig, open_data
from compressor.evaluate import EvaluationConfig, Measurement
from compressor.hooks import Hook, LoggingHook, TimingHook
from compressor.intake import load_model
from compressor.pipeline import PassCache

FAST_EVAL = EvaluationConfig(batch_size=64, warmup=1, latency_runs=10, latency_min_seconds=0, latency_rounds=2,
                             throughput_batch=4, throughput_seconds=0.02, threads=2)
EVENTS = ("on_run_start", "on_pass_start", "on_pass_end", "on_target_start", "on_target_end",
          "on_measure_start", "on_message", "on_measure_end", "on_run_end")


def describe(arg):
    """A short, comparable view of a hook argument (whatever the hook signatures hold)."""
    if arg is None or isinstance(arg, (int, str)):
        return arg
    if isinstance(arg, Measurement):
        return ("row", arg.name)
    if isinstance(arg, Engine):
        return ("engine", arg.name)
    if isinstance(arg, (Pass, Target)):
        return arg.name
    if isinstance(arg, ModelArtifact):
        return ("artifact", arg.form.value)
    if hasattr(arg, "cached") and hasattr(arg, "name"):  # a pass record
        return ("record", arg.name, arg.cached)
    return type(arg).__name__


class Recorder(Hook):
    """Logs every call as (hook label, event, described arguments) into a shared list."""

    def __init__(self, log: list, label: str = "rec") -> None:
        self.log, self.label = log, label

    def __getattribute__(self, name):
        if name in EVENTS:
            def record(*args):
                self.log.append((object.__getattribute__(self, "label"), name, tuple(describe(a) for a in args)))
            return record
        return object.__getattribute__(self, name)


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}, evaluation={"limit": 100}))


@pytest.fixture
def art(model_files):
    return load_model(model_files["pickle"], trust=True)


def events(log, label="rec"):
    return [(e, args) for who, e, args in log if who == label]


def test_every_stage_in_order(art, digits, tmp_path):
    log: list = []
    pipe = Pipeline([get_pass("fuse")(), get_pass("quantize_ptq")(backend="openvino")], [get_target("openvino")()],
                    hooks=[Recorder(log)], cache=PassCache(tmp_path / "cache"))
    result = pipe.run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    got = events(log)
    messages = [args[0] for e, args in got if e == "on_message"]
    assert any("batch-1 latency, round 1" in m for m in messages), messages
    names = [e for e, _ in got if e != "on_message"]
    assert names == ["on_run_start",
                     "on_pass_start", "on_pass_end", "on_pass_start", "on_pass_end",
                     "on_target_start", "on_target_end",
                     "on_measure_start", "on_measure_start", "on_measure_end", "on_measure_end",
                     "on_run_end"], names
    first_message = next(i for i, (e, _) in enumerate(got) if e == "on_message")
    last_message = max(i for i, (e, _) in enumerate(got) if e == "on_message")
    assert [e for e, _ in got[:first_message]][-1] == "on_measure_start"  # progress comes while measuring
    assert got[last_message + 1][0] == "on_measure_end"
    by = {e: [args for ev, args in got if ev == e] for e in EVENTS}
    assert [a for a in by["on_pass_start"] if "fuse" in a] and [a for a in by["on_pass_start"] if "quantize_ptq" in a]
    assert [a[-1] for a in by["on_pass_end"]] == [("record", "fuse", False), ("record", "quantize_ptq", False)]
    assert by["on_target_start"] == [("openvino",)]
    assert by["on_target_end"] == [("openvino", ("engine", "openvino-int8"), None)]
    assert [a[0] for a in by["on_measure_start"]] == ["source", "openvino-int8"]
    assert [a[0] for a in by["on_measure_end"]] == [("row", "source"), ("row", "openvino-int8")]
    assert [m.name for m in result.measurements] == ["source", "openvino-int8"]
    assert by["on_run_end"] == [("RunResult",)]


def test_hooks_are_called_in_the_order_given(art, tmp_path):
    log: list = []
    pipe = Pipeline([get_pass("fuse")()], hooks=[Recorder(log, "a"), Recorder(log, "b"), Hook()])
    pipe.run(art)
    assert [who for who, _, _ in log] == ["a", "b"] * (len(log) // 2)
    assert events(log, "a") == events(log, "b") and events(log, "a")


def test_a_cached_pass_is_announced_as_cached(art, tmp_path):
    cache = PassCache(tmp_path / "cache")
    Pipeline([get_pass("fuse")()], cache=cache).run(art)
    log: list = []
    Pipeline([get_pass("fuse")()], hooks=[Recorder(log)], cache=cache).run(art)
    assert [e for e, _ in events(log)] == ["on_run_start", "on_pass_start", "on_pass_end", "on_run_end"]
    assert events(log)[2][1][-1] == ("record", "fuse", True)


def test_a_failed_target_is_announced_and_the_run_goes_on(art, digits, tmp_path):
    log: list = []
    broken = get_target("openvino")(device="NO_SUCH_DEVICE")  # the build asks the device its name
    pipe = Pipeline([get_pass("fuse")()], [broken, get_target("onnxruntime")()], hooks=[Recorder(log)])
    result = pipe.run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    ends = [args for e, args in events(log) if e == "on_target_end"]
    assert [a[:2] for a in ends] == [("openvino", None), ("onnxruntime", ("engine", "onnxruntime-fp32"))]
    assert "NO_SUCH_DEVICE" in ends[0][2] and ends[1][2] is None
    assert [m.name for m in result.measurements] == ["source", "onnxruntime-fp32"]
    assert not (tmp_path / "out" / "engines" / "openvino-fp32").exists()


class Raises(Hook):
    def __init__(self, when: str) -> None:
        self.when = when

    def on_pass_end(self, *args) -> None:
        if self.when == "on_pass_end":
            raise KeyError("hook broke")

    def on_target_start(self, *args) -> None:
        if self.when == "on_target_start":
            raise KeyError("hook broke")


@pytest.mark.parametrize("when", ["on_pass_end", "on_target_start"])
def test_a_hook_that_raises_stops_the_run_with_its_own_error(when, art, digits, tmp_path):
    """The error is the hook's, not blamed on a pass or target; the pass cache keeps only whole
    entries, and the next run reuses them and measures as a clean run does."""
    cache = PassCache(tmp_path / "cache")

    def pipeline(*hooks):
        return Pipeline([get_pass("fuse")(), get_pass("quantize_ptq")(backend="openvino")],
                        [get_target("openvino")()], hooks=hooks, cache=cache)

    with pytest.raises(KeyError, match="hook broke") as caught:
        pipeline(Raises(when)).run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    assert not isinstance(caught.value, PassError)
    again = pipeline().run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    finished = 1 if when == "on_pass_end" else 2  # passes that ended before the hook raised
    assert [r.cached for r in again.records] == [True] * finished + [False] * (2 - finished)
    clean = Pipeline([get_pass("fuse")(), get_pass("quantize_ptq")(backend="openvino")]).run(art, data=digits)
    # the same INT8 weights and ranges (the IR's .xml differs in OpenVINO's generated layer names)
    assert again.final.path.with_suffix(".bin").read_bytes() == clean.final.path.with_suffix(".bin").read_bytes()
    assert [m.name for m in again.measurements] == ["source", "openvino-int8"]
    assert again.measurements[1].agreement > 85


def test_timing_and_logging_hooks(art, digits, tmp_path, caplog):
    timing = TimingHook()
    with caplog.at_level(logging.INFO, logger="compressor"):
        Pipeline([get_pass("fuse")()], [get_target("openvino")()], hooks=[timing, LoggingHook()]).run(
            art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    kinds = sorted(key.split(":", 1)[0] for key in timing.timings)
    assert kinds == ["build", "measure", "measure", "pass"], timing.timings
    assert all(v >= 0 for v in timing.timings.values())
    assert "measure:source" in timing.timings and "measure:openvino-fp32" in timing.timings
    text = caplog.text
    assert "pass 0 fuse on" in text and "pass 0 fuse done" in text and "target openvino built" in text
