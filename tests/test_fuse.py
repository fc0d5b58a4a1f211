"""fuse: conv+BN and linear+BN folding, dropout and identity removal, on the FX graph of an nn.Module,
the ATen graph of a torch.export program and (with torch.jit.freeze) TorchScript. The folded model
computes the same logits; a batch norm that cannot be folded safely stays.

(tests/test_intake_forms.py already covers the fused TorchScript going through the pass cache and
the ONNX exporter, and the .pt2's batch-norm counts and cache round trip.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor import CompressorError, Form, InputSpec, ModelArtifact, PassError, Pipeline, get_pass
from compressor.intake import load_model
from compressor.pass_base import PassContext

from .conftest import PREP, SHAPE, digits_tensors

BN = nn.modules.batchnorm._BatchNorm


def fuse(art: ModelArtifact, tmp_path, **config) -> tuple[ModelArtifact, dict]:
    work = tmp_path / "fuse"
    work.mkdir(exist_ok=True)
    res = get_pass("fuse")(config)(art, PassContext(work_dir=work))
    return res.artifact, res.metrics


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return digits_tensors("test")[0][:128]


def logits(model, x: torch.Tensor, batch: int | None = None) -> np.ndarray:
    with torch.inference_mode():
        if batch is None:
            return model(x).numpy()
        return np.concatenate([model(x[i : i + batch]).numpy() for i in range(0, len(x), batch)])


def assert_same_logits(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    diff = float(np.abs(got - want).max()) / float(np.abs(want).max())
    assert diff <= rel, f"logits differ by {diff:.2e} of their range"
    assert (got.argmax(1) == want.argmax(1)).all()


def _with_stats(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics and affine terms, so a wrong fold shows in the logits."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, BN):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def mlp_head() -> nn.Module:
    """Conv+BN2d, then Linear+BN1d, an Identity and a Dropout: every fold and removal fuse makes."""
    torch.manual_seed(0)
    return _with_stats(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Identity(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(16, 10),
    ))


class SharedConv(nn.Module):
    """The conv's output feeds the batch norm and a skip connection: folding the BN into the conv
    would change the skip's input too, so it must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


def as_artifact(model: nn.Module, form: str, tmp_path) -> ModelArtifact:
    """``model`` as the intake gives it: an nn.Module artifact, or a .pt2 file loaded back."""
    if form == "module":
        return ModelArtifact(Form.TORCH, model=model, input_spec=InputSpec(shape=SHAPE), preprocessing=PREP)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(SHAPE),)), str(path))
    art = load_model(path)
    assert art.form is Form.EXPORTED
    return art


def bn_left(fused: ModelArtifact) -> int:
    """Batch norms still in the fused graph: BN modules called (FX) or batch-norm ops (ATen)."""
    gm = fused.model
    assert isinstance(gm, torch.fx.GraphModule)
    modules = dict(gm.named_modules())
    return sum(
        (n.op == "call_module" and isinstance(modules[n.target], BN))
        or (n.op == "call_function" and "batch_norm" in str(n.target))
        for n in gm.graph.nodes
    )


def ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_fx_folds_every_bn_and_drops_dropout(model_files, images, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    before = {k: v.clone() for k, v in art.model.state_dict().items()}
    fused, metrics = fuse(art, tmp_path)
    gm = fused.model
    assert fused.form is Form.TORCH and isinstance(gm, torch.fx.GraphModule)
    leaves = [m for m in gm.modules() if not list(m.children())]
    assert not any(isinstance(m, (BN, nn.Dropout)) for m in leaves), leaves
    assert sum(isinstance(m, nn.Conv2d) for m in leaves) == 2  # folded into, not removed
    assert not any(n.op == "call_module" and "Dropout" in type(gm.get_submodule(n.target)).__name__
                   for n in gm.graph.nodes)
    assert metrics["before"]["batch_norm"] == 2 and metrics["after"]["batch_norm"] == 0
    assert_same_logits(logits(gm, images), logits(art.model, images))
    assert 0 <= metrics["max_abs_diff"] < 1e-4
    # the input artifact keeps its batch norms and weights
    assert sum(isinstance(m, BN) for m in art.model.modules()) == 2
    assert all(torch.equal(before[k], v) for k, v in art.model.state_dict().items())


@pytest.mark.parametrize("form", ["module", "pt2"])
def test_linear_bn_is_folded_and_identity_removed(form, images, tmp_path):
    model = mlp_head()
    art = as_artifact(model, form, tmp_path)
    fused, _ = fuse(art, tmp_path)
    assert bn_left(fused) == 0
    gm = fused.model
    assert not any(isinstance(m, (nn.Identity, nn.Dropout)) for m in gm.modules())
    assert not any("dropout" in op for op in ops(gm))
    # .pt2 programs are traced at batch 1: feed them one image at a time
    assert_same_logits(logits(gm, images, batch=1 if form == "pt2" else None), logits(model, images))


@pytest.mark.parametrize("form", ["module", "pt2"])
def test_bn_after_a_shared_conv_is_kept(form, images, tmp_path):
    torch.manual_seed(0)
    model = _with_stats(SharedConv())
    fused, _ = fuse(as_artifact(model, form, tmp_path), tmp_path)
    assert bn_left(fused) == 1
    assert_same_logits(logits(fused.model, images, batch=1 if form == "pt2" else None), logits(model, images))


def test_switches_keep_what_they_turn_off(images, tmp_path):
    model = mlp_head()
    art = as_artifact(model, "module", tmp_path)
    kept, metrics = fuse(art, tmp_path, conv_bn=False, remove_dropout=False, remove_identity=False)
    leaves = [type(m) for m in kept.model.modules() if not list(m.children())]
    assert leaves.count(nn.BatchNorm2d) == leaves.count(nn.BatchNorm1d) == 1
    assert nn.Dropout in leaves and nn.Identity in leaves
    assert metrics["after"]["batch_norm"] == 2
    assert_same_logits(logits(kept.model, images), logits(model, images))


def test_torchscript_is_frozen_without_bn_or_dropout(model_files, images, tmp_path):
    art = load_model(model_files["torchscript"])
    kinds_before = [n.kind() for n in art.model.inlined_graph.nodes()]
    assert "aten::batch_norm" in kinds_before and "aten::dropout" in kinds_before  # what there is to fold
    fused, metrics = fuse(art, tmp_path)
    assert isinstance(fused.model, torch.jit.ScriptModule) and metrics["graph"] == "torchscript"
    kinds = [n.kind() for n in fused.model.graph.nodes()]
    assert not any("batch_norm" in k or "dropout" in k for k in kinds), kinds
    assert metrics["before"]["batch_norm"] == 2 and metrics["after"]["batch_norm"] == 0
    assert_same_logits(logits(fused.model, images), logits(art.model, images))


def test_pt2_dropout_is_removed_from_the_aten_graph(model_files, images, tmp_path):
    art = load_model(model_files["exported"])
    assert any("dropout" in op for op in ops(art.model.graph_module))  # the program holds one
    fused, _ = fuse(art, tmp_path)
    assert not any("dropout" in op for op in ops(fused.model))
    assert_same_logits(logits(fused.model, images, batch=1), logits(art.torch_module(), images, batch=1))


def test_a_fold_beyond_the_tolerance_is_refused(model_files):
    """The check after folding is real: with no difference allowed, float rounding alone fails it."""
    art = load_model(model_files["pickle"], trust=True)
    with pytest.raises(CompressorError, match="differs from the original"):
        Pipeline([get_pass("fuse")(tolerance=0.0)]).run(art)
    assert Pipeline([get_pass("fuse")()]).run(art).records[0].metrics["after"]["batch_norm"] == 0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return y if y.sum() > 0 else -y  # data-dependent control flow: no FX graph


def test_untraceable_module_names_the_way_out(tmp_path):
    art = ModelArtifact(Form.TORCH, model=Untraceable().eval(), input_spec=InputSpec(shape=SHAPE))
    with pytest.raises(PassError, match="cannot be traced into an FX graph.*torch.export or TorchScript"):
        fuse(art, tmp_path)
