"""export_onnx: torch -> ONNX with either exporter. The file passes onnx.checker, names its input and
output, keeps the batch dimension dynamic (ONNX Runtime runs batch 1 and batch 5), and gives the
torch model's logits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compressor import CompressorError, Form, get_pass
from compressor.intake import load_model
from compressor.pass_base import PassContext

from .conftest import digits_tensors


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return digits_tensors("test")[0][:40].numpy()


def export(art, tmp_path, **config):
    work = tmp_path / "export"
    work.mkdir(parents=True, exist_ok=True)
    return get_pass("export_onnx")(config)(art, PassContext(work_dir=work))


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_logits(art, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([art.torch_module()(torch.from_numpy(x[i : i + 1])).numpy() for i in range(len(x))])


def batch_dim(value_info) -> int | str:
    dim = value_info.type.tensor_type.shape.dim[0]
    return dim.dim_param if dim.HasField("dim_param") else dim.dim_value


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_checked_dynamic_batch_onnx_gives_torch_logits(exporter, model_files, images, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    res = export(art, tmp_path, exporter=exporter)
    out = res.artifact
    assert out.form is Form.ONNX and out.path.is_file() and out.input_spec == art.input_spec
    onnx.checker.check_model(str(out.path), full_check=True)
    proto = onnx.load(str(out.path))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert isinstance(batch_dim(proto.graph.input[0]), str), proto.graph.input[0]  # symbolic
    assert isinstance(batch_dim(proto.graph.output[0]), str), proto.graph.output[0]
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (18 if exporter == "dynamo" else 17)  # the TorchScript exporter stops at 17
    assert res.metrics["exporter"] == exporter and res.metrics["nodes"] == len(proto.graph.node)
    assert sum(res.metrics["ops"].values()) == len(proto.graph.node)

    sess, want = session(out.path), torch_logits(art, images)
    for batch in (1, 5):
        got = np.concatenate([sess.run(None, {"input": images[i : i + batch]})[0]
                              for i in range(0, len(images), batch)])
        assert got.shape == want.shape and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_static_batch_when_asked(model_files, images, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    out = export(art, tmp_path, dynamic_batch=False).artifact
    proto = onnx.load(str(out.path))
    assert batch_dim(proto.graph.input[0]) == 1
    sess = session(out.path)
    np.testing.assert_allclose(sess.run(None, {"input": images[:1]})[0], torch_logits(art, images[:1]),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"input": images[:5]})


def test_simplify_off_keeps_the_exported_graph(model_files, tmp_path):
    art = load_model(model_files["pickle"], trust=True)
    plain = export(art, tmp_path / "a", simplify=False).metrics
    slim = export(art, tmp_path / "b").metrics
    assert plain["nodes"] == plain["nodes_exported"]
    assert slim["nodes"] <= slim["nodes_exported"]


def test_torch_export_program_keeps_its_fixed_batch(model_files, images, tmp_path):
    """A .pt2 traced at batch 1 has a static batch; the ONNX says so and still gives its logits."""
    art = load_model(model_files["exported"])
    out = export(art, tmp_path).artifact
    onnx.checker.check_model(str(out.path), full_check=True)
    assert batch_dim(onnx.load(str(out.path)).graph.input[0]) == 1
    assert out.meta.get("fixed_batch") == 1
    sess = session(out.path)
    got = np.concatenate([sess.run(None, {"input": images[i : i + 1]})[0] for i in range(len(images))])
    np.testing.assert_allclose(got, torch_logits(art, images), rtol=1e-4, atol=1e-4)


def test_torchscript_input_takes_the_torchscript_exporter(model_files, images, tmp_path):
    art = load_model(model_files["torchscript"])
    res = export(art, tmp_path)
    assert res.metrics["exporter"] == "torchscript"
    got = session(res.artifact.path).run(None, {"input": images[:5]})[0]
    np.testing.assert_allclose(got, torch_logits(art, images[:5]), rtol=1e-4, atol=1e-4)
    with pytest.raises(CompressorError, match="dynamo exporter cannot take a TorchScript model"):
        export(art, tmp_path / "again", exporter="dynamo")
