"""The registry is the test matrix: every registered pass and target gets the same smoke test on
the tiny model, in every form it takes, and (as timm's test_models checks every model's output) the
pass's output must keep its input's logits on the same digits images within the pass's tolerance,
with no NaN or inf. Targets that cannot run here are skipped with the reason."""

from pathlib import Path

import numpy as np
import pytest

from compressor import Form, ModelArtifact, get_target, pass_registry, target_registry
from compressor.data import DataConfig, open_data, preprocess
from compressor.evaluate import TorchRunner
from compressor.intake import load_model
from compressor.pass_base import PassContext

# What a pass's output keeps of its input's logits on the digits test images. "close": the largest
# |logit difference| over the input's largest |logit| is at most this (a rewrite of the same function);
# "agree": the share of images whose top-1 equals the input's is at least this (a pass that changes
# the weights; chance is 10%); None: no bound beyond finite logits of the right shape.
FIDELITY = {
    "fuse": {"close": 1e-4},  # measured ~1e-6
    "export_onnx": {"close": 1e-4},  # ~1e-6
    "quantize_ptq": {"agree": 0.90},  # 95% (NNCF), 100% (ORT)
    "quantize_qat": {"agree": 0.90},  # 95%
    "prune_structured": {"agree": 0.60},  # fine-tuned configs: 85%
    "prune_unstructured": {"agree": 0.35},  # one-shot, no fine-tuning: 43% at 50% global, 53% at 30% per layer
    "distill": {"agree": 0.80},  # the input model as student of its own teacher, two steps: 94%
}
# Without fine-tuning, removing even one of the first conv's 16 channels drops this tiny CNN's agreement
# to ~20% (a hand-made L2 pruning gives the same): only finite logits of the right shape are asked.
UNTUNED_CHANNELS = None
# a new torchvision student after one step: unrelated logits, so only finite ones of the right shape
FRESH_STUDENT = None
QUICK_TUNE = {"batch_size": 64, "lr": 3e-3, "val_samples": 20, "augment": False}

# extra configurations beyond the defaults, per registered name; an entry (config, fidelity) expects
# other logits than the pass's FIDELITY
EXTRA_CONFIGS = {
    "quantize_ptq": [{"backend": "onnxruntime"}, {"backend": "openvino", "calibration": "histogram"}],
    "export_onnx": [{"exporter": "torchscript"}],
    "prune_structured": [{"macs_reduction": 0.3, "importance": "taylor", "iterative_steps": 2,
                          "finetune": {"max_steps": 24, **QUICK_TUNE}}],
    "prune_unstructured": [{"sparsity": 0.3, "scope": "layer", "protect_classifier": False},
                           ({"sparsity": 0.5, "schedule": "gradual", "steps": 2,
                             "finetune": {"max_steps": 20, **QUICK_TUNE}}, {"agree": 0.80})],  # 94%
    "quantize_qat": [{"preset": "mixed", "calibration_samples": 16,
                      "train": {"max_steps": 1, "batch_size": 32, "val_samples": 20, "augment": False}}],
    "distill": [({"teacher": "{pickle}", "teacher_trusted": True, "student": "torchvision:resnet18",
                  "train": {"max_steps": 1, "batch_size": 16, "val_samples": 20, "augment": False}}, FRESH_STUDENT)],
}
BUILTIN = {"fuse", "export_onnx", "quantize_ptq", "quantize_qat", "prune_structured", "prune_unstructured", "distill"}
# the matrix's first config of a pass, in place of its defaults: the smallest valid one where fields
# are required or the default is slow (quantize_qat trains an epoch), or one whose logits can be held
# to a bound (files from the model_files fixture). No augmentation: CIFAR-style crops and flips move
# a digits model far in two steps.
REQUIRED = {"distill": {"teacher": "{pickle}", "teacher_trusted": True,
                        "train": {"max_steps": 2, "batch_size": 32, "val_samples": 20, "augment": False}},
            "quantize_qat": {"calibration_samples": 32,
                             "train": {"max_steps": 2, "batch_size": 32, "val_samples": 20, "augment": False}},
            "prune_structured": ({}, UNTUNED_CHANNELS)}
