"""The distributed path on CPU: the same CLI command under torchrun (2 processes, gloo) trains
with DDP and reports like a single-process run."""

import json
import subprocess
import sys

import pytest

from .conftest import write_recipe

RECIPE = """
name: ddp
data: {source: digits, calibration: {samples: 32}, evaluation: {limit: 300}}
passes:
  - prune_structured:
      channel_ratio: 0.25
      finetune: {epochs: 3, batch_size: 64, lr: 0.003, val_samples: 200, augment: false}
targets: [openvino]
evaluation: {warmup: 1, latency_runs: 10, latency_min_seconds: 0, throughput_batch: 8, throughput_seconds: 0.05}
"""


def _run(prefix, model, recipe, out, tmp_path):
    cmd = [*prefix, "-m", "compressor", str(model), "--recipe", str(recipe), "--trust-model", "--out", str(out),
           "-q", "--threads", "1", "--no-cache"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.timeout(900)
def test_torchrun_two_processes_match_single_process(tmp_path, model_files):
    recipe = write_recipe(tmp_path / "ddp.yaml", RECIPE)
    single = _run([sys.executable], model_files["pickle"], recipe, tmp_path / "single", tmp_path)
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
               model_files["pickle"], recipe, tmp_path / "ddp", tmp_path)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    s_train = single["passes"][0]["metrics"]["steps"][0]["finetune"]
    d_train = ddp["passes"][0]["metrics"]["steps"][0]["finetune"]
    assert d_train["world_size"] == 2 and s_train["world_size"] == 1
    assert d_train["steps"] == s_train["steps"]  # same global batch, same number of steps
    # the same accuracy within noise
    s_top1 = {r["name"]: r["top1"] for r in single["results"]}["openvino-fp32"]
    d_top1 = {r["name"]: r["top1"] for r in ddp["results"]}["openvino-fp32"]
    assert s_top1 > 50 and abs(s_top1 - d_top1) < 8, (s_top1, d_top1)
    assert not list((tmp_path).glob(".ddp.partial-*"))  # only the first process wrote output
