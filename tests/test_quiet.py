"""Quiet and clean: under -q (and without -v) the libraries' own console output (NNCF's progress
bars, ONNX Runtime's calibration text) stays off the console, and a run leaves TMPDIR as it found
it (ONNX Runtime's telemetry file .ses, torchrun's torchelastic_* log directories)."""

import os
import re
import subprocess
import sys
import time

import pytest

from compressor.cli import main
from compressor.staging import ORT_SESSION_FILE, tidy_tmpdir

from .conftest import write_recipe

EVALUATION = ("evaluation: {batch_size: 64, warmup: 1, latency_runs: 10, latency_min_seconds: 0, latency_rounds: 1,"
              " throughput_batch: 4, throughput_seconds: 0.05, threads: 1}\n")
NNCF_RECIPE = """
name: quiet
data: {source: digits, calibration: {samples: 64}, evaluation: {limit: 100}}
passes: [{quantize_ptq: {backend: openvino}}]
targets: [openvino]
""" + EVALUATION
ORT_RECIPE = """
name: quiet
data: {source: digits, calibration: {samples: 64}, evaluation: {limit: 100}}
passes: [export_onnx, {quantize_ptq: {backend: onnxruntime, calibration: entropy}}]
targets: [onnxruntime]
""" + EVALUATION

QAT_RECIPE = """
name: quiet
data: {source: digits, calibration: {samples: 64}, evaluation: {limit: 100}}
passes: [{quantize_qat: {train: {epochs: 0.1, batch_size: 64, val_samples: 50}}}]
targets: [openvino]
""" + EVALUATION

# what the libraries print when nobody stops them (NNCF's rich bars, ORT's histogram calibrators, tqdm)
LIBRARY_TEXT = re.compile(r"Statistics collection|Bias correction|Collecting tensor data|optimal threshold|"
                          r"Number of (tensors|histogram bins|quantized bins)|it/s\]|(INFO|WARNING|ERROR):nncf|"
                          r"loss [\d.n]+ acc")  # the last: the tool's own training bar, a display -q turns off


def _own_line(line: str) -> bool:
    """A line compress itself writes: the results table, 'wrote ...', or a log record (rich: a time
    column, or blank where the time repeats; wrapped records and the table's title are indented)."""
    return (not line.strip() or line[0] in "┏┃┡│└" or line.startswith(("wrote ", " "))
            or re.match(r"\[\d\d/\d\d/\d\d", line) is not None)


def _quiet_run(capfd, model, recipe, tmp_path, *flags):
    code = main([str(model), "--recipe", str(recipe), "--trust-model", "--out", str(tmp_path / "out"), "--no-cache",
                 *flags])
    out, err = capfd.readouterr()
    return code, out, err


def _foreign(out: str, err: str) -> list[str]:
    return [line for line in (out + err).splitlines() if LIBRARY_TEXT.search(line) or not _own_line(line)]


@pytest.mark.parametrize("recipe_text, engine", [
    pytest.param(NNCF_RECIPE, "openvino-int8", id="nncf"),
    pytest.param(ORT_RECIPE, "onnxruntime-int8", id="onnxruntime-entropy"),
    pytest.param(QAT_RECIPE, "openvino-int8", id="qat-training-bar-and-nncf-init"),
])
def test_quiet_run_prints_only_its_own_lines(tmp_path, model_files, capfd, recipe_text, engine):
    """-q: the results table, 'wrote ...' and the tool's log records; no NNCF progress bar, no ONNX
    Runtime calibration text (capfd: what C extensions and tqdm write to the real descriptors too)."""
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text)
    code, out, err = _quiet_run(capfd, model_files["pickle"], recipe, tmp_path, "-q")
    assert code == 0, err[-2000:]
    assert "wrote " in out and engine in out
    assert _foreign(out, err) == []


def test_verbose_run_shows_the_nncf_progress(tmp_path, model_files, capfd):
    """-v lets the library speak (the quieting is not a lost stream)."""
    recipe = write_recipe(tmp_path / "nncf.yaml", NNCF_RECIPE)
    code, out, err = _quiet_run(capfd, model_files["pickle"], recipe, tmp_path, "-q", "-v")
    assert code == 0, err[-2000:]
    assert "Statistics collection" in out + err


# ------------------------------------------------------------------------------- TMPDIR as found


def test_a_run_on_an_onnx_model_leaves_tmpdir_as_it_found_it(tmp_path, model_files):
    """An ONNX model's intake imports onnxruntime before the run's own temporary directory exists,
    and onnxruntime writes its telemetry file .ses into TMPDIR on import: the run removes it."""
    fresh = tmp_path / "tmpdir"
    fresh.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", """
name: clean
data: {source: digits, calibration: {samples: 16}, evaluation: {limit: 50}}
targets: [onnxruntime]
""" + EVALUATION)
    proc = subprocess.run([sys.executable, "-m", "compressor", str(model_files["onnx"]), "--recipe", str(recipe),
                           "--out", str(tmp_path / "out"), "-q", "--no-cache"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "TMPDIR": str(fresh)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in fresh.iterdir()) == []


def test_explain_leaves_tmpdir_as_it_found_it(tmp_path, model_files):
    """compress explain runs ONNX Runtime, NNCF and OpenVINO again: what they put in TMPDIR (the
    .ses telemetry file, ORT's optimized models) goes with it, as a run's does."""
    recipe = write_recipe(tmp_path / "r.yaml", """
name: clean
data: {source: digits, calibration: {samples: 16}, evaluation: {limit: 50}}
passes: [export_onnx, {quantize_ptq: {backend: onnxruntime}}]
targets: [onnxruntime]
""" + EVALUATION)
    out = tmp_path / "out"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    run = [sys.executable, "-m", "compressor", str(model_files["pickle"]), "--recipe", str(recipe), "--out", str(out),
           "-q", "--trust-model", *cache]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = tmp_path / "tmpdir"
    fresh.mkdir()
    proc = subprocess.run([sys.executable, "-m", "compressor", "explain", str(out), "--images", "16",
                           "--trust-model", *cache], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "TMPDIR": str(fresh)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "explain.json").is_file()
    assert sorted(p.name for p in fresh.iterdir()) == []


def test_tidy_keeps_what_this_process_did_not_make(tmp_path, monkeypatch):
    """torchrun's worker directories go, the last worker out taking the tree; a directory holding a
    file stays, and so does a .ses older than this process (another program's)."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    attempt = tmp_path / "torchelastic_x1" / "run_ab" / "attempt_0"
    for rank in ("0", "1"):
        (attempt / rank).mkdir(parents=True)
    kept = tmp_path / "torchelastic_x2" / "run_cd" / "attempt_0" / "0"
    kept.mkdir(parents=True)
    (kept / "stdout.log").write_text("asked for\n")
    ses = tmp_path / ORT_SESSION_FILE
    ses.write_text("1\n")
    os.utime(ses, (time.time() - 10 * 86400,) * 2)

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "0" / "error.json"))
    tidy_tmpdir(tmp_path)
    assert not (attempt / "0").exists() and (attempt / "1").is_dir()  # rank 1 still runs
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(attempt / "1" / "error.json"))
    tidy_tmpdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(kept / "error.json"))
    tidy_tmpdir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ORT_SESSION_FILE, "torchelastic_x2"]
    assert (kept / "stdout.log").is_file()