# targets whose default config cannot pass the FP32 smoke test below (it builds without calibration
# data and compares logits at FP32 tolerance): the config that can
TARGET_CONFIGS = {"tflite": {"quantization": "none"}, "executorch": {"quantization": "none"}}
IMAGES = 200  # digits test images the logits are compared on


def _registered_passes() -> list[str]:
    return [n for n in pass_registry() if not n.startswith("test_")]


def _cases(registry, extra):
    for name in registry:
        if name.startswith("test_"):
            continue
        for entry in [REQUIRED.get(name, {}), *extra.get(name, [])]:
            config, fidelity = entry if isinstance(entry, tuple) else (entry, FIDELITY.get(name))
            yield pytest.param(name, config, fidelity,
                               id=f"{name}-{'-'.join(f'{k}={v}' for k, v in config.items()) or 'default'}")


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

    ov.save_model(to_openvino_model(torch_art), str(d / "m.xml"), compress_to_fp16=False)  # FP32 weights: an FP32 engine
    out[Form.OPENVINO] = torch_art.derive(Form.OPENVINO, path=d / "m.xml")
    return out


@pytest.fixture(scope="module")
def images(forms, digits):
    x, _ = digits.evaluation_set((16, 16), "RGB")
    return preprocess(x[:IMAGES], forms[Form.TORCH].preprocessing)


def _reference_logits(art: ModelArtifact, x: np.ndarray, work: Path) -> np.ndarray:
    """Logits of an artifact of any form: torch eagerly, ONNX on ONNX Runtime, IR on OpenVINO (FP32 kernels)."""
    if art.form in (Form.TORCH, Form.EXPORTED):
        return TorchRunner(art.torch_module(), threads=2, fixed_batch=art.meta.get("fixed_batch"))(x)
    target = get_target({Form.ONNX: "onnxruntime", Form.OPENVINO: "openvino"}[art.form])()
    runner = target.load(target.build(art, work), threads=2)
    try:
        return runner(x)
    finally:
        runner.close()


