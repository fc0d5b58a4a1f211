"""Data that streams (issue 23): images are read in batches by decoding workers, kept decoded on disk
once, and a whole run's peak memory does not grow with the number of images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import streaming
from compressor.artifact import Preprocessing
from compressor.data import DataConfig, open_data, preprocess
from compressor.streaming import ImageSet

from .conftest import tiny_cnn

PREP = Preprocessing(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
CLASSES = ("ant", "bee", "cow", "dog")


def jpeg_folder(root: Path, train: int, test: int | None = None, size: tuple[int, int] = (120, 160),
                seed: int = 0) -> Path:
    """train/ and test/ with ``train`` and ``test`` (default: as many) JPEGs (4 classes): smooth colour
    fields that tell the class, with noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for split, count in (("train", train), ("test", train if test is None else test)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            c = i % len(CLASSES)
            base = np.zeros((h, w, 3), np.float32)
            base[..., c % 3] = 150 + 60 * np.sin(xx / (6 + c) + rng.uniform(0, 6))
            base[..., (c + 1) % 3] = 80 + 40 * np.cos(yy / (5 + 2 * c) + rng.uniform(0, 6))
            base += rng.normal(0, 12, base.shape)
            img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
            img.save(root / split / CLASSES[c] / f"{i:05d}.jpg", quality=85)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return jpeg_folder(tmp_path_factory.mktemp("jpegs"), 600)


def bundle(root: Path):
    return open_data(DataConfig(source="folder", root=str(root)))


def test_batches_come_in_order_and_equal_a_decode_in_this_process(folder, monkeypatch):
    data = bundle(folder)
    images = data.evaluation_images((40, 48), PREP)
    want = images.source.load_images(images.indices, (40, 48), PREP)  # one decode in this process
    assert streaming.worker_count(len(images), in_memory=False) >= 1
    got = list(images.batches(100))  # decoding workers, written through to a store
    assert [len(b) for b in got] == [100] * 6
    assert np.array_equal(np.concatenate(got), want)
    stores = list(streaming.cache_dir().iterdir())
    assert len(stores) == 1 and stores[0].name.endswith("-all.npy")
    # a second set of the same images reads the store: same images, same order, no decoding
    monkeypatch.setattr(type(images.source), "load_images", lambda *a, **k: pytest.fail("decoded again"))
    again = data.evaluation_images((40, 48), PREP)
    assert np.array_equal(np.concatenate(list(again.batches(64))), want)
    order = [np.array([5, 3, 599]), np.arange(10, 20)]
    assert all(np.array_equal(b, want[ix]) for ix, b in zip(order, again.batches(order=order)))
    # preprocessed: the model's float32 input, as preprocess gives it
    x = again.preprocessed(PREP)
    assert x.shape == (600, 3, 40, 48) and x.dtype == np.float32
    np.testing.assert_array_equal(x[[7, 2]], preprocess(want[[7, 2]], PREP))


def test_worker_decode_equals_decode_in_this_process(folder, monkeypatch):
    monkeypatch.setenv(streaming.CACHE_ENV, "0")  # no store: every pass decodes
    images = bundle(folder).split_images("train", (32, 32), "RGB").subset(np.arange(1, 600, 2))
    by_workers = np.concatenate(list(images.batches(37, workers=2)))
    here = np.concatenate(list(images.batches(37, workers=0)))
    assert by_workers.shape == (300, 32, 32, 3) and np.array_equal(by_workers, here)


def test_the_process_gets_its_sigchld_handler_back_after_the_workers(folder, monkeypatch):
    """torch's DataLoader installs a SIGCHLD handler that checks its workers' pids at every child's
    exit and keeps it for good; a later subprocess in the same process (a mount, benchmark_app) then
    crashed pytest with a segmentation fault (tests/test_faults.py after the explain tests, in CI)."""
    import signal
    import subprocess

    monkeypatch.setenv(streaming.CACHE_ENV, "0")
    before = signal.getsignal(signal.SIGCHLD)
    images = bundle(folder).split_images("train", (16, 16), "RGB").subset(np.arange(0, 300))
    seen = []
    for batch in images.batches(50, workers=2):
        seen.append(signal.getsignal(signal.SIGCHLD))  # torch's, while the workers run
    assert len(seen) == 6 and seen[0] is not before
    assert signal.getsignal(signal.SIGCHLD) is before
    assert subprocess.run(["true"]).returncode == 0
    assert len(list(images.batches(100, workers=2))) == 3  # the next loader sets its handler again
    assert signal.getsignal(signal.SIGCHLD) is before


def test_training_and_validation_images_share_one_store_of_the_split(folder):
    data = bundle(folder)
    split = data.split_images("train", (24, 24), "RGB")
    train, val = split.subset(np.arange(100, 600)), split.subset(np.arange(100))
    perm = np.random.default_rng(0).permutation(500)
    order = [np.sort(perm[i : i + 64]) for i in range(0, 448, 64)]  # an epoch less its partial batch
    list(train.batches(order=order))
    store = streaming._store_path(split.source, (24, 24), "RGB", "all")  # noqa: SLF001
    assert not store.is_file()  # 152 of 600 images not read yet
    want = split.source.load_images(np.arange(100), (24, 24), "RGB")
    assert np.array_equal(np.concatenate(list(val.batches(50))), want)  # validation writes into the same store
    assert store.is_file()  # and the 52 images of the partial batch were decoded to complete it
    assert streaming.Store(store).shape == (600, 24, 24, 3)
    assert np.array_equal(streaming.Store(store).read(np.arange(600)),
                          split.source.load_images(np.arange(600), (24, 24), "RGB"))


def test_a_store_over_the_cap_is_not_written_and_says_so(folder, monkeypatch, caplog):
    monkeypatch.setenv(streaming.CACHE_ENV, "100K")
    images = bundle(folder).evaluation_images((40, 48), "RGB")
    with caplog.at_level("WARNING", logger="compressor.streaming"):
        n = sum(len(b) for b in images.batches(200))
    assert n == 600
    assert not streaming.cache_dir().exists() or not list(streaming.cache_dir().glob("*.npy"))
    line = [r.getMessage() for r in caplog.records if "over the cap" in r.getMessage()]
    assert len(line) == 1 and "600 images" in line[0] and "decoded again on every pass" in line[0], line


def test_a_pass_left_early_leaves_no_partial_store(folder):
    images = bundle(folder).evaluation_images((40, 48), "RGB")
    for _ in images.batches(100, workers=0):
        break
    streaming._discard_writers()  # what the process does at exit  # noqa: SLF001
    assert not [p for p in streaming.cache_dir().iterdir()]


def test_a_bad_image_is_one_data_error_from_the_workers(folder, tmp_path):
    import shutil

    from compressor.errors import DataError

    root = tmp_path / "bad"
    shutil.copytree(folder, root)
    (root / "test" / "ant" / "00000.jpg").write_bytes(b"not a jpeg")
    images = bundle(root).evaluation_images((40, 48), "RGB")
    with pytest.raises(DataError, match=r"cannot read image .*00000\.jpg"):
        list(images.batches(64, workers=2))


def test_streamed_measurement_equals_the_in_memory_one(folder):
    from compressor.evaluate import EvaluationConfig, ResultRow, TorchRunner, measure_all

    torch.manual_seed(0)
    model = tiny_cnn(len(CLASSES)).eval()
    x = bundle(folder).evaluation_images((32, 32), PREP).preprocessed(PREP)
    cfg = EvaluationConfig(batch_size=50, warmup=1, latency_runs=10, latency_min_seconds=0, latency_rounds=2,
                           throughput_batch=8, throughput_seconds=0.05, paced_rate_hz=None)

    def rows() -> list[ResultRow]:
        return [ResultRow("source", "torch", "fp32", TorchRunner(model, threads=1), 1),
                ResultRow("half", "torch", "fp16", TorchRunner(model.half().float(), threads=1), 1)]

    streamed = measure_all(rows(), x=x, labels=x.labels, cfg=cfg, threads=1)
    held = measure_all(rows(), x=np.asarray(x), labels=x.labels, cfg=cfg, threads=1)
    for a, b in zip(streamed, held):
        assert np.array_equal(a.predictions, b.predictions) and (a.top1, a.top5, a.agreement) == (b.top1, b.top5, b.agreement)
        assert a.output_sqnr_db == pytest.approx(b.output_sqnr_db) if b.output_sqnr_db else a.output_sqnr_db is None
    with torch.inference_mode():
        want = model(torch.from_numpy(np.asarray(x))).argmax(1).numpy()
    assert np.array_equal(streamed[0].predictions, want)  # in evaluation order


# ---------------------------------------------------------------------- peak memory of a whole run

RUN = textwrap.dedent("""
    import json, resource, sys
    from compressor.cli import main
    code = main(sys.argv[1:])
    print("PEAK " + json.dumps({"code": code, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")

RECIPE = """
name: streaming
model: {input_shape: [1, 3, 128, 128]}
preprocessing: {mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
data:
  source: folder
  calibration: {samples: 64}
passes:
  - prune_structured: {channel_ratio: 0.25, round_to: 4, finetune: {epochs: 1, batch_size: 32, val_samples: 64,
                       channels_last: "off", bf16: "off"}}
targets:
  - openvino: {precision_hint: f32}
evaluation:
  batch_size: 50
  warmup: 2
  latency_runs: 10
  latency_min_seconds: 0
  latency_rounds: 2
  paced_rate_hz: null
  throughput_batch: 8
  throughput_seconds: 0.05
"""


def _peak_of_run(model: Path, recipe: Path, data: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(model), "--recipe", str(recipe), "--trust-model",
                             "--data", str(data), "--out", str(out), "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_peak_memory_of_a_run_does_not_grow_with_the_images(tmp_path):
    """A run that prunes and fine-tunes (one epoch over the training split), builds an OpenVINO engine and
    evaluates the source and the engine on every test image at 128x128: 2,000 images (500 training,
    1,500 test) against 200 (50 and 150), in two processes side by side. Holding the images, as runs
    did before, took 1.80x the memory here (979 MB and 1,758 MB); streamed, 1.08x."""
    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    torch.save(tiny_cnn(len(CLASSES)), model)
    recipe = tmp_path / "streaming.yaml"
    recipe.write_text(RECIPE)
    runs = {}
    for train, test in ((50, 150), (500, 1500)):
        data = jpeg_folder(tmp_path / f"data{train}", train, test)
        env = {**os.environ, "COMPRESSOR_DATA_DIR": str(tmp_path / f"cache{train}"),
               "COMPRESSOR_CACHE_DIR": str(tmp_path / f"passes{train}")}
        out_dir = tmp_path / f"out{train}"
        runs[train + test] = (_peak_of_run(model, recipe, data, out_dir, env), out_dir)
    peaks = {}
    for n, (proc, out_dir) in runs.items():
        out, err = proc.communicate(timeout=300)
        line = next((ln for ln in out.splitlines() if ln.startswith("PEAK ")), None)
        assert line is not None, err[-3000:]
        got = json.loads(line[5:])
        assert got["code"] in (0, 1), err[-3000:]  # 1: an acceptance limit missed; the run itself completed
        peaks[n] = got["peak_kib"] / 1024
        report = json.loads((out_dir / "report.json").read_text())
        assert [r["name"] for r in report["results"]] == ["source", "openvino-fp32"], report["results"]
    assert peaks[2000] <= 1.25 * peaks[200] + 40, peaks  # MB


def test_preprocess_by_table_gives_the_bits_of_the_formula():
    rng = np.random.default_rng(0)
    for prep in (PREP, Preprocessing(mean=[0.4914, 0.4822, 0.4465], std=[0.247, 0.2435, 0.2616]),
                 Preprocessing(mean=[0.5], std=[0.25], scale=1.0)):
        for shape in ((3, 5, 7, 3), (2, 4, 4, 1)):
            images = rng.integers(0, 256, shape, dtype=np.uint8)
            channels = shape[-1]
            want = (images.astype(np.float32) * np.float32(prep.scale) - np.asarray(prep.mean[:channels], np.float32)) \
                / np.asarray(prep.std[:channels], np.float32)
            got = preprocess(images, prep)
            assert got.flags.c_contiguous and np.array_equal(got, want.transpose(0, 3, 1, 2))
