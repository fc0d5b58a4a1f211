"""Honest records and diagnoses (issue 10, items 9, 11 and 12): the calibration images really used,
messages that name what is wrong with a model file or a preprocessing field, and benchmarks that say
which package they miss before they measure."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.data import DataConfig, open_data
from compressor.errors import ModelLoadError
from compressor.intake import load_model

from .conftest import TINY_RECIPE, cli, one_error_line, write_recipe

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
DIGITS_TRAIN = 1347  # images in the digits training split (75% of 1,797)


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)


# ------------------------------------------------------------------ 9: calibration samples used


def test_calibration_count_is_what_the_split_gives():
    data = open_data(DataConfig(source="digits", calibration={"samples": 100_000}))
    assert data.calibration_count() == DIGITS_TRAIN
    assert len(data.calibration_images((8, 8), "L")) == DIGITS_TRAIN  # what a pass really gets
    assert data.calibration_count(64) == 64
    assert open_data(DataConfig(source="digits", calibration={"samples": 64})).calibration_count() == 64


def test_calibration_fingerprint_follows_the_images_used():
    """5000 and 100000 of a 1347-image split are the same images: one cache key, one fingerprint."""
    def fp(n):
        return open_data(DataConfig(source="digits", calibration={"samples": n})).fingerprint("calibration")

    assert fp(5000) == fp(100_000) == fp(DIGITS_TRAIN)
    assert fp(64) != fp(5000)


def test_open_data_warns_when_the_split_is_smaller_than_asked(caplog):
    with caplog.at_level(logging.WARNING, logger="compressor.data"):
        open_data(DataConfig(source="digits", calibration={"samples": 100_000}))
    assert any("100000" in r.getMessage() and str(DIGITS_TRAIN) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compressor.data"):
        open_data(DataConfig(source="digits", calibration={"samples": 64}))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_report_records_calibration_samples_requested_and_used(tmp_path, capsys, model_files):
    r = write_recipe(tmp_path / "many.yaml", TINY_RECIPE.replace("calibration: {samples: 64}",
                                                                  "calibration: {samples: 100000}"))
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, model_files["pickle"], "-r", r, "--trust-model", "-o", out, "-q")
    assert code == 0, err
    cal = json.loads((out / "report.json").read_text())["data"]["calibration"]
    assert cal["samples_requested"] == 100_000
    assert cal["samples_used"] == DIGITS_TRAIN
    md = (out / "report.md").read_text()
    assert f"calibration {DIGITS_TRAIN} images" in md
    warning = [line for line in md.splitlines() if "warning" in line]
    assert len(warning) == 1 and "100000" in warning[0] and str(DIGITS_TRAIN) in warning[0]


# ------------------------------------------------------------------ 11: model files


class _Runs:
    """Pickles as a call of os.system (posix.system here): what a malicious "model" file holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save(_Runs(f"touch {marker}"), path)
    return path, marker


def test_blocked_global_is_named_and_not_run_without_trust(tmp_path, capsys, recipe, malicious):
    path, marker = malicious
    line = one_error_line(*cli(capsys, path, "-r", recipe, "-o", tmp_path / "out", "-q"))
    assert "posix.system" in line and "would run" in line
    assert "corrupt" not in line and "weights_only" not in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_blocked_global_with_trust_is_the_users_call_and_not_called_corrupt(tmp_path, capsys, recipe, malicious,
                                                                           caplog):
    path, marker = malicious
    with caplog.at_level(logging.WARNING, logger="compressor.intake"), pytest.raises(ModelLoadError):
        load_model(path, trust=True)
    assert any("posix.system" in r.getMessage() for r in caplog.records)  # the user is told what it runs
    marker.unlink()  # and it ran: --trust-model unpickles, as the user said
    line = one_error_line(*cli(capsys, path, "-r", recipe, "--trust-model", "-o", tmp_path / "out", "-q"))
    assert "corrupt" not in line and "weights_only" not in line
    assert "not a model or a state dict" in line  # os.system's return value
    assert marker.exists()


def test_random_bytes_are_corrupt_without_torchs_weights_only_hint(tmp_path, capsys, recipe):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    for trust in ([], ["--trust-model"]):
        line = one_error_line(*cli(capsys, path, "-r", recipe, *trust, "-o", tmp_path / "out", "-q"))
        assert "corrupt or not a torch file" in line
        assert "weights_only" not in line and "likely succeed" not in line