def _check_fidelity(name: str, form: Form, fidelity: dict | None, got: np.ndarray, want: np.ndarray) -> None:
    where = f"{name} on {form.value}"
    assert got.shape == want.shape, (where, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{where}: NaN/inf logits"
    if fidelity is None:
        return
    if fidelity.get("close") is not None:
        rel = float(np.abs(got - want).max()) / float(np.abs(want).max())
        assert rel <= fidelity["close"], f"{where}: logits differ by {rel:.2e} of their range (allowed {fidelity['close']})"
    if fidelity.get("agree") is not None:
        agree = float((got.argmax(1) == want.argmax(1)).mean())
        assert agree >= fidelity["agree"], f"{where}: top-1 agrees with the input on {agree:.1%} (floor {fidelity['agree']:.0%})"


def test_builtins_are_registered():
    assert BUILTIN <= set(pass_registry())
    # every registered pass has a logit tolerance, so none joins the matrix unchecked
    assert set(_registered_passes()) <= set(FIDELITY), set(_registered_passes()) - set(FIDELITY)
    assert {"openvino", "onnxruntime", "tensorrt", "tflite"} <= set(target_registry())


@pytest.mark.parametrize("name, config, fidelity", list(_cases(pass_registry(), EXTRA_CONFIGS)))
def test_every_pass_on_every_form_it_takes(name, config, fidelity, forms, digits, images, tmp_path, model_files):
    config = {k: v.format(**model_files) if isinstance(v, str) else v for k, v in config.items()}
    p = pass_registry()[name](config)
    ran = 0
    for form, art in forms.items():
        if not p.accepts(form):
            continue
        work = tmp_path / form.value
        (work / "pass").mkdir(parents=True)
        want = _reference_logits(art, images, work / "input-engine")
        result = p(art, PassContext(work_dir=work / "pass", data=digits, threads=2))
        assert result.artifact.form is p.output_form(form)
        assert result.artifact.input_spec == art.input_spec and result.artifact.classes == art.classes
        got = _reference_logits(result.artifact, images, work / "output-engine")
        _check_fidelity(name, form, fidelity, got, want)
        ran += 1
    assert ran, f"{name} takes none of the forms the test can make"


TAP_SQNR_DB = 60.0  # an FP32 engine's layers against torch's: summation order only
# (target, form) whose engine's taps cannot name the reference's layers yet, and why; checked to still
# fail, so that a fix shows here
TAP_GAPS = {("openvino", Form.EXPORTED): "OpenVINO's conversion of a torch.export program keeps no module "
                                         "names on the conv / linear ops (Multiply_c1, linear/aten.linear...)"}


@pytest.mark.parametrize("name", [n for n in target_registry() if not n.startswith("test_")])
def test_every_target_builds_runs_and_taps(name, forms, images, tmp_path):
    """Every target, from every form it takes: its FP32 engine's logits match torch's, and (the
    fidelity contract, :meth:`compressor.target_base.Target.tapper`) its per-layer taps name every
    layer of the torch reference and match it above TAP_SQNR_DB dB."""
    from compressor.fidelity.metrics import sqnr_db
    from compressor.fidelity.tapper import Tapper
    from compressor.fidelity.torch_tapper import TorchTapper

    cls = target_registry()[name]
    avail = cls.availability()
    if not avail.ok:
        pytest.skip(f"{name} cannot run here: {avail.reason}")
    target = cls(TARGET_CONFIGS.get(name, {}))
    xb = images[:8]
    want = _reference_logits(forms[Form.TORCH], xb, tmp_path / "reference")
    ref = TorchTapper(forms[Form.TORCH].torch_module(), threads=2)
    want_layers = ref(xb)
    assert ref.plan.layers and set(want_layers) == set(ref.plan.layers)
    for form in sorted(cls.consumes, key=lambda f: f.value):
        engine = target.build(forms[form], tmp_path / form.value)
        assert all(Path(f).is_file() for f in engine.files) and engine.size_bytes > 0
        runner = target.load(engine, threads=2)
        got = runner(xb)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)  # FP32 kernels differ in summation order
        assert (got.argmax(1) == want.argmax(1)).all()
        info = runner.runtime_info()
        assert info["threads"] == 2
        runner.close()
        tap = target.tapper(engine, ref.layers, threads=2)
        assert isinstance(tap, Tapper), f"{name}: tapper() returned {type(tap).__name__}, not a Tapper"
        try:
            layers = tap(xb)
        finally:
            tap.close()
        where = f"{name} from {form.value}"
        if (name, form) in TAP_GAPS:
            assert set(tap.plan.layers) != set(ref.plan.layers), f"{where} taps every layer now: drop it from TAP_GAPS"
            continue
        assert tap.plan.layers == [n for n in ref.plan.layers if n in tap.plan.layers], (where, tap.plan.layers)
        assert set(tap.plan.layers) == set(ref.plan.layers), (where, tap.plan)
        assert set(layers) == set(tap.plan.layers), where
        for layer in ref.plan.layers:
            assert layers[layer].dtype == np.float32 and layers[layer].shape == want_layers[layer].shape, \
                (where, layer, layers[layer].dtype, layers[layer].shape, want_layers[layer].shape)
            db = sqnr_db(want_layers[layer], layers[layer])
            assert db is None or db > TAP_SQNR_DB, f"{where}: layer {layer} at {db:.1f} dB against torch"


def test_import_compressor_loads_no_runtime():
    """Listing passes and targets must not import OpenVINO, ONNX Runtime, TensorRT or LiteRT."""
    import subprocess
    import sys

    code = ("import sys, compressor; compressor.pass_registry(); compressor.target_registry(); "
            "heavy = [m for m in ('openvino', 'onnxruntime', 'tensorrt', 'ai_edge_litert', 'nncf') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
