"""The distributed path on CPU: the same CLI command under torchrun (2 processes, gloo) trains
with DDP and reports like a single-process run; the training loop under 2-process DDP takes the
steps one process takes (same batches, augmentation, batch-norm statistics, learning rates), so
both reach the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from .conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

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


def _run(prefix, model, recipe, out, tmp_path, env):
    cmd = [*prefix, "-m", "compressor", str(model), "--recipe", str(recipe), "--trust-model", "--out", str(out),
           "-q", "--threads", "1", "--no-cache"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_two_processes_match_single_process(tmp_path, model_files):
    recipe = write_recipe(tmp_path / "ddp.yaml", RECIPE)
    fresh = tmp_path / "tmpdir"  # a TMPDIR of its own: the runs must leave it as they found it
    fresh.mkdir()
    env = {**os.environ, "TMPDIR": str(fresh)}
    single = _run([sys.executable], model_files["pickle"], recipe, tmp_path / "single", tmp_path, env)
    ddp = _run(TORCHRUN, model_files["pickle"], recipe, tmp_path / "ddp", tmp_path, env)
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
    # torchrun's torchelastic_* log directories and ONNX Runtime's .ses are gone with the run
    assert sorted(p.name for p in fresh.iterdir()) == []


# ------------------------------------------------- the training loop: DDP takes one process's steps

CASES = {  # name: TrainConfig fields (the global batch split 32/32, and unevenly 23/22)
    "even": {"batch_size": 64},
    "uneven": {"batch_size": 45},
}


def _train_tiny(case: str, **override) -> tuple[dict, dict]:
    """A tiny conv net with batch norm (no dropout: each process draws its own masks; no bias before a
    batch norm: its gradient is rounding noise, which AdamW turns into steps of the learning rate's size)
    trained for a few steps with augmentation on: (state dict, figures of the run)."""
    from compressor.data import digits_source
    from compressor.training import TrainConfig, TrainData, train

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    src = digits_source("train")
    images = src.load_images(np.arange(len(src)), (12, 12), "RGB")
    data = TrainData(x_train=images[:600], y_train=src.labels[:600], x_val=images[600:800],
                     y_val=src.labels[600:800], mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.5, np.float32),
                     scale=1 / 255)
    cfg = TrainConfig(max_steps=8, optimizer="sgd", lr=0.05, schedule="cosine", warmup_fraction=0.25, augment=True,
                      bf16="off", channels_last="off", evals_per_epoch=4, **{**CASES[case], **override})
    result = train(model, data, cfg, description=f"ddp-{case}")
    figures = {"steps": result.steps, "world_size": result.world_size,
               "history": [{k: h[k] for k in ("step", "train_loss", "train_top1", "val_top1")} for h in result.history]}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, figures


@pytest.mark.slow
def test_ddp_training_takes_the_steps_of_one_process(tmp_path):
    """Two gloo processes and one process, the same config: the same steps, the same samples (their
    training loss and top-1 summed over the processes), and the same weights and batch-norm running
    statistics within float rounding, for a global batch that splits evenly and one that does not."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*TORCHRUN, "-m", "tests.test_distributed", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    torch.set_num_threads(1)
    for case in CASES:
        ddp_state = torch.load(out / f"{case}.pt")
        ddp_figures = json.loads((out / f"{case}.json").read_text())
        state, figures = _train_tiny(case)
        assert ddp_figures["world_size"] == 2 and figures["world_size"] == 1
        assert ddp_figures["steps"] == figures["steps"] == 8
        for d, s in zip(ddp_figures["history"], figures["history"], strict=True):
            assert d["step"] == s["step"], (case, d, s)
            assert abs(d["train_loss"] - s["train_loss"]) < 1e-3, (case, d, s)
            assert abs(d["train_top1"] - s["train_top1"]) <= 2, (case, d, s)  # an argmax tie may fall either way
        for name, s in state.items():
            if s.is_floating_point():
                torch.testing.assert_close(ddp_state[name], s, rtol=1e-3, atol=1e-4, msg=f"{case} {name}")
            else:
                assert torch.equal(ddp_state[name], s), (case, name)
    # a global batch smaller than the process count is refused before any step (it was split unevenly)
    assert (out / "refused.txt").read_text() == "train.batch_size 1 (600 training images) is less than one image " \
                                                 "for each of the 2 processes"


if __name__ == "__main__":  # one process of the torchrun job above
    torch.set_num_threads(1)
    dest = Path(sys.argv[1])
    for name in CASES:
        weights, figs = _train_tiny(name)
        if int(os.environ.get("RANK", "0")) == 0:
            dest.mkdir(parents=True, exist_ok=True)
            torch.save(weights, dest / f"{name}.pt")
            (dest / f"{name}.json").write_text(json.dumps(figs))
    from compressor.errors import ConfigError

    try:
        _train_tiny("even", batch_size=1)
    except ConfigError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            (dest / "refused.txt").write_text(str(exc))