def test_state_dict_mismatch_names_missing_unexpected_and_misshaped_keys(tmp_path, capsys, recipe):
    import torchvision

    state = torchvision.models.resnet18(num_classes=10).state_dict()
    del state["layer1.0.conv1.weight"]
    state["head.extra.weight"] = torch.zeros(3)
    state["fc.bias"] = torch.zeros(7)
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    line = one_error_line(*cli(capsys, path, "-r", recipe, "--arch", "torchvision:resnet18", "--num-classes", "10",
                                 "-o", tmp_path / "out", "-q"))
    assert "does not fit torchvision:resnet18" in line
    assert "missing key (first: layer1.0.conv1.weight)" in line
    assert "unexpected key (first: head.extra.weight)" in line
    assert "fc.bias is [7] in the file, [10] in the model" in line


BAD_PREPROCESSING = [
    ("{std: [0.5, 0, 0.5]}", "preprocessing.std.1"),
    ("{std: [-1]}", "preprocessing.std.0"),
    ("{mean: [0.5, 0.5]}", "preprocessing.mean"),
    ("{scale: 0}", "preprocessing.scale"),
]


@pytest.mark.parametrize("prep, field", BAD_PREPROCESSING)
def test_bad_preprocessing_in_the_recipe_is_refused_by_the_schema(tmp_path, capsys, model_files, prep, field):
    r = write_recipe(tmp_path / "prep.yaml", TINY_RECIPE + f"preprocessing: {prep}\n")
    line = one_error_line(*cli(capsys, "validate", r))
    assert field in line
    line = one_error_line(*cli(capsys, model_files["pickle"], "-r", r, "--trust-model", "-o", tmp_path / "out",
                                 "-q"))
    assert field in line and "scale issue" not in line
    assert not (tmp_path / "out").exists()


def test_bad_preprocessing_in_model_json_is_named_with_its_field(tmp_path, capsys, model_files, recipe):
    path = tmp_path / "m.pt"
    shutil.copy(model_files["pickle"], path)
    meta = json.loads(model_files["pickle"].with_suffix(".json").read_text())
    meta["preprocessing"]["std"] = [0.5, 0.0, 0.5]
    path.with_suffix(".json").write_text(json.dumps(meta))
    line = one_error_line(*cli(capsys, path, "-r", recipe, "--trust-model", "-o", tmp_path / "out", "-q"))
    assert "m.json" in line and "preprocessing.std.1" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 12: benchmark extras


CORE_IMPORTS = {"torch", "torchvision", "onnx", "onnxscript", "onnxslim", "onnxruntime", "openvino", "nncf",
                "torch_pruning", "numpy", "PIL", "sklearn", "pydantic", "yaml", "click", "rich", "matplotlib"}
# import name -> what the bench extra must bring (directly or through the extras it names)
BENCH_IMPORTS = {"torchao": "torchao"}


def _benchmark_imports() -> set[str]:
    names: set[str] = set()
    for path in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"compressor"} - {p.stem for p in BENCH.glob("*.py")}


def test_bench_extra_covers_every_import_of_the_benchmarks():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    bench = " ".join(extras["bench"])
    outside_core = _benchmark_imports() - CORE_IMPORTS
    assert outside_core <= set(BENCH_IMPORTS), outside_core  # a new import needs a line in the extra
    for package in (BENCH_IMPORTS[m] for m in outside_core):
        assert package in bench
    assert "tflite" in bench and "tensorrt-qdq" in bench  # the TFLite and TensorRT QDQ rows they read
    assert ".[bench]" in (REPO / "README.md").read_text()


@pytest.fixture
def bench_common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    return _common


def test_require_modules_passes_when_present(bench_common, capsys):
    pytest.importorskip("matplotlib")
    bench_common.require_modules("matplotlib", "numpy", benchmark="peers")
    assert capsys.readouterr().err == ""


def test_require_modules_exits_2_with_one_line(bench_common, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as stop:
        bench_common.require_modules("matplotlib", "no_such_module_xyz", "numpy", benchmark="peers")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["benchmark peers needs matplotlib, no_such_module_xyz: pip install -e '.[bench]'"]


def test_peers_checks_its_imports_before_measuring(bench_common, capsys, monkeypatch):
    import peers

    def measure(*_a, **_k):
        raise AssertionError("measured although a module is missing")

    monkeypatch.setattr(peers, "run_model", measure)
    monkeypatch.setattr(sys, "argv", ["peers.py", "mobilenetv2"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as stop:
        peers.main()
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("benchmark peers needs matplotlib") and line.endswith(": pip install -e '.[bench]'")
