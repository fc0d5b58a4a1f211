"""What calibration saw and whether more would help: images per class in the report, and
data.calibration.samples as a list (a sweep: validation top-1 per size, never on the test split)."""

from __future__ import annotations

import hashlib
import json

import torch

from .conftest import SHAPE, cli, digits_tensors, one_error_line, write_recipe

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


class _Outlier(torch.nn.Module):
    """A conv whose output holds one planted outlier (1000 at one position, its other values within a
    few units) before a ReLU: minmax must take the outlier into the range, entropy clips it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        bump = torch.zeros(1, 8, 16, 16)
        bump[0, 0, 0, 0] = 1000.0
        self.register_buffer("bump", bump)
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.conv(x) + self.bump)


def _activation_scales(path) -> dict[str, float]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and inits[n.input[1]].size == 1}


def test_onnxruntime_entropy_calibration_is_not_minmax(tmp_path):
    """ORT's entropy calibrator with quantize_static's default bins (128 and 128) has one candidate
    threshold, the whole range: its engine was byte-identical to minmax's (issue 21)."""
    from compressor.artifact import Form, InputSpec, ModelArtifact
    from compressor.passes._ptq import onnxruntime_static
    from compressor.passes.quantize_ptq import QuantizePTQConfig

    torch.manual_seed(0)
    source = tmp_path / "outlier.onnx"
    torch.onnx.export(_Outlier().eval(), (torch.zeros(SHAPE),), str(source), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, opset_version=17)
    x = digits_tensors("train")[0][:32].numpy()
    engines, metrics = {}, {}
    for method in ("minmax", "entropy"):
        work = tmp_path / method
        work.mkdir()
        config = QuantizePTQConfig(backend="onnxruntime", calibration=method, reduce_range=False)
        res = onnxruntime_static.quantize(ModelArtifact(Form.ONNX, path=source, input_spec=InputSpec(shape=SHAPE)),
                                          x, config, work, "quantize_ptq")
        engines[method], metrics[method] = res.artifact.path, res.metrics
        assert sorted(p.name for p in work.iterdir()) == ["model.onnx"]  # no calibration cache left
    digest = {m: hashlib.sha256(p.read_bytes()).hexdigest() for m, p in engines.items()}
    assert digest["minmax"] != digest["entropy"]
    minmax, entropy = _activation_scales(engines["minmax"]), _activation_scales(engines["entropy"])
    outlier = max(minmax, key=minmax.get)  # the tensor that holds the planted 1000
    assert minmax[outlier] > 0.9 * 1000 / 255  # minmax spans the outlier
    assert entropy[outlier] < minmax[outlier] / 2  # entropy clips it (0.98 against 3.92 where written)
    assert metrics["entropy"]["entropy_bins"] == {"histogram": 2048, "quantized": 256}
