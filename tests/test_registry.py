"""The registry is the test matrix: every registered pass and target gets the same smoke test on
the tiny model, in every form it takes. Targets that cannot run here are skipped with the reason."""

from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import Form, ModelArtifact, pass_registry, target_registry
from compressor.data import DataConfig, open_data
from compressor.intake import load_model
from compressor.pass_base import PassContext

# extra configurations beyond the defaults, per registered name
EXTRA_CONFIGS = {
    "quantize_ptq": [{"backend": "onnxruntime"}, {"backend": "openvino", "calibration": "histogram"}],
    "export_onnx": [{"exporter": "torchscript"}],
    "prune_structured": [{"macs_reduction": 0.3, "importance": "taylor", "iterative_steps": 2,
                          "finetune": {"max_steps": 2, "batch_size": 32, "val_samples": 20}}],
    "distill": [{"teacher": "{pickle}", "teacher_trusted": True, "student": "torchvision:resnet18",
                 "train": {"max_steps": 1, "batch_size": 16, "val_samples": 20, "augment": False}}],
}
BUILTIN = {"fuse", "export_onnx", "quantize_ptq", "prune_structured", "distill"}
# passes with required fields: their smallest valid config (files from the model_files fixture)
REQUIRED = {"distill": {"teacher": "{pickle}", "teacher_trusted": True,
                        "train": {"max_steps": 2, "batch_size": 32, "val_samples": 20}}}
# targets whose default config cannot pass the FP32 smoke test below (it builds without calibration
# data and compares logits at FP32 tolerance): the config that can
TARGET_CONFIGS = {"tflite": {"quantization": "none"}}


def _cases(registry, extra):
    for name, cls in registry.items():
        if name.startswith("test_"):
            continue
        for config in [REQUIRED.get(name, {}), *extra.get(name, [])]:
            yield pytest.param(name, config, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in config.items()) or 'default'}")


@pytest.fixture(scope="module")
def digits():
    return open_data(DataConfig(source="digits", calibration={"samples": 32}))


@pytest.fixture(scope="module")
def forms(model_files, tmp_path_factory):
    """The tiny model in every form, for feeding any pass or target."""
    d = tmp_path_factory.mktemp("forms")
    torch_art = load_model(model_files["pickle"], trust=True)
    out = {Form.TORCH: torch_art, Form.EXPORTED: load_model(model_files["exported"]),
           Form.ONNX: load_model(model_files["onnx"])}
    import openvino as ov

    from compressor.targets.openvino import to_openvino_model

    ov.save_model(to_openvino_model(torch_art), str(d / "m.xml"))
    out[Form.OPENVINO] = torch_art.derive(Form.OPENVINO, path=d / "m.xml")
    return out


def _reference_logits(art: ModelArtifact, x: np.ndarray) -> np.ndarray:
    from compressor.pipeline import source_runner

    return source_runner(art, threads=2)(x)


def test_builtins_are_registered():
    assert BUILTIN <= set(pass_registry())
    assert {"openvino", "onnxruntime", "tensorrt", "tflite"} <= set(target_registry())


@pytest.mark.parametrize("name, config", list(_cases(pass_registry(), EXTRA_CONFIGS)))
def test_every_pass_on_every_form_it_takes(name, config, forms, digits, tmp_path, model_files):
    config = {k: v.format(**model_files) if isinstance(v, str) else v for k, v in config.items()}
    p = pass_registry()[name](config)
    ran = 0
    for form, art in forms.items():
        if not p.accepts(form):
            continue
        work = tmp_path / form.value
        work.mkdir()
        result = p(art, PassContext(work_dir=work, data=digits, threads=2))
        assert result.artifact.form is p.output_form(form)
        assert result.artifact.input_spec == art.input_spec and result.artifact.classes == art.classes
        ran += 1
    assert ran, f"{name} takes none of the forms the test can make"


@pytest.mark.parametrize("name", [n for n in target_registry() if not n.startswith("test_")])
def test_every_target_builds_and_runs(name, forms, digits, tmp_path):
    cls = target_registry()[name]
    avail = cls.availability()
    if not avail.ok:
        pytest.skip(f"{name} cannot run here: {avail.reason}")
    target = cls(TARGET_CONFIGS.get(name, {}))
    x, _ = digits.evaluation_set((16, 16), "RGB")
    from compressor.data import preprocess

    xb = preprocess(x[:8], forms[Form.TORCH].preprocessing)
    want = _reference_logits(forms[Form.TORCH], xb)
    for form in sorted(cls.consumes, key=lambda f: f.value):
        engine = target.build(forms[form], tmp_path / form.value)
        assert all(Path(f).is_file() for f in engine.files) and engine.size_bytes > 0
        runner = target.load(engine, threads=2)
        got = runner(xb)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # FP32 kernels differ in summation order
        assert (got.argmax(1) == want.argmax(1)).all()
        info = runner.runtime_info()
        assert info["threads"] == 2


def test_import_compressor_loads_no_runtime():
    """Listing passes and targets must not import OpenVINO, ONNX Runtime, TensorRT or LiteRT."""
    import subprocess
    import sys

    code = ("import sys, compressor; compressor.pass_registry(); compressor.target_registry(); "
            "heavy = [m for m in ('openvino', 'onnxruntime', 'tensorrt', 'ai_edge_litert', 'nncf') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
