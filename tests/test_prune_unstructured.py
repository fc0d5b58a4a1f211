"""prune_unstructured: magnitude sparsity with torch.nn.utils.prune on the tiny digits CNN."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor import Form, Pipeline, get_pass, get_target
from compressor.data import DataConfig, open_data, preprocess
from compressor.errors import ConfigError
from compressor.evaluate import EvaluationConfig
from compressor.intake import load_model
from compressor.pass_base import PassContext
from compressor.training import TrainConfig

FAST_EVAL = EvaluationConfig(batch_size=64, warmup=1, latency_runs=10, latency_min_seconds=0,
                             throughput_batch=4, throughput_seconds=0.05, threads=2)
PRUNABLE = ("0", "4")  # the two convs of tiny_cnn; "10" is the classifier (Linear)
CLASSIFIER = "10"


def make(**config):
    return get_pass("prune_unstructured")(config)


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}, evaluation={"limit": 200}))


@pytest.fixture
def art(model_files):
    return load_model(model_files["pickle"], trust=True)


def run(p, art, tmp_path, data=None):
    return p(art, PassContext(work_dir=tmp_path, data=data, threads=2))


def zeros(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def test_oneshot_global_hits_the_target_and_keeps_the_classifier_dense(art, tmp_path):
    res = run(make(sparsity=0.5), art, tmp_path)
    model = dict(res.artifact.model.named_modules())
    pruned = [model[n].weight for n in PRUNABLE]
    overall = sum(float((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert overall == pytest.approx(0.5, abs=1e-3)
    assert res.metrics["sparsity"] == pytest.approx(overall, abs=1e-3)
    assert zeros(model[CLASSIFIER].weight) == 0
    assert res.metrics["layer_sparsity"][CLASSIFIER] == 0 and res.metrics["kept_dense"] == [CLASSIFIER]
    # global: one threshold, so the layers end up with different sparsities
    assert len({round(res.metrics["layer_sparsity"][n], 3) for n in PRUNABLE}) == 2
    assert res.artifact.meta["sparsity"] == res.metrics["sparsity"]
    assert res.metrics["params_nonzero"] < res.metrics["params_total"]
    assert "do not speed up dense kernels" in res.metrics["note"]


def test_layer_scope_gives_each_layer_the_sparsity(art, tmp_path):
    res = run(make(sparsity=0.7, scope="layer", protect_classifier=False), art, tmp_path)
    model = dict(res.artifact.model.named_modules())
    for name in (*PRUNABLE, CLASSIFIER):
        assert zeros(model[name].weight) == pytest.approx(0.7, abs=0.01), name
        assert res.metrics["layer_sparsity"][name] == pytest.approx(0.7, abs=0.01)


def test_masks_are_permanent_and_the_input_is_untouched(art, tmp_path):
    before = copy.deepcopy(art.model.state_dict())
    hash_before = art.content_hash()
    res = run(make(sparsity=0.6), art, tmp_path)
    model = res.artifact.model
    assert res.artifact.model is not art.model
    keys = list(model.state_dict())
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in keys)
    assert keys == list(before)
    for m in model.modules():
        assert not m._forward_pre_hooks
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert isinstance(m.weight, torch.nn.Parameter)
    for k, v in art.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any((art.model[i].weight == 0).any() for i in (0, 4))
    art._hash = None
    assert art.content_hash() == hash_before
    assert "sparsity" not in art.meta


def test_compressed_size_shrinks(art, tmp_path):
    m = run(make(sparsity=0.8), art, tmp_path).metrics
    assert m["zlib_bytes"]["pruned"] < 0.6 * m["zlib_bytes"]["dense"]
    # the uncompressed file does not shrink: the zeros are still stored
    assert abs(m["bytes"]["pruned"] - m["bytes"]["dense"]) < 0.01 * m["bytes"]["dense"]


def test_gradual_with_finetuning_follows_the_schedule(art, digits, tmp_path):
    ft = TrainConfig(epochs=0.5, batch_size=64, val_samples=100)
    p = make(sparsity=0.6, schedule="gradual", steps=2, finetune=ft.model_dump())
    assert p.requires_data()
    res = run(p, art, tmp_path, data=digits)
    steps = res.metrics["steps"]
    # Zhu & Gupta: s_t = 0.6 * (1 - (1 - t/2)^3) -> 0.525, 0.6
    assert [s["target_sparsity"] for s in steps] == [0.525, 0.6]
    assert [s["sparsity"] for s in steps] == pytest.approx([0.525, 0.6], abs=1e-3)
    for s in steps:
        assert s["finetune"]["history"] and s["finetune"]["steps"] >= 1
        assert s["val_top1_pruned"] is not None
    assert res.metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)  # fine-tuning kept the zeros
    assert res.artifact.meta["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_finetune_without_data_is_refused(art, tmp_path):
    p = make(finetune={"epochs": 0.1})
    with pytest.raises(ConfigError, match="needs"):
        run(p, art, tmp_path)
    assert not make().requires_data()


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2])
def test_sparsity_outside_0_1_is_rejected(bad):
    with pytest.raises(ConfigError, match="prune_unstructured.sparsity"):
        make(sparsity=bad)


def test_gradual_without_finetune_is_rejected():
    with pytest.raises(ConfigError, match="gradual"):
        make(schedule="gradual")


def test_unknown_ignored_layer_names_the_field_before_training(art, digits, tmp_path, monkeypatch):
    from compressor.passes import prune_unstructured as mod

    def no_training(*a, **k):
        raise AssertionError("trained before checking the config")

    monkeypatch.setattr(mod, "train", no_training)
    monkeypatch.setattr(mod, "training_data", no_training)
    p = get_pass("prune_unstructured")({"ignored_layers": ["x"], "finetune": {"epochs": 0.1}},
                                       step="passes[0].prune_unstructured")
    with pytest.raises(ConfigError, match=r"passes\[0\]\.prune_unstructured\.ignored_layers: no module named 'x'"):
        run(p, art, tmp_path, data=digits)


def test_ignored_layer_stays_dense(art, tmp_path):
    res = run(make(sparsity=0.5, ignored_layers=["0"]), art, tmp_path)
    model = dict(res.artifact.model.named_modules())
    assert zeros(model["0"].weight) == 0
    assert zeros(model["4"].weight) == pytest.approx(0.5, abs=1e-3)
    assert set(res.metrics["kept_dense"]) == {"0", CLASSIFIER}


def test_pipeline_measures_the_pruned_model_on_openvino(model_files, digits, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    pipeline = Pipeline([get_pass("prune_unstructured")(sparsity=0.5)], [get_target("openvino")()])
    result = pipeline.run(art, data=digits, out_dir=tmp_path / "out", evaluation=FAST_EVAL)
    assert [a.form for a in result.artifacts] == [Form.TORCH, Form.TORCH]
    assert result.records[0].metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    names = [m.name for m in result.measurements]
    assert names[0] == "source" and any(n.startswith("openvino") for n in names[1:])
    ov = result.measurements[-1]
    assert ov.latency_ms["p50"] > 0
    # OpenVINO runs the pruned weights: its top-1 is the pruned torch model's, not the source's
    # (the 5k-weight tiny CNN loses much of its accuracy at 50% without fine-tuning)
    images, labels = digits.evaluation_set((16, 16), "RGB")
    with torch.inference_mode():
        logits = result.final.model(torch.from_numpy(preprocess(images, art.preprocessing)))
    pruned_top1 = 100 * float((logits.argmax(1).numpy() == labels).mean())
    assert ov.top1 == pytest.approx(pruned_top1, abs=1.0)
