"""What calibration saw and whether more would help: images per class in the report, and
data.calibration.samples as a list (a sweep: validation top-1 per size, never on the test split)."""

from __future__ import annotations

import json

from .conftest import cli, one_error_line, write_recipe

SWEEP = """
name: sweep
data:
  source: digits
  calibration: {samples: SAMPLES}
  evaluation: {limit: 100}
passes:
  - export_onnx
  - quantize_ptq: {backend: onnxruntime, validation_samples: 100}
targets: [onnxruntime]
evaluation: {batch_size: 64, warmup: 1, latency_runs: 10, latency_min_seconds: 0, latency_rounds: 1,
             throughput_batch: 4, throughput_seconds: 0.05}
"""


def test_a_list_of_calibration_sizes_reports_validation_top1_per_size(model_files, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "sweep.yaml", SWEEP.replace("SAMPLES", "[2, 10, 80]"))
    code, out, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out", tmp_path / "out",
                         "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cal = report["data"]["calibration"]
    assert cal["samples_used"] == 80 and cal["sweep"] == [2, 10, 80]
    assert sum(cal["per_class"].values()) == 80 and set(cal["per_class"].values()) == {8}
    sweep = next(p for p in report["passes"] if p["name"] == "quantize_ptq")["metrics"]["calibration_sweep"]
    assert [r["samples_used"] for r in sweep["rows"]] == [2, 10, 80] and sweep["built_with"] == 80
    assert sweep["validation_images"] == 100 and sweep["validation_split"] == "train"
    tops = [r["validation_top1"] for r in sweep["rows"]]
    assert all(0 <= t <= 100 for t in tops) and tops[-1] > tops[0] - 1.0  # 2 images are no better than 80
    assert abs(sweep["float_top1"] - tops[-1]) < 5
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Calibration size of `passes[1].quantize_ptq`" in md and "| 80 |" in md


def test_a_calibration_size_list_must_hold_positive_integers(model_files, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "bad.yaml", SWEEP.replace("SAMPLES", "[10, 0]"))
    line = one_error_line(*cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model",
                               "--out", tmp_path / "out"))
    assert "samples" in line and "positive integers" in line
    assert not (tmp_path / "out").exists()
