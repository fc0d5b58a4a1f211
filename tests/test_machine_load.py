"""Issue 14, part 4: each run records the machine's load around its timing rounds, says when it
timed under load, and marks the speedups load makes unreliable; compare's --fail-on auto reads it."""

from __future__ import annotations

import json
import multiprocessing
import time

from compressor.compare import gating_checks
from compressor.machine_load import CpuSample, LoadMonitor, between, judge

from .conftest import TINY_RECIPE, cli, write_recipe


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_others_share_and_steal_are_read_from_the_samples():
    a = CpuSample(wall=0.0, busy=10.0, steal=0.0, total=100.0, own=1.0, loadavg=0.5)
    b = CpuSample(wall=2.0, busy=13.0, steal=0.4, total=104.0, own=2.0, loadavg=1.5)
    s = between(a, b, cores=2)
    assert s["others_cpu_share"] == 0.5  # 3 s busy, 1 s of it ours, over 2 s x 2 cores
    assert s["steal_share"] == 0.1
    verdict = judge(s, None, 2)
    assert verdict["under_load"] and len(verdict["reasons"]) == 2
    quiet = between(a, CpuSample(2.0, 11.1, 0.0, 104.0, 2.0, 0.1), cores=2)
    assert not judge(quiet, quiet, 2)["under_load"]


def test_a_busy_sibling_process_is_seen():
    monitor = LoadMonitor(cores=2, probe_s=0.5)
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(4.0,))
    spinner.start()
    try:
        time.sleep(0.5)  # let it start
        monitor.before()
        _spin(0.5)
        monitor.during()
    finally:
        spinner.join()
    summary = monitor.summary()
    assert summary["before"]["others_cpu_share"] > 0.25, summary
    assert summary["under_load"] and "other processes took" in summary["reasons"][0]


def test_a_run_records_its_timing_load_and_marks_speedups_under_load(model_files, tmp_path, capsys, monkeypatch):
    import compressor.machine_load as load

    monkeypatch.setattr(load, "OTHERS_LIMIT", -1.0)  # whatever the machine does, count it as load
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE)
    code, out, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out", tmp_path / "o",
                         "-q")
    assert code == 0, err[-2000:]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    tl = report["timing_load"]
    assert tl["under_load"] and tl["before"]["seconds"] > 0.5 and tl["during"]["seconds"] > 0
    engine = next(r for r in report["results"] if r["name"] != "source")
    assert engine["speedup_reliable"] is False
    md = (tmp_path / "o" / "report.md").read_text()
    assert "**Timing ran under load**" in md and "x (load)" in md


def test_compare_auto_reports_latency_flags_of_a_loaded_run_without_failing():
    checks = [{"result": "openvino-int8", "metric": "latency_p50", "regression": True},
              {"result": "openvino-int8", "metric": "top1", "regression": False}]
    gate = gating_checks({"checks": checks, "same_environment": True, "under_load": True}, "auto")
    assert not gate.failing and gate.reported == 1 and "under load" in gate.reason
    assert gating_checks({"checks": checks, "same_environment": True, "under_load": False}, "auto").failing
