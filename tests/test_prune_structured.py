import copy

import numpy as np
import pytest
import torch

from compressor import ConfigError, Pipeline, get_pass, get_target
from compressor.data import DataConfig, open_data
from compressor.intake import load_model
from compressor.pass_base import PassContext


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}))


def _macs(model, shape=(1, 3, 16, 16)):
    import torch_pruning as tp

    return tp.utils.count_ops_and_params(model, torch.zeros(shape))[0]


def test_channel_ratio_removes_channels_rounded_and_keeps_classifier(model_files, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    before = copy.deepcopy(art.model.state_dict())
    res = get_pass("prune_structured")(channel_ratio=0.5, round_to=8)(art, PassContext(work_dir=tmp_path))
    pruned = res.artifact.model
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]  # 16 -> 8, 32 -> 16: multiples of 8
    assert pruned[-1].out_features == 10  # the classifier keeps its classes
    assert res.metrics["macs_after"] < res.metrics["macs_before"]
    assert res.metrics["params_after"] < res.metrics["params_before"]
    out = pruned(torch.zeros(2, 3, 16, 16))
    assert out.shape == (2, 10)
    assert all(torch.equal(before[k], v) for k, v in art.model.state_dict().items())  # input untouched


def test_macs_target_is_met_and_finetuning_recovers(model_files, digits, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    p = get_pass("prune_structured")(macs_reduction=0.5, round_to=1, iterative_steps=2,
                                     finetune={"epochs": 2, "batch_size": 64, "lr": 3e-3, "val_samples": 200})
    res = p(art, PassContext(work_dir=tmp_path, data=digits))
    assert abs(res.metrics["macs_reduction"] - 0.5) < 0.06
    assert len(res.metrics["steps"]) == 2 and "finetune" in res.metrics["steps"][0]
    last = res.metrics["steps"][-1]
    assert last["val_top1_finetuned"] > last["val_top1_pruned"]  # fine-tuning recovers accuracy
    assert last["val_top1_finetuned"] > 30  # far above chance (10%) after halving a 2-conv net


@pytest.mark.parametrize("config, field", [
    ({"channel_ratio": 1.0}, "channel_ratio"),
    ({"channel_ratio": 0.0}, "channel_ratio"),
    ({"macs_reduction": 1.5}, "macs_reduction"),
    ({"importance": "random_forest"}, "importance"),
    ({"channel_ratio": 0.3, "macs_reduction": 0.3}, "not both"),
])
def test_bad_config_names_the_field(config, field):
    with pytest.raises(ConfigError, match=field):
        get_pass("prune_structured")(config, step="passes[0].prune_structured")


def test_errors_come_before_any_training(model_files, digits, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    finetune = {"epochs": 50, "batch_size": 8}  # would take minutes if it ever started
    bad_layer = get_pass("prune_structured")(ignored_layers=["nope"], finetune=finetune, step="passes[0].prune_structured")
    with pytest.raises(ConfigError, match=r"passes\[0\].prune_structured.ignored_layers: .*'nope'"):
        Pipeline([bad_layer], [get_target("openvino")()]).run(art, data=digits)
    unreachable = get_pass("prune_structured")(macs_reduction=0.95, max_layer_ratio=0.5, finetune=finetune)
    with pytest.raises(ConfigError, match="out of reach"):
        Pipeline([unreachable], [get_target("openvino")()]).run(art, data=digits)


def test_whole_layer_removal_is_refused():
    from compressor.passes.prune_structured import _check_layers

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model[0].out_channels = 0  # what a too-aggressive plan would leave
    with pytest.raises(ConfigError, match="remove every channel of layer '0'"):
        _check_layers(model, "passes[0].prune_structured")


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_macs_reduction_is_met_within_two_points_on_mobilenet_v2(target, tmp_path):
    """One channel ratio for every layer moves MobileNetV2's MACs in steps (round_to 8): 0.3 asked
    gave 0.42 removed. The pass mixes the two ratios around the target across layers instead."""
    import json

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    path = tmp_path / "mnv2.pt"
    torch.save(model, path)
    path.with_suffix(".json").write_text(json.dumps({"input_shape": [1, 3, 32, 32]}))
    art = load_model(path, trust=True)
    res = get_pass("prune_structured")(macs_reduction=target, round_to=8)(art, PassContext(work_dir=tmp_path))
    m = res.metrics
    assert abs(m["macs_reduction"] - target) <= 0.02 and m["macs_target_met"], m
    assert _macs(res.artifact.torch_module(), (1, 3, 32, 32)) == m["macs_after"]


def test_finetuning_can_distil_from_the_unpruned_model(model_files, digits, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    p = get_pass("prune_structured")(channel_ratio=0.5, round_to=1, finetune={
        "teacher": "input", "alpha": 0.7, "epochs": 2, "batch_size": 64, "lr": 3e-3, "val_samples": 200})
    res = p(art, PassContext(work_dir=tmp_path, data=digits))
    step = res.metrics["steps"][0]
    assert res.metrics["finetune_teacher"] == "input"
    assert step["val_top1_finetuned"] > step["val_top1_pruned"] and step["val_top1_finetuned"] > 50, step



def test_augmented_finetuning_replays_the_unpruned_models_stored_views(model_files, digits, tmp_path):
    """With augmentation, the unpruned model's outputs on stored views are computed once, serve every
    pruning step, and a second run with the same model and data computes none."""
    art = load_model(model_files["pickle"], trust=True)
    ft = {"teacher": "input", "alpha": 0.7, "epochs": 2, "batch_size": 64, "lr": 3e-3, "val_samples": 200,
          "augment": True, "teacher_views": 2}
    runs = []
    for _ in range(2):
        p = get_pass("prune_structured")(channel_ratio=0.4, round_to=1, iterative_steps=2, finetune=ft)
        runs.append(p(art, PassContext(work_dir=tmp_path / f"w{len(runs)}", data=digits, cache_dir=tmp_path / "c")))
    first, second = (r.metrics["teacher_views"] for r in runs)
    assert first["computed_views"] == 2 and second["computed_views"] == 0 and first["store"] == second["store"]
    assert len(list((tmp_path / "c" / "teacher-outputs").iterdir())) == 1
    for step in runs[0].metrics["steps"]:  # 8x8 digits under pad-4 crops and flips: a low ceiling, but learning
        assert step["val_top1_finetuned"] > step["val_top1_pruned"] + 5, step


def test_finetuning_can_distil_from_the_runs_source_model(model_files, digits, tmp_path):
    """teacher: source distils from the run's input model (in the chain, the ResNet-50 that taught the
    student), which keys the pass cache; without one in the context it is refused in one line."""
    from compressor.errors import ConfigError
    from compressor.pipeline import PassCache

    art = load_model(model_files["pickle"], trust=True)
    ft = {"teacher": "source", "epochs": 1, "batch_size": 64, "lr": 3e-3, "val_samples": 200, "augment": False}
    p = get_pass("prune_structured")(channel_ratio=0.5, round_to=1, finetune=ft)
    res = p(art, PassContext(work_dir=tmp_path, data=digits, source=art))
    assert res.metrics["finetune_teacher"] == "source"
    step = res.metrics["steps"][0]
    assert step["val_top1_finetuned"] > step["val_top1_pruned"], step
    cache = PassCache(tmp_path / "c")
    other = get_pass("fuse")()(art, PassContext(work_dir=tmp_path / "f")).artifact
    assert cache.key(p, res.artifact, digits, art) != cache.key(p, res.artifact, digits, other)
    with pytest.raises(ConfigError, match="finetune.teacher: source needs the run's input model"):
        p(art, PassContext(work_dir=tmp_path / "x", data=digits))


def test_finetuning_distils_with_the_logit_loss_distill_uses(model_files, digits, tmp_path, monkeypatch):
    """The fine-tune's distillation term is distill.logit_loss (so dkd and dist work there too):
    each loss trains to a different model, and every batch's term came through that function."""
    from compressor.passes import distill, prune_structured

    calls = []
    real = distill.logit_loss
    monkeypatch.setattr(prune_structured, "logit_loss", lambda cfg, s, t, y: calls.append(cfg.loss) or real(cfg, s, t, y))
    art = load_model(model_files["pickle"], trust=True)
    weights = {}
    for loss in ("kd", "dkd", "dist"):
        ft = {"teacher": "input", "loss": loss, "epochs": 1, "batch_size": 64, "lr": 3e-3, "val_samples": 200,
              "augment": False}
        res = get_pass("prune_structured")(channel_ratio=0.5, round_to=1, finetune=ft)(
            art, PassContext(work_dir=tmp_path / loss, data=digits))
        assert res.metrics["finetune_loss"] == loss
        weights[loss] = torch.cat([p.detach().flatten() for p in res.artifact.torch_module().parameters()])
    assert set(calls) == {"kd", "dkd", "dist"}
    assert not torch.equal(weights["kd"], weights["dkd"]) and not torch.equal(weights["kd"], weights["dist"])


MATRIX_OK = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
             "densenet121"]


@pytest.fixture(scope="module")
def torchvision_model(tmp_path_factory):
    import json

    import torchvision

    def make(arch):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(arch) / f"{arch}.pt"
        torch.save(torchvision.models.get_model(arch, num_classes=10).eval(), path)
        path.with_suffix(".json").write_text(json.dumps({"input_shape": [1, 3, 32, 32]}))
        return load_model(path, trust=True)

    return make


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("arch", MATRIX_OK)
def test_torchvision_architectures_prune_run_and_export(arch, fused, torchvision_model, tmp_path):
    """Issue 13, 4b: randomly initialised torchvision models at 32x32, pruned with and without fuse:
    the pruned model runs, has fewer MACs, and exports to ONNX."""
    art = torchvision_model(arch)
    if fused:
        art = get_pass("fuse")()(art, PassContext(work_dir=tmp_path)).artifact
    res = get_pass("prune_structured")(channel_ratio=0.25)(art, PassContext(work_dir=tmp_path))
    assert res.metrics["macs_after"] < res.metrics["macs_before"]
    assert res.artifact.torch_module()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    onnx = get_pass("export_onnx")()(res.artifact, PassContext(work_dir=tmp_path)).artifact
    assert onnx.path.is_file()


def test_channel_shuffle_is_refused_in_one_line_naming_the_pattern(torchvision_model, tmp_path):
    from compressor.errors import ConfigError

    art = torchvision_model("shufflenet_v2_x0_5")
    with pytest.raises(ConfigError, match=r"channel split and shuffle .*layer 'stage2.0'"):
        get_pass("prune_structured")(channel_ratio=0.25)(art, PassContext(work_dir=tmp_path))


def test_convnext_prunes_and_runs(torchvision_model, tmp_path):
    """ConvNeXt-Tiny (channels-last LayerNorm2d): Torch-Pruning resizes its norms consistently; the
    pruned model runs with fewer MACs. (Its ONNX export is the xfail below.)"""
    art = torchvision_model("convnext_tiny")
    res = get_pass("prune_structured")(channel_ratio=0.25)(art, PassContext(work_dir=tmp_path))
    assert res.metrics["macs_after"] < res.metrics["macs_before"]
    assert res.artifact.torch_module()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_pruned_convnext_exports_to_onnx(torchvision_model, tmp_path):
    """torch.export (dynamo) of the pruned ConvNeXt-Tiny fails building its shape guards; exporter: auto
    then exports with TorchScript and says so, and the ONNX model gives the torch model's logits."""
    import onnxruntime as ort

    art = torchvision_model("convnext_tiny")
    res = get_pass("prune_structured")(channel_ratio=0.25)(art, PassContext(work_dir=tmp_path))
    out = get_pass("export_onnx")()(res.artifact, PassContext(work_dir=tmp_path))
    assert out.artifact.path.is_file()
    if out.metrics["exporter"] == "torchscript":
        assert out.metrics["dynamo_error"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = res.artifact.torch_module().eval()(x).detach().numpy()
    got = ort.InferenceSession(str(out.artifact.path)).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())
