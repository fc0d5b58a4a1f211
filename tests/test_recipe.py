import pytest
import yaml

from compressor.artifact import Form
from compressor.errors import ConfigError, PipelineOrderError
from compressor.recipe import load_recipe, parse_recipe, shipped_recipes

from .conftest import TINY_RECIPE


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipes_validate_and_chain(name):
    recipe, _ = load_recipe(name)
    forms = recipe.check(Form.TORCH)
    assert forms[0] is Form.TORCH and len(forms) == len(recipe.passes) + 1


def test_literal_recipe_names_resolve():
    assert load_recipe("int8_jetson.yaml")[1].name == "int8_jetson.yaml"
    assert load_recipe("int8_cpu_openvino")[1].name == "int8_cpu_openvino.yaml"
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe("no_such_recipe.yaml")


def _raw(**changes):
    raw = yaml.safe_load(TINY_RECIPE)
    raw.update(changes)
    return raw


@pytest.mark.parametrize("raw, path", [
    (_raw(pases=[]), "pases: unknown key"),
    (_raw(evaluation={"threads": "two"}), "evaluation.threads"),
    (_raw(data={"source": "digits", "calibration": {"samples": 0}}), "data.calibration.samples"),
    (_raw(passes=[{"quantize_ptq": {"backend": "openvino", "calibraton": "minmax"}}]),
     "passes[0].quantize_ptq.calibraton: unknown key"),
    (_raw(passes=[{"quantize_ptq": {"backend": "openvino", "calibration": "entropy"}}]),
     "passes[0].quantize_ptq: Value error, calibration 'entropy' is not available with backend openvino"),
    (_raw(passes=["frobnicate"]), "passes[0]: unknown pass 'frobnicate'"),
    (_raw(targets=[{"openvino": {"precision_hint": "int4"}}]), "targets[0].openvino.precision_hint"),
    (_raw(acceptance={"max_top1_drop": -1}), "acceptance.max_top1_drop"),
])
def test_bad_recipes_name_the_field(raw, path):
    with pytest.raises(ConfigError) as err:
        parse_recipe(raw, source="r.yaml")
    assert path in str(err.value)


def test_impossible_order_names_the_step():
    recipe = parse_recipe(_raw(passes=[{"quantize_ptq": {"backend": "onnxruntime"}}, "export_onnx"]))
    with pytest.raises(PipelineOrderError, match=r"passes\[0\].quantize_ptq.*put export_onnx before it"):
        recipe.check(Form.TORCH)
    recipe = parse_recipe(_raw(passes=["export_onnx", "fuse"]))
    with pytest.raises(PipelineOrderError, match=r"passes\[1\].fuse: pass 'fuse' cannot take an onnx model"):
        recipe.check(Form.TORCH)
    recipe = parse_recipe(_raw(passes=[{"quantize_ptq": {"backend": "openvino"}}], targets=["onnxruntime"]))
    with pytest.raises(PipelineOrderError, match=r"targets\[0\].onnxruntime"):
        recipe.check(Form.TORCH)


def test_recipe_round_trips_through_yaml():
    recipe, _ = load_recipe("int8_cpu_openvino")
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_invalid_yaml_reports_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\npasses: [fuse\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(p)
