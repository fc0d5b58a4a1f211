"""Faults a user meets (issue 21): a real full disk under the pass cache and under --out, models
that return more than one logits tensor, non-finite weights, build-engine on a finished engine.

Every refusal is run through the CLI as a user would: exit 2, one line on stderr, no traceback,
nothing half-written left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

from .conftest import PREP, SHAPE, cli, one_error_line, write_recipe
from .test_bad_input import FAST_RECIPE, _leftovers, _run


@pytest.fixture
def fast_recipe(tmp_path):
    d = tmp_path / "recipes"
    d.mkdir()
    return write_recipe(d / "fast.yaml", FAST_RECIPE)


# ------------------------------------------------------------------ a real full disk


@pytest.fixture
def small_fs(tmp_path):
    """``make(name, free_bytes)``: a directory on a real tmpfs of its own with about ``free_bytes``
    left (the rest taken by a filler file). Needs the right to mount (root, or CAP_SYS_ADMIN);
    skipped with the reason where it is not given."""
    mounted: list[Path] = []

    def make(name: str, free_bytes: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        size = 4 * 1024 * 1024
        if shutil.which("mount") is None:
            pytest.skip("cannot mount a small tmpfs here: no mount command")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {(r.stderr or r.stdout).strip() or r.returncode}")
        mounted.append(d)
        st = os.statvfs(d)
        with open(d / ".filler", "wb") as fh:
            fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free_bytes))
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != ".filler")


def test_real_full_disk_under_the_pass_cache(tmp_path, capsys, model_files, fast_recipe, small_fs):
    cache = small_fs("cache", 8 * 1024)  # room for the probe, not for the fused model
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, model_files["pickle"], fast_recipe, out, "--cache-dir", cache)
    line = one_error_line(code, stdout, err)
    assert "pass cache entry" in line and "--no-cache" in line
    assert _entries(cache) == []  # no half-written entry, no staging left
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.fixture
def wide_model(tmp_path) -> Path:
    """An untrained pickled model of about 800 KB (a wide linear layer): its engine is far larger
    than a run's report, so a disk can hold the report and not the engine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    d = tmp_path / "models"
    d.mkdir(exist_ok=True)
    torch.save(model, d / "wide.pt")
    (d / "wide.json").write_text(json.dumps({"input_shape": SHAPE, "preprocessing": PREP.model_dump(),
                                             "classes": [str(i) for i in range(10)]}))
    return d / "wide.pt"


def test_real_full_disk_under_out(tmp_path, capsys, wide_model, fast_recipe, small_fs):
    disk = small_fs("disk", 256 * 1024)  # room for a report, not for the 800 KB engine
    out = disk / "out"
    code, stdout, err = _run(capsys, wide_model, fast_recipe, out, "--cache-dir", tmp_path / "cache")
    line = one_error_line(code, stdout, err)  # was: exit 1 and a report of 0 engines
    assert "No space left on device" in line and ".partial-" not in line
    assert f"cannot write engine {out}/engines/" in line  # where it was to go
    assert _entries(disk) == []  # nothing left: neither the output nor its staging


# ------------------------------------------------------------------ models that return more than the logits


