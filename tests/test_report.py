"""report.md: render_markdown of report.json. One tiny real run (digits, an OpenVINO engine, a TensorRT
branch that is not built here, acceptance limits that one metric misses) gives a report with every key
the run writes; the other cases are that report with one part changed."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from compressor import get_target
from compressor.cli import main
from compressor.report import render_markdown

from .conftest import write_recipe

TRT_HERE = get_target("tensorrt").availability().ok
HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None

RECIPE = """
name: report_test
data:
  source: digits
  calibration: {samples: 32}
  evaluation: {limit: 100}
passes: [fuse]
targets: [openvino]
evaluation: {batch_size: 64, warmup: 1, latency_runs: 10, latency_min_seconds: 0, latency_rounds: 1,
             throughput_batch: 4, throughput_seconds: 0.01}
acceptance:
  min_agreement: 50          # every row passes
  max_latency_ms: 0.000001   # every row fails
"""
TRT_BRANCH = """
branches:
  - name: trt
    passes: [export_onnx, {quantize_ptq: {backend: tensorrt, calibration: minmax}}]
    targets: [tensorrt]
"""


@pytest.fixture(scope="module")
def run(model_files, tmp_path_factory):
    """``compress`` run from its own directory with relative paths, as a user would: (exit code, dir,
    report.json, report.md)."""
    root = tmp_path_factory.mktemp("report-run")
    for suffix in (".pt", ".json"):
        shutil.copy(model_files["pickle"].with_suffix(suffix), root / f"tiny{suffix}")
    write_recipe(root / "recipe.yaml", RECIPE + (TRT_BRANCH if HAS_MODELOPT else ""))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("COMPRESSOR_CACHE_DIR", str(root / "cache"))
        mp.setenv("COMPRESSOR_DATA_DIR", str(root / "data-cache"))
        code = main(["tiny.pt", "-r", "recipe.yaml", "--trust-model", "-o", "out", "-q", "--threads", "2"])
    out = root / "out"
    return code, out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def failures_key(report: dict) -> str:
    """The key of the targets that were not built or failed ("not_built" until issue 11 renamed it)."""
    return "failures" if "failures" in report else "not_built"


def section(md: str, title: str) -> list[str]:
    """The lines of one ``## title`` section."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1 : end]


