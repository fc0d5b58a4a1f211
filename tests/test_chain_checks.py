"""Checks of the whole chain before anything runs: a pass's preflight that raises (e.g. a library
that cannot handle the model) is one line and exit 2; a model is quantized once; every target's
engine gets its own name and directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.errors import PipelineOrderError

from .conftest import PREP, SHAPE, TINY_RECIPE, cli, one_error_line, write_recipe

EVALUATION = TINY_RECIPE[TINY_RECIPE.index("evaluation:"):]
DATA = "data:\n  source: digits\n  calibration: {samples: 32}\n"


def _meta(path: Path) -> Path:
    meta = {"input_shape": SHAPE, "preprocessing": PREP.model_dump(), "classes": [str(i) for i in range(10)]}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


# ---------------------------------------------------------------------- 3b: preflight failures


class HardCodedWidth(nn.Module):
    """Reshapes with a literal channel count, which Torch-Pruning's dependency graph cannot follow:
    its pruned copy fails in the dry run that plans the pruning (in the pass's preflight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(y.reshape(y.shape[0], 16, -1).mean(-1))


def test_preflight_exception_from_a_library_is_one_line_exit_2(tmp_path, capsys):
    model = tmp_path / "models" / "hardcoded.pt"
    model.parent.mkdir()
    torch.save(HardCodedWidth().eval(), model)
    _meta(model)
    recipe = write_recipe(tmp_path / "prune.yaml", "passes:\n  - prune_structured: {channel_ratio: 0.5}\n"
                                                   "targets:\n  - onnxruntime\n")
    out = tmp_path / "out"
    line = one_error_line(*cli(capsys, model, "-r", recipe, "--trust-model", "-o", out, "-q"))
    assert "passes[0].prune_structured" in line  # the recipe field
    assert "Torch-Pruning cannot prune this model" in line  # the library that could not
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in line  # the library's message
    assert not out.exists()


# ---------------------------------------------------------------------- 6: quantized once

EXPORT_ORT = "  - export_onnx\n  - quantize_ptq: {backend: onnxruntime}\n"


@pytest.mark.parametrize("passes, targets, expect", [
    (EXPORT_ORT + "  - quantize_ptq: {backend: onnxruntime}\n", "  - onnxruntime\n",
     "passes[2].quantize_ptq: the model is already quantized by passes[1].quantize_ptq"),
    ("  - quantize_ptq: {backend: openvino}\n  - quantize_qat: {}\n", "  - openvino\n",
     "passes[1].quantize_qat: the model is already quantized by passes[0].quantize_ptq"),
    ("  - quantize_qat: {}\n  - quantize_ptq: {backend: openvino}\n", "  - openvino\n",
     "passes[1].quantize_ptq: the model is already quantized by passes[0].quantize_qat"),
    (EXPORT_ORT, "  - onnxruntime\nbranches:\n  - name: again\n    passes:\n"
                 "      - quantize_ptq: {backend: onnxruntime}\n    targets: [onnxruntime]\n",
     "branches[0].passes[0].quantize_ptq: the model is already quantized by passes[1].quantize_ptq"),
], ids=["ptq_twice", "qat_after_ptq", "ptq_after_qat", "ptq_in_branch_after_ptq"])
def test_validate_refuses_a_second_quantization(tmp_path, capsys, passes, targets, expect):
    recipe = write_recipe(tmp_path / "q.yaml", DATA + "passes:\n" + passes + "targets:\n" + targets)
    line = one_error_line(*cli(capsys, "validate", recipe))
    assert expect in line


def test_run_refuses_a_second_quantization_before_anything(tmp_path, capsys, model_files):
    recipe = write_recipe(tmp_path / "q.yaml", DATA + "passes:\n" + EXPORT_ORT
                          + "  - quantize_ptq: {backend: onnxruntime}\ntargets:\n  - onnxruntime\n" + EVALUATION)
    out = tmp_path / "out"
    line = one_error_line(*cli(capsys, model_files["pickle"], "-r", recipe, "--trust-model", "-o", out, "-q"))
    assert "passes[2].quantize_ptq: the model is already quantized by passes[1].quantize_ptq" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _qdq_onnx(src: Path, dst: Path) -> Path:
    """``src`` with a QuantizeLinear/DequantizeLinear pair on its input: an already quantized graph."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(src))
    graph = proto.graph
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = [f"{name}_dq" if i == name else i for i in node.input]
    graph.initializer.extend([helper.make_tensor("qdq_scale", TensorProto.FLOAT, [], [0.02]),
                              helper.make_tensor("qdq_zero", TensorProto.UINT8, [], [128])])
    qdq = [helper.make_node("QuantizeLinear", [name, "qdq_scale", "qdq_zero"], [f"{name}_q"], name="input_q"),
           helper.make_node("DequantizeLinear", [f"{name}_q", "qdq_scale", "qdq_zero"], [f"{name}_dq"],
                            name="input_dq")]
    for i, node in enumerate(qdq):
        graph.node.insert(i, node)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))
    return _meta(dst)


def test_run_refuses_an_already_quantized_input_model(tmp_path, capsys, model_files):
    (tmp_path / "models").mkdir()
    model = _qdq_onnx(model_files["onnx"], tmp_path / "models" / "qdq.onnx")
    recipe = write_recipe(tmp_path / "q.yaml", DATA + "passes:\n  - quantize_ptq: {backend: onnxruntime}\n"
                                               "targets:\n  - onnxruntime\n" + EVALUATION)
    out = tmp_path / "out"
    line = one_error_line(*cli(capsys, model, "-r", recipe, "-o", out, "-q"))
    assert "passes[0].quantize_ptq: the input model is already quantized" in line
    assert "QuantizeLinear" in line
    assert not out.exists()


def test_preflight_refuses_an_int8_artifact(model_files):
    from compressor.data import DataConfig, open_data
    from compressor.intake import load_model
    from compressor.pipeline import Pipeline
    from compressor.registry import get_pass, get_target

    artifact = load_model(model_files["pickle"], trust=True)
    data = open_data(DataConfig(source="digits"))
    pipe = Pipeline([get_pass("quantize_qat")(step="passes[0].quantize_qat")], [get_target("openvino")()])
    pipe.preflight(artifact, data)  # a float model: fine
    artifact.meta["precision"] = "int8"
    with pytest.raises(PipelineOrderError, match=r"passes\[0\]\.quantize_qat: the input model is already quantized "
                                                 r"\(its metadata says precision int8\)"):
        pipe.preflight(artifact, data)
    Pipeline([get_pass("fuse")()], [get_target("openvino")()]).preflight(artifact, data)  # no quantization: fine


# ---------------------------------------------------------------------- 7: unique engine names


def test_two_targets_of_one_kind_get_their_own_engines_and_rows(tmp_path, capsys, model_files):
    recipe = write_recipe(tmp_path / "two.yaml", DATA + "targets:\n  - onnxruntime: {graph_optimization: all}\n"
                          "  - onnxruntime: {graph_optimization: basic}\n" + EVALUATION)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, model_files["pickle"], "-r", recipe, "--trust-model", "-o", out, "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    engines = sorted(p.name for p in (out / "engines").iterdir() if not p.name.startswith("."))
    assert engines == ["onnxruntime-fp32", "onnxruntime-fp32-2"]
    rows = [r for r in report["results"] if r["name"] != "source"]
    assert sorted(r["name"] for r in rows) == engines
    for r in rows:  # each row's engine file lives in the directory of its own name
        assert Path(r["engine"]).parent == out / "engines" / r["name"]
    configs = {r["name"]: json.loads((out / "engines" / r["name"] / "engine.json").read_text())["config"]
               for r in rows}
    assert configs == {"onnxruntime-fp32": {"graph_optimization": "all"},
                       "onnxruntime-fp32-2": {"graph_optimization": "basic"}}
    assert len({tuple(e["files"]) for e in report["engines"]}) == 2


def test_engine_names_are_suffixed_only_where_they_clash(model_files):
    from compressor.intake import load_model
    from compressor.pipeline import assign_engine_names
    from compressor.registry import get_target

    artifact = load_model(model_files["onnx"])
    ort_a, ort_b = get_target("onnxruntime")(), get_target("onnxruntime")(graph_optimization="basic")
    tfl_fp32, tfl_int8 = get_target("tflite")(quantization="none"), get_target("tflite")(quantization="int8")
    base = get_target("onnxruntime")()
    names = assign_engine_names([(artifact, [base], "source-"), (artifact, [ort_a, tfl_fp32, tfl_int8, ort_b], "")])
    assert [names[id(t)] for t in (base, ort_a, tfl_fp32, tfl_int8, ort_b)] == [
        "source-onnxruntime-fp32", "onnxruntime-fp32", "tflite-fp32", "tflite-int8", "onnxruntime-fp32-2"]
