"""The compress command: a good run, and bad input that must end in one line and exit 2."""

import json
import subprocess
import sys

import pytest


from .conftest import TINY_RECIPE, cli, write_recipe


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)


def test_run_writes_engines_and_report(tmp_path, capsys, model_files, recipe):
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out", out, "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert rows["source"]["target"] == "torch"
    for r in report["results"]:
        assert {"name", "target", "precision", "top1", "top5", "agreement", "latency_ms", "throughput_ips",
                "size_bytes"} <= set(r)
        assert {"p50", "p90", "p99"} <= set(r["latency_ms"])
    assert rows["openvino-int8"]["precision"] == "int8"
    engine = out / "engines" / "openvino-int8"
    assert rows["openvino-int8"]["size_bytes"] == sum(f.stat().st_size for f in engine.glob("model.*"))
    assert rows["openvino-int8"]["engine"] == str(engine / "model.xml")  # where it lives after the rename
    assert report["environment"]["threads"] == rows["source"]["threads"]
    assert "| openvino-int8 |" in (out / "report.md").read_text()
    # the INT8 engine's logits against the source's: a real error, far above noise, far from exact
    assert rows["source"]["output_sqnr_db"] is None and 10 < rows["openvino-int8"]["output_sqnr_db"] < 80
    assert "SQNR dB" in (out / "report.md").read_text()
    assert "openvino-int8" in stdout
    assert not list(tmp_path.glob(".out.partial-*"))


def test_missed_acceptance_exits_1_but_keeps_the_report(tmp_path, capsys, model_files):
    r = write_recipe(tmp_path / "strict.yaml", TINY_RECIPE + "acceptance: {min_speedup: 1000}\n")
    out = tmp_path / "out"
    code, stdout, _ = cli(capsys, model_files["pickle"], "-r", r, "--trust-model", "-o", out, "-q")
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert report["acceptance"]["passed"] is False
    assert "acceptance failed" in stdout


BAD_RECIPE = TINY_RECIPE.replace("backend: openvino", "backend: openvino, bogus: 1")
ORDER_RECIPE = TINY_RECIPE.replace("  - fuse\n", "  - quantize_ptq: {backend: onnxruntime}\n  - fuse\n")


@pytest.mark.parametrize("case, expect", [
    ("missing_model", "model file not found"),
    ("corrupt_model", "corrupt"),
    ("untrusted", "--trust-model"),
    ("unknown_arch", "unknown arch"),
    ("bad_recipe", "passes[1].quantize_ptq.bogus: unknown key"),
    ("order", "passes[0].quantize_ptq"),
    ("missing_data", "data directory not found"),
    ("class_count", "10 outputs but the data set has 3 classes"),
    ("input_shape", "rejects input shape"),
    ("missing_recipe", "recipe not found"),
    ("bad_option", "--threads"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, model_files, recipe, image_folder,
                                                         case, expect):
    out = tmp_path / "out"
    good = model_files["pickle"]
    args = {
        "missing_model": [tmp_path / "nope.pt", "-r", recipe],
        "corrupt_model": [write_recipe(tmp_path / "bad.pt", "garbage"), "-r", recipe],
        "untrusted": [good, "-r", recipe],
        "unknown_arch": [model_files["state_dict"], "-r", recipe, "--arch", "torchvision:nope"],
        "bad_recipe": [good, "-r", write_recipe(tmp_path / "b.yaml", BAD_RECIPE), "--trust-model"],
        "order": [good, "-r", write_recipe(tmp_path / "o.yaml", ORDER_RECIPE), "--trust-model"],
        "missing_data": [good, "-r", recipe, "--trust-model", "--data", tmp_path / "nowhere"],
        "class_count": [good, "-r", write_recipe(tmp_path / "c.yaml", TINY_RECIPE.replace(
            "source: digits", f"source: folder\n  root: {image_folder}")), "--trust-model"],
        "input_shape": [good, "-r", write_recipe(tmp_path / "s.yaml", TINY_RECIPE + "model: {input_shape: [1, 1, 16, 16]}\n"),
                        "--trust-model"],
        "missing_recipe": [good, "-r", tmp_path / "none.yaml"],
        "bad_option": [good, "-r", recipe, "--threads", "0", "--trust-model"],
    }[case]
    code, stdout, err = cli(capsys, *args, "-o", out, "-q")
    assert code == 2, (stdout, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0]
    assert "Traceback" not in err + stdout
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_validate_passes_and_targets(capsys, recipe):
    code, out, _ = cli(capsys, "validate", recipe)
    assert code == 0 and "forms torch -> torch -> openvino" in out
    code, out, _ = cli(capsys, "validate", "int8_jetson.yaml")
    assert code == 0 and "tensorrt" in out
    code, out, _ = cli(capsys, "passes")
    assert code == 0 and "quantize_ptq" in out and "calibration: " in out
    code, out, _ = cli(capsys, "targets")
    assert code == 0 and "openvino: " in out and "tensorrt: " in out
    assert "NOT available here" in out  # TensorRT: no CUDA device or no TensorRT here


def test_console_script_exit_code(tmp_path):
    """The installed entry point turns bad input into exit 2 in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "compressor", str(tmp_path / "nope.pt"), "--recipe", "int8_jetson"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model file not found")


def test_matplotlib_is_installed_with_the_package():
    """`pip install -e .` installs matplotlib, so a new user gets the PNGs the README promises."""
    from importlib.metadata import requires

    from compressor.plots import pyplot

    plain = [r for r in requires("compressor") or [] if "extra ==" not in r]
    assert any(r.startswith("matplotlib") for r in plain), plain
    assert pyplot() is not None
