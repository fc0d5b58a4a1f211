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


# ---------------------------------------------------------------------- bf16 and channels-last, measured


class _Clock:
    """A clock that only the loss moves: the probe's choice is then a function of the planted step
    times, not of what else this machine runs (time.sleep on a loaded CI machine was flaky)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


_CLOCK = _Clock()


def _timed_loss(seconds):
    """A loss whose step takes ``seconds(bf16, channels_last)`` on the probe's clock."""
    ce = cross_entropy_loss()

    def loss(model, x, y, idx):
        bf16 = torch.is_autocast_enabled("cpu")
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        _CLOCK.now += seconds(bf16, cl)
        return ce(model, x, y, idx)

    return loss


def _probe(loss, options):
    import types

    import compressor.training.probe as training  # probe_step reads the clock of its own module

    probe_step = training.probe_step
    clock = types.SimpleNamespace(perf_counter=_CLOCK.perf_counter)

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data()
    rng = torch.get_rng_state()
    x = data.normalise(torch.from_numpy(data.x_train[:16])).contiguous()
    y = torch.from_numpy(data.y_train[:16])
    real_time, training.time = training.time, clock
    try:
        chosen, probe = probe_step(model, loss, x, y, torch.arange(16), torch.device("cpu"), options, steps=2)
    finally:
        training.time = real_time
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics as they were
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in model.parameters())
    return chosen, probe, model


def test_the_probe_takes_the_fastest_option_by_a_margin_and_leaves_the_model_as_it_was():
    from compressor.training import StepOption

    options = [StepOption(False, False), StepOption(True, False), StepOption(False, True), StepOption(True, True)]
    chosen, probe, model = _probe(_timed_loss(lambda bf16, cl: 0.03 + 0.06 * bf16 + 0.06 * (not cl)), options)
    assert chosen == StepOption(False, True) and probe["chosen"] == "fp32 channels_last"
    assert set(probe["s_per_step"]) == {o.name for o in options}
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    # within the margin of the default, the default stays
    chosen, _, model = _probe(_timed_loss(lambda bf16, cl: 0.15), options)
    assert chosen == options[0] and model[0].weight.is_contiguous()


def test_an_option_the_model_cannot_train_under_is_left_out_and_a_short_step_is_not_probed():
    from compressor.training import StepOption

    ce = cross_entropy_loss()

    def no_bf16(model, x, y, idx):
        _CLOCK.now += 0.06
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("no bf16 kernel for this op")
        return ce(model, x, y, idx)

    options = [StepOption(False, False), StepOption(True, False)]
    chosen, probe, _ = _probe(no_bf16, options)
    assert chosen == options[0] and "no bf16 kernel" in probe["failed"]["bf16 contiguous"]
    chosen, probe, _ = _probe(_timed_loss(lambda bf16, cl: 0.0), options)  # a tiny model: nothing to gain
    assert chosen == options[0] and list(probe["s_per_step"]) == ["fp32 contiguous"] and "too short" in probe["note"]


def test_training_reports_its_layout_and_hands_back_contiguous_weights():
    model = _model()
    result = train(model, _data(), CFG.model_copy(update={"channels_last": "on"}))
    assert result.memory_format == "channels_last" and result.probe is None
    assert all(p.is_contiguous() for p in model.parameters())
    assert train(_model(), _data(), CFG.model_copy(update={"channels_last": "off"})).memory_format == "contiguous"


def test_bf16_the_probe_chose_falls_back_to_fp32_at_a_loss_that_is_not_finite(monkeypatch):
    import compressor.training as training

    monkeypatch.setattr(training.probe, "has_native_bf16", lambda flags=None: True)
    monkeypatch.setattr(training.loop, "probe_step", lambda model, *a, **k: (
        training.StepOption(True, False), {"s_per_step": {"fp32 contiguous": 1.0, "bf16 contiguous": 0.5},
                                            "failed": {}, "chosen": "bf16 contiguous", "batch": 16, "note": None}))
    ce = cross_entropy_loss()
    calls = {"n": 0}

    def nan_under_bf16(model, x, y, idx):
        calls["n"] += 1
        loss, logits = ce(model, x, y, idx)
        return (loss * float("nan") if torch.is_autocast_enabled("cpu") and calls["n"] >= 3 else loss), logits

    result = train(_model(), _data(), CFG.model_copy(update={"bf16": "auto", "channels_last": "off"}),
                   loss_fn=nan_under_bf16)
    assert result.precision == "bf16 autocast, fp32 from step 3 (a loss not finite)"
    assert result.skipped_steps == 1 and result.steps == 12
