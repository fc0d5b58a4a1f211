import numpy as np
import pytest
import torch

from compressor.artifact import Form
from compressor.errors import ModelLoadError
from compressor.intake import load_model

from .conftest import SHAPE


def _logits(artifact, x):
    with torch.inference_mode():
        return artifact.torch_module()(torch.from_numpy(x)).numpy()


def test_pickled_module_is_refused_without_trust(model_files):
    with pytest.raises(ModelLoadError, match="--trust-model") as err:
        load_model(model_files["pickle"])
    assert "torch.export.save" in str(err.value)  # says how to save it safely


@pytest.mark.parametrize("kind, form", [("pickle", Form.TORCH), ("torchscript", Form.TORCH),
                                        ("exported", Form.EXPORTED), ("onnx", Form.ONNX)])
def test_every_form_loads_with_metadata(model_files, trained_tiny, kind, form):
    art = load_model(model_files[kind], trust=True)
    assert art.form is form
    assert art.input_spec.shape == SHAPE
    assert art.preprocessing.mean == [0.5, 0.5, 0.5]
    assert art.classes == [str(i) for i in range(10)]
    assert art.meta["num_outputs"] == 10
    # the fixture's torch.export program was traced with a static batch of 1
    assert art.meta.get("fixed_batch") == (1 if kind == "exported" else None)
    if form is not Form.ONNX:
        x = np.random.default_rng(0).standard_normal((art.meta.get("fixed_batch", 2), *SHAPE[1:])).astype(np.float32)
        with torch.inference_mode():
            want = trained_tiny(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_logits(art, x), want, rtol=1e-4, atol=1e-4)


def test_state_dict_needs_arch(model_files):
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(model_files["state_dict"])


def test_state_dict_with_torchvision_arch(tmp_path):
    import torchvision

    m = torchvision.models.resnet18(num_classes=3)
    p = tmp_path / "r18.pt"
    torch.save(m.state_dict(), p)
    art = load_model(p, arch="torchvision:resnet18", input_shape=[1, 3, 32, 32])
    assert art.meta["num_outputs"] == 3  # inferred from the classifier weight
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ModelLoadError, match="does not fit torchvision:resnet18"):
        load_model(wrong, arch="torchvision:resnet18", input_shape=[1, 3, 32, 32])


@pytest.mark.parametrize("arch, msg", [("torchvision:nonet", "no classification model"),
                                       ("timm:resnet50", "expected 'torchvision:NAME'")])
def test_unknown_arch(model_files, arch, msg):
    with pytest.raises(ModelLoadError, match=msg):
        load_model(model_files["state_dict"], arch=arch)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(bad)
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="not a valid ONNX"):
        load_model(bad_onnx)


def test_input_shape_the_model_rejects(model_files):
    with pytest.raises(ModelLoadError, match="rejects input shape"):
        load_model(model_files["pickle"], trust=True, input_shape=[1, 5, 16, 16])


def test_content_hash_tracks_weights(model_files):
    a = load_model(model_files["pickle"], trust=True)
    b = load_model(model_files["pickle"], trust=True)
    assert a.content_hash() == b.content_hash()
    with torch.no_grad():
        b.model[0].weight[0, 0, 0, 0] += 1.0
    b._hash = None
    assert a.content_hash() != b.content_hash()
