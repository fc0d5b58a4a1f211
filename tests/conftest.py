"""Shared fixtures: a tiny CNN trained in a second on scikit-learn's bundled digits, saved in
every model form the intake accepts, and a tiny ImageFolder tree written as PNG files."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.artifact import Preprocessing
from compressor.cli import main
from compressor.data import digits_source, preprocess

SHAPE = [1, 3, 16, 16]
PREP = Preprocessing(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test writes into the user's cache or reads a data set from the user's home."""
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPRESSOR_DATA_DIR", str(tmp_path / "data-cache"))
    torch.set_num_threads(2)


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``compress ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# Every refusal the tests check, as (test, exit code, first line): with COMPRESSOR_CASE_TABLE=FILE
# set, the session writes them as a Markdown table (the bad-input matrix of issue 10).
_CASES: list[tuple[str, int, str]] = []


def error_line(code: int, out: str, err: str) -> str | None:
    """The one ``error: ...`` line of a refusal with exit 2 and no traceback, or None if it is not one."""
    lines = [line for line in err.splitlines() if line.strip()]
    if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in out + err:
        return None
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    _CASES.append((test, code, lines[0]))
    return lines[0]


def one_error_line(code: int, out: str, err: str) -> str:
    """Assert a refusal: exit 2, one line on stderr starting ``error:``, no traceback; return the line."""
    line = error_line(code, out, err)
    assert line is not None, (code, out[-2000:], err[-2000:])
    return line


def pytest_sessionfinish(session, exitstatus):
    dest = os.environ.get("COMPRESSOR_CASE_TABLE")
    if not dest or not _CASES:
        return
    tmp = re.compile(re.escape(tempfile.gettempdir()) + r"/pytest-of-[^/]+/pytest-\d+/[^/ ]+")
    rows = ["| case | exit | first line |", "|---|---|---|"]
    for test, code, line in _CASES:
        line = tmp.sub("TMP", line).replace("|", "\\|")
        rows.append(f"| `{test}` | {code} | {line} |")
    Path(dest).write_text("\n".join(rows) + "\n")


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """Only torch classes, so the pickled module loads anywhere."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, num_classes),
    )


def digits_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    src = digits_source(split)
    x = preprocess(src.load_images(np.arange(len(src)), (16, 16), "RGB"), PREP)
    return torch.from_numpy(x), torch.from_numpy(src.labels)


@pytest.fixture(scope="session")
def trained_tiny() -> nn.Module:
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = digits_tensors("train")
    epochs, batch = 15, 64
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=epochs * ((len(x) + batch - 1) // batch))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@pytest.fixture(scope="session")
def model_files(trained_tiny, tmp_path_factory) -> dict[str, Path]:
    """The same trained model as pickle, TorchScript, torch.export, state dict and ONNX."""
    d = tmp_path_factory.mktemp("models")
    meta = {"input_shape": SHAPE, "preprocessing": PREP.model_dump(), "classes": [str(i) for i in range(10)]}
    example = torch.zeros(SHAPE)
    paths = {
        "pickle": d / "tiny.pt",
        "torchscript": d / "tiny_ts.pt",
        "exported": d / "tiny.pt2",
        "state_dict": d / "tiny_weights.pt",
        "onnx": d / "tiny.onnx",
    }
    torch.save(trained_tiny, paths["pickle"])
    torch.jit.save(torch.jit.trace(trained_tiny, example), str(paths["torchscript"]))
    torch.export.save(torch.export.export(trained_tiny, (example,)), str(paths["exported"]))
    torch.save(trained_tiny.state_dict(), paths["state_dict"])
    torch.onnx.export(trained_tiny, (example,), str(paths["onnx"]), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, opset_version=17)
    for p in paths.values():
        p.with_suffix(".json").write_text(json.dumps(meta))
    return paths


def open_digits(samples: int = 32, limit: int | None = None):
    """scikit-learn's bundled digits as a data source: ``samples`` calibration images, the evaluation
    split cut to ``limit`` images where given."""
    from compressor.data import DataConfig, open_data

    return open_data(DataConfig(source="digits", calibration={"samples": samples},
                                **({"evaluation": {"limit": limit}} if limit else {})))


@pytest.fixture(scope="module")
def digits():
    """The digits data set with 64 calibration images (a test module may define its own)."""
    return open_digits(64)


@pytest.fixture(scope="module")
def tiny(model_files):
    """The trained tiny CNN loaded through the intake (the pickled form), once per test module."""
    from compressor.intake import load_model

    return load_model(model_files["pickle"], trust=True)


def tiny_eval_set(tiny, digits, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digits evaluation images preprocessed for ``tiny`` (the first ``limit``), their labels, and
    the tiny model's own logits on them (the reference an engine is compared with)."""
    images, labels = digits.evaluation_set((16, 16), "RGB")
    x = preprocess(images, tiny.preprocessing)[:limit]
    with torch.inference_mode():
        ref = tiny.torch_module()(torch.from_numpy(x)).numpy()
    return x, labels[:limit], ref


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """train/ and test/ with 3 classes of 12x12 PNGs whose colour tells the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 8), ("test", 4)):
        for c, name in enumerate(("cat", "dog", "emu")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(12, 12, 3), dtype=np.uint8)
                arr[..., c] += 180
                Image.fromarray(arr).save(root / split / name / f"{i:03d}.png")
    return root


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_RECIPE = """
name: tiny
data:
  source: digits
  calibration: {samples: 64}
passes:
  - fuse
  - quantize_ptq: {backend: openvino}
targets:
  - openvino
evaluation:
  batch_size: 64
  warmup: 2
  latency_runs: 10
  latency_min_seconds: 0
  throughput_batch: 8
  throughput_seconds: 0.05
"""


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """The bundled digits as an ImageFolder tree (train/ and test/, classes 0-9)."""
    from PIL import Image

    from compressor.data import DataConfig, open_data

    bundle = open_data(DataConfig(source="digits"))
    root = tmp_path_factory.mktemp("digits")
    for split, src in (("train", bundle.calibration_source), ("test", bundle.evaluation_source)):
        images = src.load_images(np.arange(len(src)), (16, 16), "RGB")
        for i, (img, label) in enumerate(zip(images, src.labels)):
            d = root / split / str(int(label))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def usable_target_mark(module: str, cls: str, what: str):
    """A skip mark for a test module whose target cannot run here: the target's own availability check
    says why (and what to install); an import that fails outright says so too."""
    import importlib

    try:
        avail = getattr(importlib.import_module(module), cls).availability()
        ok, reason = avail.ok, avail.reason
    except Exception as exc:  # pragma: no cover - only without the extra
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    return pytest.mark.skipif(not ok, reason=f"{what}: {reason}")


def build_engines(target_cls, configs: dict, model, data, out: Path) -> dict:
    """{key: (target, engine)}: one engine of ``target_cls`` per config, built from ``model`` into
    ``out/key`` (calibrated on ``data`` where the config needs it)."""
    built = {}
    for key, config in configs.items():
        target = target_cls(config)
        built[key] = (target, target.build(model, out / key, data=data if target.requires_data() else None))
    return built


def run_engine(engines: dict, key: str, x, threads: int = 2):
    """(logits, runtime_info) of ``engines[key]`` on ``x``, from a fresh runner."""
    target, engine = engines[key]
    runner = target.load(engine, threads=threads)
    try:
        return runner(x), runner.runtime_info()
    finally:
        runner.close()
