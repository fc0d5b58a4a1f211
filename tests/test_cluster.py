"""Issue 25: ``--cluster`` builds branches (tune's candidates) as Ray tasks and times each device's
engines in a session actor pinned to a node that carries ``device:NAME``. On a real local Ray
instance that this module starts (two worker CPUs; resources device:host, device:x86-avx2 and
device:x86-avx512-vnni) and stops; no mocks."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

import pytest
import yaml

from .conftest import cli, one_error_line

ray = pytest.importorskip("ray", reason="the cluster extra (Ray) is not installed: pip install 'compressor[cluster]'")

DEVICES = ("host", "x86-avx2", "x86-avx512-vnni")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with two worker CPUs and three device resources, for this module only."""
    ray.init(num_cpus=2, resources={f"device:{d}": 1 for d in DEVICES}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_cluster_auto_starts_a_local_instance_and_stops_it(model_files, tmp_path):
    """The first test of the module, before its own instance starts: ``--cluster auto`` with no cluster
    starts Ray for the command and stops it at the end."""
    import subprocess
    import time

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") or _ray_processes():
        pytest.skip("a Ray instance runs already: --cluster auto would join it")
    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_DEVICES.replace("x86-avx2", "host").replace("x86-avx512-vnni", "host"))
    proc = subprocess.run([sys.executable, "-m", "compressor", str(model_files["pickle"]), "--recipe", str(recipe),
                           "--trust-model", "--out", str(tmp_path / "out"), "--eval-limit", "100", "--cluster", "auto",
                           "-q"], capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["cluster"]["started_local"] is True
    assert {s["device"] for s in report["cluster"]["timing_sessions"]} == {"host"}
    deadline = time.time() + 30
    while _ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes()  # stopped with the command


def test_a_cluster_address_nothing_answers_is_one_line(model_files, tmp_path, capsys):
    """Ray would retry an address with no head for minutes; the tool says so at once. (Before the module's
    own instance starts: a process already connected to Ray uses that connection.)"""
    import time

    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_DEVICES)
    started = time.monotonic()
    line = one_error_line(*cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out",
                               tmp_path / "out", "--cluster", "127.0.0.1:1", "-q"))
    assert "--cluster 127.0.0.1:1: nothing answers there" in line
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()


def _ray_processes() -> list[str]:
    """Ray's own daemons running on this machine (raylet, the GCS server)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/comm") as fh:
                name = fh.read().strip()
        except OSError:
            continue
        if name in ("raylet", "gcs_server"):
            out.append(f"{d} {name}")
    return out


def _engine_bytes(run_dir) -> dict[str, list[bytes]]:
    out = {}
    for d in sorted((run_dir / "engines").iterdir()):
        out[d.name] = [p.read_bytes() for p in sorted(d.glob("model.*"))]
    return out


def test_tune_on_the_cluster_builds_the_same_engines(local_ray, model_files, digits_folder, tmp_path, capsys):
    args = ["tune", model_files["pickle"], "--data", digits_folder, "--max-drop", "2.0", "--targets", "onnxruntime",
            "--device", "x86-avx2", "--trust-model", "--quick", "--validation-images", "200", "-q"]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "here")
    assert code == 0, err[-3000:]
    # its own empty pass cache: every pass runs again, on the workers (two of them fill one cache at once)
    code, _, err = cli(capsys, *args, "--out", tmp_path / "cluster", "--cluster", "auto", "--cache-dir", tmp_path / "c2")
    assert code == 0, err[-3000:]
    here, there = _engine_bytes(tmp_path / "here"), _engine_bytes(tmp_path / "cluster")
    assert here and here == there  # every candidate's engine, byte for byte
    summary = json.loads((tmp_path / "cluster" / "tune.json").read_text())
    chosen = summary["chosen"]["engine"]
    assert there[chosen] == here[chosen]
    # every branch was built as a task, in a worker process other than this one
    stages = summary["cluster"]["stages"]
    builds = [s for s in stages if s["stage"].startswith("build ")]
    branches = {c["candidate"] for c in summary["candidates"]} - {"ort_fp32"}  # ort_fp32: the main chain
    assert {s["stage"][len("build "):] for s in builds} == branches

    assert all(s["pid"] != os.getpid() for s in stages)
    # the timing session ran in the actor holding device:x86-avx2, and every row says so
    report = json.loads((tmp_path / "cluster" / "report.json").read_text())
    sessions = report["cluster"]["timing_sessions"]
    assert [s["device"] for s in sessions] == ["x86-avx2"]
    assert {r["timed_on"]["device"] for r in report["results"]} == {"x86-avx2"}
    assert {r["timed_on"]["pid"] for r in report["results"]} == {sessions[0]["pid"]} != {os.getpid()}
    assert any(s["stage"].startswith("thread sweep") for s in stages)  # the sweep ran on the device too
    (screen,) = [s for s in stages if s["stage"].startswith("screen ")]  # the screen was a task of its own
    assert screen["pid"] != sessions[0]["pid"]
    assert "Ray cluster" in (tmp_path / "cluster" / "report.md").read_text()


TWO_DEVICES = """
name: two_devices
data: {source: digits, calibration: {samples: 64}}
passes: [fuse]
targets: [onnxruntime]
branches:
  - {name: avx2, device: x86-avx2, passes: [export_onnx, {quantize_ptq: {backend: onnxruntime}}],
     targets: [onnxruntime]}
  - {name: vnni, device: x86-avx512-vnni, passes: [export_onnx, {quantize_ptq: {backend: onnxruntime}}],
     targets: [onnxruntime]}
