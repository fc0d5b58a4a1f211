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


# ---------------------------------------------------------------------- issue 21: values that were silently taken


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    """YAML keeps the last of two equal keys; `device:` twice would silently take the second."""
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ndevice: x86-amx\ntargets: [openvino]\ndevice: x86-avx2\n")
    with pytest.raises(ConfigError, match=r"at line 4, column 1: duplicate key 'device' \(first given at line 2\)"):
        load_recipe(p)
    p.write_text("name: x\ntargets:\n  - tflite: {quantization: int8, quantization: fp16}\n")  # nested, one line
    with pytest.raises(ConfigError, match=r"line 3, column \d+: duplicate key 'quantization'"):
        load_recipe(p)
    # a merge key is not a duplicate: the mapping's own key overrides the merged one
    p.write_text("name: x\ntargets:\n  - tflite: &t {quantization: int8, samples: 8}\n"
                 "baselines:\n  - tflite: {<<: *t, samples: 16}\n")
    recipe, _ = load_recipe(p)
    assert recipe.baselines == [{"tflite": {"quantization": "int8", "samples": 16}}]


@pytest.mark.parametrize("raw, path", [
    (_raw(targets=[{"tflite": {"max_drop": float("inf")}}]), "targets[0].tflite.max_drop: must be a finite number"),
    (_raw(acceptance={"max_top1_drop": float("nan")}), "acceptance.max_top1_drop: must be a finite number"),
    (_raw(evaluation={"latency_min_seconds": float("inf")}), "evaluation.latency_min_seconds: must be a finite"),
    (_raw(passes=[{"quantize_ptq": {"backend": "openvino", "max_drop": -float("inf")}}]),
     "passes[0].quantize_ptq.max_drop: must be a finite number"),
    # a string YAML does not read as a float, turned into one by pydantic: the section's own check
    (_raw(acceptance={"max_latency_ms": "inf"}), "acceptance.max_latency_ms: Input should be a finite number"),
    (_raw(evaluation={"throughput_seconds": "Infinity"}), "evaluation.throughput_seconds: must be a finite"),
    (_raw(passes=[{"quantize_qat": {"train": {"lr": "inf"}}}]), "passes[0].quantize_qat.train.lr: must be a finite"),
])
def test_nan_and_infinity_are_refused_everywhere(raw, path):
    with pytest.raises(ConfigError) as err:
        parse_recipe(raw, source="r.yaml")
    assert path in str(err.value), str(err.value)


def test_yaml_infinity_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(TINY_RECIPE.replace("  - openvino\n",
                                     "  - openvino\n  - tflite: {quantization: int8, max_drop: .inf}\n"))
    with pytest.raises(ConfigError, match=r"targets\[1\].tflite.max_drop: must be a finite number, got inf"):
        load_recipe(p)


@pytest.mark.parametrize("config, says", [
    ({"quantization": "fp16", "max_drop": 0.5}, "quantization fp16 has no layers to keep in float"),
    ({"quantization": "dynamic_int8", "max_drop": 0.5}, "quantization dynamic_int8 has no layers"),
    ({"quantization": "none", "max_drop": 0.5}, "quantization none has no layers"),
    ({"quantization": "int8", "int8_method": "ai_edge_quantizer", "max_drop": 0.5},
     "max_drop applies to int8_method pt2e only"),
])
def test_tflite_max_drop_where_nothing_honours_it_is_refused(config, says):
    with pytest.raises(ConfigError) as err:
        parse_recipe(_raw(targets=[{"tflite": config}]), source="r.yaml")
    assert "targets[0].tflite" in str(err.value) and says in str(err.value), str(err.value)
    parse_recipe(_raw(targets=[{"tflite": {"quantization": "int8", "max_drop": 0.5}}]))  # PT2E INT8 honours it


def test_a_target_outside_the_devices_profile_is_refused():
    recipe = parse_recipe(_raw(device="jetson-orin", passes=["fuse"], targets=["tensorrt", "openvino"]))
    with pytest.raises(ConfigError, match=r"targets\[1\].openvino: device 'jetson-orin' does not run 'openvino' "
                                          r"engines \(it runs: tensorrt, onnxruntime\)"):
        recipe.check(Form.TORCH)
    recipe = parse_recipe(_raw(device="arm64", passes=["fuse"], targets=["tflite"], baselines=["openvino"]))
    with pytest.raises(ConfigError, match=r"baselines\[0\].openvino: device 'arm64'"):
        recipe.check(Form.TORCH)
    # host names no device: a target this machine cannot build is reported "not built here" instead
    parse_recipe(_raw(passes=["fuse", "export_onnx"], targets=["tensorrt", "openvino"])).check(Form.TORCH)