class TwoHeads(nn.Module):
    """Logits and an auxiliary head, returned as a tuple (logits first: "pair"), a named tuple or a dict."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head, self.aux = nn.Linear(8, 10), nn.Linear(8, 4)

    def forward(self, x):
        f = self.features(x)
        logits, aux = self.head(f), self.aux(f)
        if self.kind == "dict":
            return {"aux": aux, "logits": logits}
        if self.kind == "named":
            return Heads(aux, logits)
        if self.kind == "pair":
            return logits, aux
        return aux, logits


class Heads(NamedTuple):
    aux: torch.Tensor
    logits: torch.Tensor


def _save(model: nn.Module, path: Path, form: str) -> Path:
    example = torch.zeros(SHAPE)
    if form == "pickle":
        torch.save(model, path)
    elif form == "torchscript":
        torch.jit.save(torch.jit.trace(model, example, strict=False), str(path))
    elif form == "exported":
        torch.export.save(torch.export.export(model, (example,)), str(path))
    else:
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], opset_version=17)
    path.with_suffix(".json").write_text(json.dumps({"input_shape": SHAPE, "preprocessing": PREP.model_dump(),
                                                     "classes": [str(i) for i in range(10)]}))
    return path


SUFFIX = {"pickle": ".pt", "torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}


def _recipe_with(tmp_path: Path, model_section: str) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", FAST_RECIPE.replace("name: fast\n", f"name: fast\n{model_section}"))


@pytest.mark.parametrize("kind, form, says", [
    ("pair", "pickle", "returns a tuple of 2 outputs (0: tensor [1, 10], 1: tensor [1, 4])"),  # was a TypeError
    ("tuple", "pickle", "returns a tuple of 2 outputs (0: tensor [1, 4], 1: tensor [1, 10])"),
    ("dict", "pickle", "returns a dict (aux: tensor [1, 4], logits: tensor [1, 10]); compressor needs one logits "
                       "tensor (batch, classes): say which output holds the logits with model.output in the recipe "
                       "(e.g. model.output: logits)"),
    ("tuple", "torchscript", "returns a tuple of 2 outputs"),
])
def test_model_with_several_outputs_is_refused_at_intake(tmp_path, capsys, fast_recipe, kind, form, says):
    torch.manual_seed(0)
    model = _save(TwoHeads(kind).eval(), tmp_path / f"two{SUFFIX[form]}", form)
    out = tmp_path / "out"
    line = one_error_line(*_run(capsys, model, fast_recipe, out))  # was: a TypeError in fuse, a traceback
    assert says in line and "one logits tensor" in line and "model.output" in line, line
    assert not out.exists()


@pytest.mark.parametrize("kind, form, output", [
    ("tuple", "pickle", "1"),
    ("dict", "pickle", "logits"),
    ("named", "pickle", "logits"),
    ("tuple", "torchscript", "-1"),
    ("dict", "exported", "logits"),
])
def test_model_output_picks_the_logits(tmp_path, capsys, kind, form, output):
    torch.manual_seed(0)
    source = TwoHeads(kind).eval()
    model = _save(source, tmp_path / f"two{SUFFIX[form]}", form)
    recipe = _recipe_with(tmp_path, f"model: {{output: {output}}}\n")
    out = tmp_path / "out"
    code, _, err = _run(capsys, model, recipe, out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    engine = next(r for r in report["results"] if r["name"] == "onnxruntime-fp32")
    assert engine["agreement"] == 100.0  # the engine gives the logits (10 classes), not the aux head


@pytest.mark.parametrize("output, says", [
    ("5", "model.output 5 is not an index of its 2 outputs (0 to 1)"),
    ("scores", "model.output 'scores' is not an index of its 2 outputs"),
])
def test_model_output_that_names_no_output(tmp_path, capsys, output, says):
    model = _save(TwoHeads("tuple").eval(), tmp_path / "two.pt", "pickle")
    line = one_error_line(*_run(capsys, model, _recipe_with(tmp_path, f"model: {{output: {output}}}\n"),
                                tmp_path / "out"))
    assert says in line, line


def test_model_output_for_a_model_with_one_output(tmp_path, capsys, model_files):
    line = one_error_line(*_run(capsys, model_files["pickle"], _recipe_with(tmp_path, "model: {output: 0}\n"),
                                tmp_path / "out"))
    assert "model.output is 0, but the model returns one tensor [1, 10]: leave model.output out" in line


# ------------------------------------------------------------------ NaN or infinite weights


def _poisoned(trained: nn.Module, where: str, value: float) -> nn.Module:
    import copy

    model = copy.deepcopy(trained)
    model.state_dict()[where].view(-1)[2] = value  # the state dict shares the model's storage
    return model


@pytest.mark.parametrize("form, where, value, says", [
    ("pickle", "4.weight", float("nan"), "parameter '4.weight' holds 1 NaN value (of 4608)"),
    ("pickle", "1.running_var", float("inf"), "buffer '1.running_var' holds 1 infinite value (of 16)"),
    ("exported", "10.bias", float("-inf"), "parameter '10.bias' holds 1 infinite value (of 10)"),
    ("onnx", "10.weight", float("nan"), "initializer '10.weight' holds 1 NaN value (of 320)"),
])
def test_non_finite_weights_are_refused_at_intake(tmp_path, capsys, trained_tiny, fast_recipe, form, where, value,
                                                  says):
    model = _save(_poisoned(trained_tiny, where, value).eval(), tmp_path / f"nan{SUFFIX[form]}", form)
    if form == "onnx":  # fuse takes torch models: an ONNX model goes to its target as it is
        fast_recipe.write_text(FAST_RECIPE.replace("passes:\n  - fuse\n", "passes: []\n"))
    out = tmp_path / "out"
    line = one_error_line(*_run(capsys, model, fast_recipe, out))  # was: "AssertionError: scale issue" in PTQ
    assert "the model's weights are not finite" in line and says in line, line
    assert not out.exists()


# ------------------------------------------------------------------ build-engine on a finished engine


@pytest.mark.parametrize("target, config, form", [
    ("openvino", {}, "pickle"), ("tflite", {"quantization": "none"}, "pickle"), ("onnxruntime", {}, "onnx")])
def test_build_engine_on_a_built_engine(tmp_path, capsys, model_files, target, config, form):
    from compressor.intake import load_model
    from compressor.registry import get_target

    kind = get_target(target)
    if not kind.availability().ok:
        pytest.skip(f"{target} cannot build here: {kind.availability().reason}")
    engine = kind(config, step=target).build(load_model(model_files[form], trust=True), tmp_path / "engines")
    before = {p.name: p.read_bytes() for p in engine.path.parent.iterdir()}
    capsys.readouterr()  # what the build printed
    line = one_error_line(*cli(capsys, "build-engine", engine.path.parent))  # was: model file not found: model.onnx
    assert f"holds a built {target} engine: nothing to build" in line
    assert "build-engine builds an engine that compress wrote but could not build" in line
    assert {p.name: p.read_bytes() for p in engine.path.parent.iterdir()} == before