def table(lines: list[str]) -> list[list[str]]:
    """The body rows of the first Markdown table in ``lines``, as cells."""
    rows = [line for line in lines if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


def test_report_md_is_the_rendering_of_report_json(run):
    _, _, report, md = run
    assert render_markdown(report) == md


def test_every_result_has_a_row(run):
    _, _, report, md = run
    names = [r["name"] for r in report["results"]]
    assert names[:2] == ["source", "openvino-fp32"]
    if HAS_MODELOPT and not TRT_HERE:
        assert names[2:] == ["trt-tensorrt-int8-proxy-onnxruntime"]
    rows = table(section(md, "Results"))
    assert [row[0] for row in rows] == names
    header = next(line for line in section(md, "Results") if line.startswith("| name"))
    assert f"img/s @{report['results'][0]['throughput_batch']}" in header
    for row, r in zip(rows, report["results"]):
        assert len(row) == header.count("|") - 1
        assert row[1:4] == [r["target"], r["precision"], f"{r['top1']:.2f}"]
        # a run timed under load (the machine's other processes) marks its speedups: test_machine_load.py
        load = " (load)" if r.get("speedup_reliable") is False else ""
        assert row[7] == f"{r['latency_ms']['p50']:.3f}" and row[11] == f"{r['speedup']:.2f}x{load}"
        assert row[10] == f"{r['paced_latency_ms']['p50']:.3f}"  # requests 30 a second, the cores idle between


def test_acceptance_failures_come_first_and_fail_the_run(run):
    code, _, report, md = run
    assert code == 1  # a missed limit
    checks = report["acceptance"]["checks"]
    engines = [r["name"] for r in report["results"] if r["name"] != "source"]
    assert sorted((c["result"], c["metric"]) for c in checks) == sorted(
        (name, metric) for name in engines for metric in ("agreement", "latency_p50"))
    assert report["acceptance"]["passed"] is False
    assert "## Acceptance: FAILED" in md.splitlines()
    lines = section(md, "Acceptance")
    verdicts = [row[-1] for row in table(lines)]
    assert verdicts == ["**FAIL**"] * len(engines) + ["pass"] * len(engines)
    assert all(row[1] == "latency_p50" for row in table(lines)[: len(engines)])


@pytest.mark.skipif(TRT_HERE or not HAS_MODELOPT, reason="needs a TensorRT target that cannot build here "
                                                          "(no tensorrt package or CUDA device) and ModelOpt")
def test_an_unbuilt_target_says_not_built_here(run):
    _, out, report, md = run
    (failure,) = report[failures_key(report)]
    assert failure["target"] == "tensorrt" and failure["unavailable"] is True
    line = next(line for line in md.splitlines() if line.startswith("- **tensorrt**"))
    assert line.startswith("- **tensorrt** (`branches[0].targets[0].tensorrt`): not built here — ")
    assert "wrote model.onnx and the build command to trt-tensorrt-int8/" in line
    assert (out / "engines" / "trt-tensorrt-int8" / "build_engine.sh").is_file()


def test_no_path_of_this_machine_in_report_md(run):
    """Run with relative paths, report.md names no directory of this machine: not the run's, not the
    temporary or staging ones, not the home directory."""
    _, out, report, md = run
    for path in {str(out.parent), str(Path(tempfile.gettempdir())), str(Path.home()), str(Path.cwd())}:
        assert path not in md, path
    assert ".partial-" not in md and "compressor-run-" not in md
    assert "- model: `tiny.pt`" in md
    # report.json names the engines where they are now, not where they were built
    text = json.dumps(report)
    assert ".partial-" not in text and "compressor-run-" not in text
    for engine in report["engines"]:  # (relative to where compress ran, like the -o it was given)
        assert all((out.parent / f).is_file() for f in engine["files"]), engine["files"]


def test_passes_table_has_a_row_per_pass_with_short_figures(run):
    _, _, report, md = run
    rows = table(section(md, "Passes"))
    assert [row[1] for row in rows] == [p["name"] for p in report["passes"]]
    assert rows[0][2] == "torch → torch"
    assert all(len(row[5]) <= 162 for row in rows)  # figures cut at 160 characters and backquoted
    assert any(row[5].endswith('...`') for row in rows)  # the fuse figures are longer


# ---------------------------------------------------------------------- the same report, one part changed


def test_all_limits_met_says_passed_and_no_limits_no_section(run):
    report = copy.deepcopy(run[2])
    for c in report["acceptance"]["checks"]:
        c["passed"] = True
    report["acceptance"]["passed"] = True
    md = render_markdown(report)
    assert "## Acceptance: passed" in md and "**FAIL**" not in md
    report["acceptance"] = {"checks": [], "passed": True}
    assert "## Acceptance" not in render_markdown(report)


def test_runtime_failure_says_failed_not_unbuilt(run):
    report = copy.deepcopy(run[2])
    report[failures_key(report)] = [
        {"target": "onnxruntime", "field": "targets[1].onnxruntime", "unavailable": False,
         "reason": "engine 'onnxruntime-fp32' failed to run on its runtime: unsupported op Foo"},
        {"target": "tflite", "field": "targets[2].tflite", "unavailable": True, "reason": "no LiteRT here"},
    ]
    lines = render_markdown(report).splitlines()
    assert "- **onnxruntime** (`targets[1].onnxruntime`): FAILED — engine 'onnxruntime-fp32' failed to run on " \
           "its runtime: unsupported op Foo" in lines
    assert "- **tflite** (`targets[2].tflite`): not built here — no LiteRT here" in lines


def test_fewer_calibration_images_than_asked_is_a_warning(run):
    report = copy.deepcopy(run[2])
    assert "**warning**" not in render_markdown(report)
    report["data"]["calibration"].update(samples_requested=5000, samples_used=1347)
    md = render_markdown(report)
    assert "- **warning**: data.calibration.samples asks for 5000 images, but split `train` has only 1347" in md
    assert "calibration 1347 images of `train`" in md


def test_no_measurements_and_an_older_report_still_render(run):
    report = copy.deepcopy(run[2])
    report["results"] = []
    assert "No measurements (the recipe has no data section)." in render_markdown(report)
    old = copy.deepcopy(run[2])  # written before model_input and samples_used existed
    del old["model_input"]
    cal = old["data"]["calibration"]
    cal["samples"] = cal.pop("samples_used")
    del cal["samples_requested"]
    md = render_markdown(old)
    assert "- input shape:" not in md and "calibration 32 images of `train`" in md


def test_stage_rows_are_reported_not_gated():
    """evaluation.stages rows (the intermediate torch models) are not shipped: a QAT stage that runs
    slower than the source in eager PyTorch must not fail min_speedup; the engines still are gated."""
    from compressor.recipe import AcceptanceConfig
    from compressor.report import acceptance_checks

    rows = [{"name": "source", "top1": 80.0, "speedup": 1.0},
            {"name": "stage2-quantize_qat", "top1": 79.0, "speedup": 0.2},
            {"name": "openvino-int8", "top1": 78.0, "speedup": 0.5}]
    checks = acceptance_checks(rows, AcceptanceConfig(min_speedup=1.0))
    assert [(c["result"], c["passed"]) for c in checks] == [("openvino-int8", False)]
