"""Every shipped recipe on every intake form the README lists (issue 10, items 4 and 5).

The matrix runs each recipe in recipes/ through `compress` on the same tiny model as a pickled
module, TorchScript, a torch.export program and ONNX (a torchvision ResNet-18 for the state dict
with --arch), with no model.json beside any of them: the input shape comes from the file where it
has one (.pt2, ONNX) and from the data otherwise. The recipes keep their passes, targets and
branches; only what makes them slow is cut (data: the bundled digits; a step of training; a few
calibration images; short timing; no acceptance limits and no accuracy budget, which a tiny model
cannot be held to on every CPU's numerics).
Where a recipe's passes cannot take a form, the run (and `compress validate`, where the file name
tells the form) must refuse it in one line with exit 2 before anything runs.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compressor.artifact import Form
from compressor.data import DataConfig, open_data
from compressor.errors import ModelLoadError
from compressor.intake import load_model
from compressor.pass_base import PassContext
from compressor.passes.export_onnx import ExportOnnx
from compressor.passes.fuse import Fuse
from compressor.pipeline import PassCache
from compressor.recipe import SHIPPED_RECIPES, shipped_recipes

from .conftest import PREP, SHAPE, TINY_RECIPE, cli, error_line, write_recipe

FORMS = ("pickle", "torchscript", "exported", "state_dict", "onnx")
DIGITS_SHAPE = [1, 3, 8, 8]  # what the bundled digits give a model whose file names no shape

ONNX_IN = "cannot take an onnx model"  # every shipped recipe starts with a torch-only pass or target
EXPORTED_IN = "cannot take an exported model"  # training passes need a trainable nn.Module
TS_TRAIN = "a TorchScript model cannot be trained"
TS_PRUNE = "TorchScript models cannot be pruned"

# recipe -> form -> None (runs) or the refusal's text. Every shipped recipe must be listed.
EXPECT: dict[str, dict[str, str | None]] = {
    "ci_mobilenetv2_int8": {"onnx": ONNX_IN},
    "cpu_targets_side_by_side": {"onnx": ONNX_IN},
    "demo_digits": {"onnx": ONNX_IN},
    "int8_cpu_openvino": {"onnx": ONNX_IN},
    "int8_executorch": {"onnx": ONNX_IN},
    "int8_jetson": {"onnx": ONNX_IN},
    "int8_mobile_tflite": {"onnx": "target 'tflite' cannot take an onnx model"},
    "mobilenetv2_distill_resnet50": {"onnx": ONNX_IN, "exported": EXPORTED_IN, "torchscript": TS_TRAIN},
    "mobilenetv2_int8_budget": {"onnx": ONNX_IN},
    "mobilenetv2_prune_finetune": {"onnx": ONNX_IN, "exported": EXPORTED_IN, "torchscript": TS_PRUNE},
    "resnet50_prune_half_macs": {"onnx": ONNX_IN, "exported": EXPORTED_IN, "torchscript": TS_PRUNE},
    "resnet50_quarter_macs_int8": {"onnx": ONNX_IN, "exported": EXPORTED_IN, "torchscript": TS_PRUNE},
    # the input model only teaches here (logits, no feature loss): a TorchScript one can; distill
    # takes no torch.export program
    "resnet50_to_mobilenetv2_int8": {"onnx": ONNX_IN, "exported": EXPORTED_IN, "torchscript": None},
}

FAST_TRAIN = {"max_steps": 1, "batch_size": 16, "train_samples": 64, "val_samples": 20, "augment": False}
FAST_EVAL = {"batch_size": 64, "warmup": 1, "latency_runs": 10, "latency_min_seconds": 0, "latency_rounds": 1,
             "throughput_batch": 4, "throughput_seconds": 0.01}


@pytest.fixture(scope="module")
def bare_models(model_files, tmp_path_factory) -> dict[str, Path]:
    """The conftest's tiny model in every form, without the model.json the conftest writes beside it,
    and a (seeded, untrained) torchvision ResNet-18 state dict for --arch."""
    d = tmp_path_factory.mktemp("bare")
    out = {}
    for kind in ("pickle", "torchscript", "exported", "onnx"):
        out[kind] = d / model_files[kind].name
        shutil.copy(model_files[kind], out[kind])
    import torchvision

    torch.manual_seed(0)
    out["state_dict"] = d / "resnet18_weights.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), out["state_dict"])
    return out


FORM_ARGS = {"pickle": ["--trust-model"], "state_dict": ["--arch", "torchvision:resnet18"]}


def cheap(raw: dict, model: Path, teacher: Path) -> dict:
    """A shipped recipe with the same steps, made cheap enough for the tiny model."""
    raw = copy.deepcopy(raw)
    raw["model"] = {"path": str(model)}
    raw["preprocessing"] = PREP.model_dump()
    raw["data"] = {"source": "digits", "calibration": {"samples": 16}, "evaluation": {"limit": 20}}
    raw["evaluation"] = {**FAST_EVAL, "stages": raw.get("evaluation", {}).get("stages", False)}
    raw.pop("acceptance", None)

    def config(cfg: dict) -> dict:
        for key, value in list(cfg.items()):
            if key in ("train", "finetune") and isinstance(value, dict):
                cfg[key] = dict(FAST_TRAIN)
            elif key in ("teacher", "student") and isinstance(value, str) and not value.startswith("torchvision:"):
                cfg[key] = str(teacher)  # the shipped ones live in ../shared/models
            elif key == "samples":
                cfg[key] = 16
            elif key == "calibration_batch":
                cfg[key] = 8
            elif key == "round_to":  # the tiny model's 16- and 32-channel layers
                cfg[key] = 1
            elif key == "max_drop":  # a budget the tiny model meets on any CPU: this matrix tests the
                cfg[key] = 100.0  # forms; tests/test_tflite.py plants a layer that the budget must keep
            elif key == "validation_samples":
                cfg[key] = 50
        return cfg

    def steps(items: list) -> list:
        return [s if isinstance(s, str) else {n: config(dict(c or {})) for n, c in s.items()} for s in items]

    for section in ("passes", "targets", "baselines"):
        if section in raw:
            raw[section] = steps(raw[section])
    for branch in raw.get("branches", []):
        branch["passes"] = steps(branch.get("passes", []))
        branch["targets"] = steps(branch["targets"])
    return raw


def _one_line_error(code: int, out: str, err: str, expect: str) -> str | None:
    """None if (code, output) is a refusal in one line with exit 2 that says ``expect``; else what is wrong."""
    line = error_line(code, out, err)
    if line is None or expect not in line:
        return f"wanted exit 2 and one line saying {expect!r}, got exit {code}: {(err or out)[-600:]!r}"
    return None


def _check(name: str, form: str, models: dict[str, Path], tmp_path: Path, capsys) -> list[str]:
    refusal = EXPECT[name].get(form)
    raw = yaml.safe_load((SHIPPED_RECIPES / f"{name}.yaml").read_text())
    recipe = write_recipe(tmp_path / f"{name}-{form}.yaml", yaml.safe_dump(cheap(raw, models[form], models["pickle"])))
    problems = []

    # compress validate sees the form in the file name: .pt2 and .onnx; a .pt may be any torch form
    code, out, err = cli(capsys, "validate", recipe)
    form_refusal = refusal if refusal and "cannot take a" in refusal else None
    if form_refusal:
        wrong = _one_line_error(code, out, err, form_refusal)
        if wrong:
            problems.append(f"{form}: validate: {wrong}")
    elif code != 0:
        problems.append(f"{form}: validate exits {code}: {err[-400:]!r}")

    out_dir = tmp_path / f"out-{form}"
    code, out, err = cli(capsys, "run", "-r", recipe, *FORM_ARGS.get(form, []), "-o", out_dir, "-q", "--threads", "2")
    if "Traceback" in out + err:
        problems.append(f"{form}: traceback: {err[-800:]!r}")
    if refusal:
        wrong = _one_line_error(code, out, err, refusal)
        if wrong:
            problems.append(f"{form}: run: {wrong}")
        if out_dir.exists():
            problems.append(f"{form}: a refused run left {out_dir}")
        return problems
    if code != 0:
        written = out_dir / "report.json"
        said = json.loads(written.read_text()) if written.exists() else {}
        return [*problems, f"{form}: run exits {code}: {err[-800:]!r}; failures {said.get('failures')}, "
                           f"acceptance {said.get('acceptance')}"]
    report = json.loads((out_dir / "report.json").read_text())
    shape, source = (SHAPE, "model") if form in ("exported", "onnx") else (DIGITS_SHAPE, "data")
    if report["model_input"] != {"shape": shape, "source": source}:
        problems.append(f"{form}: model_input {report['model_input']}, wanted shape {shape} from {source}")
    names = [r["name"] for r in report["results"]]
    if "source" not in names or len(names) < 2:
        problems.append(f"{form}: measured only {names}")
    failed = [f for f in report["failures"] if not f["unavailable"]]  # TensorRT without a GPU: unavailable
    if failed:
        problems.append(f"{form}: targets failed: {failed}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("name", [Path(n).stem for n in shipped_recipes()])
def test_shipped_recipe_on_every_intake_form(name, bare_models, tmp_path, capsys):
    """One recipe, every form: runs (exit 0, a report, every buildable engine built and measured,
    the input shape and its source recorded), or is refused in one line with exit 2 and nothing
    written. All forms run before the assertion, so that a failure lists every broken form."""
    assert name in EXPECT, f"add the shipped recipe {name} to EXPECT: which forms it takes"
    problems = [p for form in FORMS for p in _check(name, form, bare_models, tmp_path, capsys)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------- the pieces, one by one


def test_fused_torchscript_is_cached_and_exports_to_onnx(model_files, tmp_path):
    """fuse on TorchScript: a frozen module that the pass cache saves (torch.jit.save) and loads back,
    and that the ONNX exporter takes (no MKL-DNN layout ops from optimize_for_inference)."""
    art = load_model(model_files["torchscript"])
    fused = Fuse()(art, PassContext(work_dir=tmp_path / "w")).artifact
    assert isinstance(fused.model, torch.jit.ScriptModule)
    cache = PassCache(tmp_path / "cache")
    stored = cache.put("k", fused, {})
    back, _ = cache.get("k")
    assert isinstance(back.model, torch.jit.ScriptModule) and back.content_hash() == stored.content_hash()
    x = torch.randn(2, *SHAPE[1:])
    with torch.inference_mode():
        torch.testing.assert_close(back.model(x), art.model(x), rtol=1e-4, atol=1e-4)
    (tmp_path / "e").mkdir()
    onnx_art = ExportOnnx()(back, PassContext(work_dir=tmp_path / "e")).artifact
    import onnx

    ops = {n.op_type for n in onnx.load(str(onnx_art.path)).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_exported_program_is_fused_on_its_fx_graph(model_files, tmp_path, capsys):
    """fuse takes a torch.export program: it folds BN on the ATen graph the program unpacks to and
    gives a torch (FX GraphModule) artifact that the cache can save; validate agrees."""
    art = load_model(model_files["exported"])
    assert Fuse().accepts(Form.EXPORTED)
    (tmp_path / "w").mkdir()
    res = Fuse()(art, PassContext(work_dir=tmp_path / "w"))
    assert res.artifact.form is Form.TORCH and isinstance(res.artifact.model, torch.fx.GraphModule)
    assert res.metrics["before"]["batch_norm"] == 2 and res.metrics["after"]["batch_norm"] == 0
    x = torch.randn(1, *SHAPE[1:])
    with torch.inference_mode():
        torch.testing.assert_close(res.artifact.model(x), art.torch_module()(x), rtol=1e-4, atol=1e-4)
    PassCache(tmp_path / "cache").put("k", res.artifact, res.metrics)
    back, _ = PassCache(tmp_path / "cache").get("k")
    with torch.inference_mode():
        torch.testing.assert_close(back.model(x), res.artifact.model(x))
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE + f"model: {{path: {model_files['exported']}}}\n")
    code, out, _ = cli(capsys, "validate", recipe)
    assert code == 0 and "forms exported -> torch -> openvino" in out


def _bare(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bare" / path.name
    dst.parent.mkdir(exist_ok=True)
    shutil.copy(path, dst)
    return dst


def test_input_shape_comes_from_model_recipe_model_json_then_data(model_files, tmp_path):
    """The order: the model's own static shape, model.input_shape in the recipe, model.json, the data."""
    ts = _bare(model_files["torchscript"], tmp_path)
    from_data = load_model(ts, fallback_shape=lambda color: [1, 3, 8, 8])
    assert from_data.input_spec.shape == [1, 3, 8, 8] and from_data.meta["input_shape_source"] == "data"
    recipe = load_model(ts, input_shape=[1, 3, 12, 12], fallback_shape=[1, 3, 8, 8])
    assert recipe.input_spec.shape == [1, 3, 12, 12] and recipe.meta["input_shape_source"] == "recipe"
    side = load_model(model_files["torchscript"], fallback_shape=[1, 3, 8, 8])  # the conftest's model.json
    assert side.input_spec.shape == SHAPE and side.meta["input_shape_source"] == "model.json"
    for kind in ("exported", "onnx"):  # their own shape, with no model.json
        own = load_model(_bare(model_files[kind], tmp_path), fallback_shape=[1, 3, 8, 8])
        assert own.input_spec.shape == SHAPE and own.meta["input_shape_source"] == "model"
    with pytest.raises(ModelLoadError, match=r"model.input_shape in the recipe is \[1, 3, 8, 8\], but .* takes input"):
        load_model(model_files["onnx"], input_shape=[1, 3, 8, 8])
    with pytest.raises(ModelLoadError, match="input shape of .* is unknown: neither the file, the recipe"):
        load_model(ts, fallback_shape=lambda color: None)


