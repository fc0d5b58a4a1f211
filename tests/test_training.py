"""The shared training loop: a step whose loss is not finite makes no update; a loss that stays
NaN stops training with one clear error instead of a model of NaNs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor.training import MAX_NONFINITE_STEPS, TrainConfig, TrainData, cross_entropy_loss, train


def _data(n: int = 64) -> TrainData:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=n)
    return TrainData(x_train=x, y_train=y, x_val=x[:16], y_val=y[:16], mean=np.zeros(3), std=np.ones(3),
                     scale=1 / 255)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 4))


CFG = TrainConfig(max_steps=12, batch_size=16, lr=1e-2, augment=False, val_samples=0, bf16="off")


def test_nonfinite_steps_are_skipped_and_counted():
    ce = cross_entropy_loss()
    calls = {"n": 0}

    def sometimes_nan(model, x, y, idx):  # every third batch poisons the forward, batch-norm statistics too
        calls["n"] += 1
        return ce(model, x * float("nan") if calls["n"] % 3 == 0 else x, y, idx)

    model = _model()
    result = train(model, _data(), CFG, loss_fn=sometimes_nan)
    assert result.steps == 12 and result.skipped_steps == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())  # running stats restored after a skipped step


def test_a_loss_that_stays_nan_stops_training():
    ce = cross_entropy_loss()

    def always_nan(model, x, y, idx):
        loss, logits = ce(model, x, y, idx)
        return loss * float("nan"), logits

    with pytest.raises(RuntimeError, match=f"training diverged: the loss was not finite for {MAX_NONFINITE_STEPS}"):
        train(_model(), _data(), CFG.model_copy(update={"max_steps": 50}), loss_fn=always_nan)


def test_a_starting_point_that_training_does_not_beat_is_kept():
    """QAT passes its PTQ start's validation top-1: training that only makes it worse leaves it."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, _data(), CFG, initial_val=101.0)  # no checkpoint can beat 101 %
    assert result.kept_initial and result.to_json()["kept_initial"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trained = _model()
    assert not train(trained, _data(), CFG, initial_val=-1.0).kept_initial
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())