evaluation: {batch_size: 64, warmup: 2, latency_runs: 10, latency_min_seconds: 0, throughput_batch: 8,
             throughput_seconds: 0.05}
"""


def test_each_device_is_timed_by_the_actor_holding_its_resource(local_ray, model_files, tmp_path, capsys):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_DEVICES)
    code, _, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out", tmp_path / "out",
                       "--eval-limit", "200", "--cluster", "auto", "-q")
    assert code in (0, 1), err[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sessions = {s["device"]: s for s in report["cluster"]["timing_sessions"]}
    assert set(sessions) == {"host", "x86-avx2", "x86-avx512-vnni"}
    assert len({s["pid"] for s in sessions.values()}) == 3  # three actors, one per resource
    rows = {r["name"]: r for r in report["results"]}
    assert rows["avx2-onnxruntime-int8"]["timed_on"]["pid"] == sessions["x86-avx2"]["pid"]
    assert rows["vnni-onnxruntime-int8"]["timed_on"]["pid"] == sessions["x86-avx512-vnni"]["pid"]
    assert rows["onnxruntime-fp32"]["timed_on"]["device"] == "host"
    # each device's session timed the source as well: its speedups have their own reference
    assert {"source", "source@x86-avx2", "source@x86-avx512-vnni"} <= set(rows)
    # the avx2 branch was built for its device (7-bit weights), the vnni one with 8-bit weights
    engines = {e["name"]: e for e in report["engines"]}
    assert engines["avx2-onnxruntime-int8"]["files"] and engines["vnni-onnxruntime-int8"]["files"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "rows for device x86-avx2 timed on node" in md


def test_a_device_no_node_carries_fails_its_rows_in_one_line_each(local_ray, model_files, tmp_path, capsys):
    recipe = tmp_path / "arm.yaml"
    recipe.write_text(TWO_DEVICES.replace("x86-avx512-vnni", "arm64"))
    code, _, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out", tmp_path / "out",
                       "--eval-limit", "200", "--cluster", "auto", "-q")
    assert code == 1 and "Traceback" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    failed = [f for f in report["failures"] if "device:arm64" in f["reason"]]
    assert len(failed) == 1 and "ray start" in failed[0]["reason"] and "\n" not in failed[0]["reason"]
    assert "avx2-onnxruntime-int8" in {r["name"] for r in report["results"]}  # the rest was timed


@pytest.mark.parametrize("kills, built", [(1, True), (2, False)])
def test_a_killed_build_worker_is_retried_once_then_fails_its_branch(local_ray, model_files, tmp_path, capsys,
                                                                     monkeypatch, kills, built):
    monkeypatch.setenv("COMPRESSOR_CLUSTER_KILL", f"avx2:{kills}")  # SIGKILL the worker building branch avx2
    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_DEVICES)
    code, _, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out", tmp_path / "out",
                       "--eval-limit", "200", "--cluster", "auto", "-q")
    assert "Traceback" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = {r["name"] for r in report["results"]}
    assert "vnni-onnxruntime-int8" in names  # the other branch is untouched
    if built:
        assert "avx2-onnxruntime-int8" in names and code in (0, 1)
    else:
        assert code == 1 and "avx2-onnxruntime-int8" not in names
        (failed,) = [f for f in report["failures"] if f["step"].startswith("branches[0]")]
        assert "worker died twice" in failed["reason"] and "\n" not in failed["reason"]


def test_without_ray_cluster_is_one_line(model_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    recipe = tmp_path / "two.yaml"
    recipe.write_text(TWO_DEVICES)
    line = one_error_line(*cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out",
                               tmp_path / "out", "--cluster", "auto", "-q"))
    assert "compressor[cluster]" in line
    assert not (tmp_path / "out").exists()


def _put_same_key(root, key, barrier, results):
    import torch

    from compressor.artifact import Form, InputSpec, ModelArtifact
    from compressor.pass_cache import PassCache

    cache = PassCache(root)
    art = ModelArtifact(Form.TORCH, model=torch.nn.Linear(4, 2), input_spec=InputSpec(shape=[1, 4, 1, 1]))
    barrier.wait()
    cache.put(key, art, {"n": 1})
    results.put(cache.wrote)


def test_the_pass_cache_is_written_once_when_workers_race(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_put_same_key, args=(tmp_path, "k" * 32, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    wrote = sorted(results.get(timeout=5) for _ in procs)
    assert wrote == [False, False, True]  # one entry, written once; the others took it
    assert [p.name for p in tmp_path.iterdir()] == ["k" * 32]  # no staging left behind
    assert yaml.safe_load((tmp_path / ("k" * 32) / "metrics.json").read_text()) == {"n": 1}