def test_data_gives_batch_1_its_image_size_and_channels(image_folder, tmp_path):
    from compressor.job import data_input_shape

    digits = open_data(DataConfig(source="digits"))
    assert data_input_shape(digits, "RGB") == [1, 3, 8, 8]
    assert data_input_shape(digits, "L") == [1, 1, 8, 8]
    assert data_input_shape(open_data(DataConfig(root=str(image_folder))), "RGB") == [1, 3, 12, 12]
    from PIL import Image

    Image.fromarray(np.zeros((20, 14, 3), np.uint8)).save(image_folder / "test" / "cat" / "big.png")
    assert data_input_shape(open_data(DataConfig(root=str(image_folder))), "RGB") is None  # sizes differ
    assert data_input_shape(None, "RGB") is None


def test_run_takes_the_shape_from_the_data_and_says_so(model_files, tmp_path, capsys, image_folder):
    """TorchScript with no model.json and a recipe with data: the run takes the data's image size and
    the report names it; with no data, or data of mixed sizes, it refuses in one line."""
    ts = _bare(model_files["torchscript"], tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE + f"preprocessing: {json.dumps(PREP.model_dump())}\n")
    out = tmp_path / "out"
    code, _, err = cli(capsys, ts, "-r", recipe, "-o", out, "-q", "--threads", "2")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["model_input"] == {"shape": DIGITS_SHAPE, "source": "data"}
    assert "- input shape: [1, 3, 8, 8] (from the data's image size)" in (out / "report.md").read_text()
    assert report["passes"][0]["name"] == "fuse" and report["passes"][0]["metrics"]["after"]["batch_norm"] == 0

    no_data = write_recipe(tmp_path / "nodata.yaml", "name: nodata\npasses: [fuse]\ntargets: [openvino]\n")
    code, stdout, err = cli(capsys, ts, "-r", no_data, "-o", tmp_path / "o2", "-q")
    assert _one_line_error(code, stdout, err, "input shape of") is None
    from PIL import Image

    Image.fromarray(np.zeros((20, 14, 3), np.uint8)).save(image_folder / "test" / "cat" / "big.png")
    mixed = write_recipe(tmp_path / "mixed.yaml", TINY_RECIPE.replace(
        "source: digits", f"source: folder\n  root: {image_folder}"))
    code, stdout, err = cli(capsys, ts, "-r", mixed, "-o", tmp_path / "o3", "-q")
    assert code == 2 and "nor the data (images of one size)" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
