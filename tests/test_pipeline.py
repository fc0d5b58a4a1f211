"""The pass manager through the Python API: chain checks, caching, resume, hooks, atomic engines."""

import pytest

from compressor import Form, Pipeline, PassCache, PassError, get_pass, get_target
from compressor.data import DataConfig, open_data
from compressor.errors import DataError
from compressor.evaluate import EvaluationConfig
from compressor.hooks import Hook
from compressor.intake import load_model
from compressor.pass_base import Pass, PassResult
from compressor.registry import register_pass

FAST_EVAL = EvaluationConfig(batch_size=64, warmup=1, latency_runs=10, latency_min_seconds=0,
                             throughput_batch=4, throughput_seconds=0.05, threads=2)


@pytest.fixture
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 50}, evaluation={"limit": 200}))


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def on_pass_start(self, index, p, artifact):
        self.events.append(("start", p.name))

    def on_pass_end(self, index, p, record):
        self.events.append(("end", p.name, record.cached))

    def on_target_end(self, target, engine, error):
        self.events.append(("target", target.name, engine is not None))


_crash = {"armed": False}


@register_pass
class CrashOnce(Pass):
    """A test pass that fails while armed (a run killed mid-way)."""

    name = "test_crash_once"
    consumes = frozenset({Form.OPENVINO})

    def run(self, artifact, ctx):
        if _crash["armed"]:
            raise RuntimeError("killed")
        return PassResult(artifact.derive(Form.OPENVINO, path=artifact.path), {"ok": True})


def _pipeline(tmp_path, *extra, hooks=()):
    passes = [get_pass("fuse")(), get_pass("quantize_ptq")(backend="openvino"), *extra]
    return Pipeline(passes, [get_target("openvino")()], hooks=hooks, cache=PassCache(tmp_path / "cache"))


def test_python_api_runs_passes_targets_and_measures(tmp_path, model_files, digits):
    rec = Recorder()
    art = load_model(model_files["pickle"], trust=True)
    result = _pipeline(tmp_path, hooks=[rec]).run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    assert [a.form for a in result.artifacts] == [Form.TORCH, Form.TORCH, Form.OPENVINO]
    assert result.records[0].metrics["after"]["batch_norm"] == 0 < result.records[0].metrics["before"]["batch_norm"]
    assert [m.name for m in result.measurements] == ["source", "openvino-int8"]
    src, q = result.measurements
    assert src.top1 > 90  # the tiny model learned the digits
    # a 3-layer CNN loses a few points in INT8; a broken quantization (e.g. overflowing
    # u8*s8 pairs on AVX2) falls to ~40%
    assert abs(src.top1 - q.top1) < 8 and q.agreement > 85
    assert q.latency_ms["p50"] <= q.latency_ms["p90"] <= q.latency_ms["p99"]
    assert q.threads == 2 and q.runtime["threads"] == 2
    assert q.runtime["layer_precisions"]  # what OpenVINO really ran, per layer type
    assert any(k.endswith(("u8", "i8")) for k in q.runtime["layer_precisions"])
    assert (tmp_path / "out" / "engines" / "openvino-int8" / "model.xml").is_file()
    assert rec.events[:2] == [("start", "fuse"), ("end", "fuse", False)]
    assert result.final.lineage[-1]["pass"] == "quantize_ptq"


def test_second_run_reuses_every_pass(tmp_path, model_files, digits):
    art = load_model(model_files["pickle"], trust=True)
    first = _pipeline(tmp_path).run(art, data=digits)
    again = _pipeline(tmp_path).run(load_model(model_files["pickle"], trust=True), data=digits)
    assert [r.cached for r in first.records] == [False, False]
    assert [r.cached for r in again.records] == [True, True]
    assert again.final.content_hash() == first.final.content_hash()


def test_killed_run_resumes_after_last_finished_pass(tmp_path, model_files, digits):
    art = load_model(model_files["pickle"], trust=True)
    _crash["armed"] = True
    try:
        with pytest.raises(PassError, match="test_crash_once"):
            _pipeline(tmp_path, CrashOnce()).run(art, data=digits)
    finally:
        _crash["armed"] = False
    resumed = _pipeline(tmp_path, CrashOnce()).run(art, data=digits)
    assert [r.cached for r in resumed.records] == [True, True, False]


def test_failing_target_leaves_no_engine(tmp_path, model_files, digits, monkeypatch):
    from compressor.targets import openvino as ov_target

    def broken(self, artifact, tmp_dir, data=None):
        (tmp_dir / "model.xml").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ov_target.OpenVINOTarget, "_build", broken)
    art = load_model(model_files["pickle"], trust=True)
    result = _pipeline(tmp_path).run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    assert result.engines == [] and not result.failures[0].unavailable
    assert "disk full" in result.failures[0].reason
    engines = tmp_path / "out" / "engines"
    assert not engines.exists() or list(engines.iterdir()) == []


def test_class_count_mismatch(tmp_path, model_files, image_folder):
    three = open_data(DataConfig(source="folder", root=str(image_folder)))
    art = load_model(model_files["pickle"], trust=True)
    with pytest.raises(DataError, match="10 outputs but the data set has 3 classes"):
        _pipeline(tmp_path).run(art, data=three)



def test_branches_put_runtimes_side_by_side(tmp_path, model_files, digits):
    """Side chains from the main output: every engine in one report, named by its branch."""
    from compressor.pipeline import BranchSpec

    art = load_model(model_files["pickle"], trust=True)
    ort_branch = BranchSpec("ort", [get_pass("export_onnx")(), get_pass("quantize_ptq")(backend="onnxruntime")],
                            [get_target("onnxruntime")(step="branches[0].targets[0].onnxruntime")])
    pipe = Pipeline([get_pass("fuse")()], [get_target("openvino")()], baselines=[get_target("onnxruntime")(
        step="baselines[0].onnxruntime")], branches=[ort_branch], cache=PassCache(tmp_path / "cache"))
    assert pipe.check(Form.TORCH) == [Form.TORCH, Form.TORCH]
    result = pipe.run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    names = [m.name for m in result.measurements]
    assert names == ["source", "source-onnxruntime-fp32", "openvino-fp32", "ort-onnxruntime-int8"]
    # the source-model baseline reaches its onnxruntime target through an export the manager inserts
    assert [(r.name, r.step) for r in result.records] == [
        ("fuse", "fuse"), ("export_onnx", "export_onnx"), ("quantize_ptq", "quantize_ptq"),
        ("export_onnx", "baselines[0].onnxruntime <- export_onnx")]
    assert [c.name for _, c in pipe.planned_conversions()] == ["export_onnx"]
    rows = {m.name: m for m in result.measurements}
    assert rows["ort-onnxruntime-int8"].agreement > 90 and rows["source-onnxruntime-fp32"].agreement > 99


def test_branch_chain_is_checked_before_running(model_files):
    from compressor.errors import PipelineOrderError
    from compressor.pipeline import BranchSpec

    bad = BranchSpec("ov", [get_pass("quantize_ptq")(backend="openvino", step="branches[0].passes[0].quantize_ptq")],
                     [get_target("onnxruntime")(step="branches[0].targets[0].onnxruntime")])
    with pytest.raises(PipelineOrderError, match=r"branches\[0\].targets\[0\].onnxruntime"):
        Pipeline([get_pass("fuse")()], [get_target("openvino")()], branches=[bad]).check(Form.TORCH)
