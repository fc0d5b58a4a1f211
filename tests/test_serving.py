"""Serving-shaped measurement (compressor/serving.py): a run with evaluation.serving on the tiny digits
model gives figures for every engine (OpenVINO, ONNX Runtime, LiteRT); compress serve RUN_DIR writes
serving.json/.md and refuses what it cannot serve; double buffering overlaps decoding and inference;
the engine with the preprocessing folded in gives the host's classes, in RGB and in BGR channel order."""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest

from compressor.artifact import Preprocessing
from compressor.serving import (Frames, ServingSettings, crop_box, host_u8, native_u8, serve_engine, stream,
                                measure_sync)
from compressor.serving_runtimes import ThreadPool

from .conftest import PREP, cli, one_error_line, write_recipe

SERVING_RECIPE = """
name: serving_tiny
data:
  source: digits
  calibration: {samples: 64}
  evaluation: {limit: 40}
passes:
  - fuse
targets:
  - openvino
  - onnxruntime
  - tflite: {quantization: none}
evaluation:
  batch_size: 64
  warmup: 2
  latency_runs: 10
  latency_rounds: 2
  latency_min_seconds: 0
  latency_warm_ms: 1
  paced_rate_hz: null
  throughput_batch: 8
  throughput_seconds: 0.05
  serving: true
  serving_images: 12
  serving_in_flight: [1, 2]
  serving_seconds: 0.15
  serving_batches: [1, 4]
  serving_latency_ms: 1000
"""
TRIED = {1, 2}


@pytest.fixture(scope="module")
def served_run(model_files, tmp_path_factory):
    """One run of the tiny model with evaluation.serving on: (run directory, report)."""
    from compressor.cli import main

    d = tmp_path_factory.mktemp("serving")
    recipe = write_recipe(d / "serving.yaml", SERVING_RECIPE)
    out = d / "run"
    code = main([str(model_files["pickle"]), "--recipe", str(recipe), "--trust-model", "--out", str(out), "-q",
                 "--cache-dir", str(d / "cache")])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_a_run_serves_every_engine(served_run):
    out, report = served_run
    serving = report["serving"]
    built = {e["name"] for e in report["engines"] if e["built"]}
    rows = {r["engine"]: r for r in serving["engines"]}
    assert set(rows) == built and {"openvino", "onnxruntime", "tflite"} <= {r["target"] for r in rows.values()}
    for name, r in rows.items():
        assert "error" not in r, (name, r)
        sync = r["sync"]["host"]
        assert sync["fps"] > 0 and sync["latency_ms"]["p99"] >= sync["latency_ms"]["p50"] > 0, name
        assert set(sync["stages_ms"]) == {"decode_resize", "normalize", "infer", "argmax"}
        assert 0 < sync["outside_engine_share"] < 1
        a = r["async"]
        tried = {w["in_flight"] for w in a["sweep"]}
        assert TRIED <= tried and a["best_in_flight"] in tried, name
        assert a["fps"] == max(w["fps"] for w in a["sweep"]) > 0
        for w in a["sweep"]:
            assert w["inference_only_fps"] > 0 and w["latency_ms"]["p99"] >= w["latency_ms"]["p50"] > 0
        assert a["inference_only_fps"] == max(w["inference_only_fps"] for w in a["sweep"])
        dyn = r["dynamic_batching"]
        assert "error" not in dyn, (name, dyn)
        if "sweep" in dyn:
            assert {b["batch"] for b in dyn["sweep"]} == {1, 4} and dyn["best_batch"] in {1, 4}
        else:
            assert dyn["skipped"]
        mem = r["memory"]
        assert "error" not in mem, (name, mem)
        assert mem["in_flight"] == max(2, a["best_in_flight"])
        assert mem["in_flight_mb"] >= mem["load_run_mb"] > mem["import_mb"] > 0
        assert r["top1_host"] > 50  # the classes served are the model's, not noise
    ov = next(r for r in rows.values() if r["target"] == "openvino")
    assert ov["async"]["optimal_infer_requests"] in {w["in_flight"] for w in ov["async"]["sweep"]}
    assert ov["referee"]["benchmark_app_fps"] > 0 and ov["referee"]["ours_fps"] > 0, ov["referee"]
    rounds = ov["referee"]["rounds"]  # alternating rounds; the figures are their medians
    assert len(rounds) == 3 and all(x["ours_fps"] > 0 and x["benchmark_app_fps"] > 0 for x in rounds)
    assert ov["referee"]["ours_fps"] == sorted(x["ours_fps"] for x in rounds)[1]
    assert ov["memory"]["unshared_mb"] >= ov["memory"]["in_flight_mb"]
    from compressor.serving import opencv_available

    if opencv_available():  # the serving extra: the host's decode by OpenCV too, the same classes
        for r in rows.values():
            assert r["sync"]["opencv"]["fps"] > 0 and r["async"]["opencv"]["fps"] > 0, r["engine"]
            assert r["opencv_agreement"] >= 90.0, r["engine"]
    folded = {"openvino": {"normalize", "resize"}, "onnxruntime": {"normalize"}, "tflite": set()}
    for r in rows.values():
        assert set(r.get("sync_folded") or {}) == folded[r["target"]], r["engine"]
        assert r["async"]["e2e_best_fps"] >= r["async"]["fps"] and 0 < r["async"]["cpu_bound_fps"]
    md = (out / "report.md").read_text()
    assert "## Serving: from image bytes to class index" in md and "### Dynamic batching" in md
    assert {g["engine"] for g in serving["goals"]} == set(rows)
    for name, r in rows.items():  # both e2e goals: against inference only, and against what the cores allow
        kinds = {g["goal"].split(" >= ")[0] for g in serving["goals"] if g["engine"] == name}
        assert {"end-to-end", "end-to-end (host preprocessing)"} <= kinds, (name, kinds)
        share = next(g for g in serving["goals"] if g["engine"] == name and "CPU bound" in g["goal"])["value"]
        assert share == round(r["async"]["fps"] / r["async"]["cpu_bound_fps"], 3)


def test_folded_preprocessing_gives_the_host_classes(served_run):
    """The same JPEGs through the engines with preprocessing folded in (OpenVINO's PrePostProcessor,
    nodes prepended to the ONNX graph) and through the host's decode + preprocess: the same class for
    each where only the normalization moved (the same arithmetic); where OpenVINO resizes too, its
    own linear resize against Pillow's (these 8x8 digits are upscaled: no antialiasing to differ)."""
    _, report = served_run
    for r in report["serving"]["engines"]:
        if r["target"] == "tflite":
            assert "no preprocessing folded" in r["folded_refusal"]
            continue
        assert r["folded_agreement"]["normalize"] == 100.0, r["folded_differs"]
        for what, f in r["sync_folded"].items():
            assert f["fps"] > 0 and set(f["stages_ms"]) == {"decode", "infer", "argmax"}, (r["engine"], what)
            assert f["outside_engine_share"] < 1
            assert r["async"]["folded"][what]["fps"] > 0
    ov = next(r for r in report["serving"]["engines"] if r["target"] == "openvino")
    assert ov["folded_agreement"]["resize"] >= 90.0, ov["folded_differs"]


def _photos(sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    """Non-square JPEGs: a digit drawn large, stretched to each (width, height)."""
    from PIL import Image

    from compressor.data import digits_source

    src = digits_source("test")
    out = []
    for k, (w, h) in enumerate(sizes):
        img = Image.fromarray(src.arrays[(seed + k) * 7 % len(src)]).convert("RGB").resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def test_folded_engine_matches_host_on_photos_of_other_sizes(served_run):
    """Photos larger than the input and of other shapes: with the normalization folded in, the classes
    are the host's on every photo; with the resize folded in too, on most."""
    out, report = served_run
    from compressor.job import engines_of_run

    engine = next(e for e in engines_of_run(out, report) if e.target == "openvino")
    blobs = _photos([(40, 28), (28, 40), (64, 48), (33, 17), (100, 100), (23, 31)])
    frames = Frames(blobs, None, "test photos", {"JPEG": len(blobs)}, (40, 40))
    settings = ServingSettings(threads=2, images=len(blobs), in_flight=[1], seconds=0.05, batches=[1],
                               memory=False, referee=False)
    row = serve_engine(engine, frames, PREP, [1, 3, 16, 16], settings, lambda _m: None)
    assert row["folded_agreement"]["normalize"] == 100.0, row["folded_differs"]
    # OpenVINO's linear resize does not antialias as Pillow's does when it shrinks: close, not equal
    assert row["folded_agreement"]["resize"] >= 50.0, row["folded_differs"]


def _colour_photos(sizes: list[tuple[int, int]]) -> list[bytes]:
    """:func:`_photos` with each channel a different function of the digit, so that channel order matters."""
    from PIL import Image

    out = []
    for blob in _photos(sizes):
        with Image.open(io.BytesIO(blob)) as img:
            g = np.asarray(img.convert("L")).astype(np.int32)
        arr = np.stack([g, 255 - g, (g * 3) % 256], -1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def test_bgr_serves_in_the_models_channel_order(served_run):
    """color: BGR on the host (Pillow and OpenCV decodes) and with the preprocessing folded into ONNX
    Runtime and OpenVINO: the frame reaches the engine in B, G, R order, and the folded engines give
    the host's classes (normalize folded: the host's outputs)."""
    from compressor.data import preprocess
    from compressor.job import engines_of_run
    from compressor.serving import host_input, opencv_available, opencv_u8
    from compressor.serving_runtimes import backend_for

    out, report = served_run
    blobs = _colour_photos([(40, 28), (28, 40), (64, 48), (33, 17), (23, 31)])
    rgb = Preprocessing(mean=[0.2, 0.5, 0.7], std=[0.3, 0.6, 0.4])
    bgr = Preprocessing(color="BGR", mean=rgb.mean[::-1], std=rgb.std[::-1])
    for blob in blobs:
        assert np.array_equal(host_u8(blob, (16, 16), bgr), host_u8(blob, (16, 16), rgb)[..., ::-1])
        assert np.array_equal(native_u8(blob, bgr), native_u8(blob, rgb)[..., ::-1])
        assert np.abs(host_input(blob, (16, 16), bgr) - host_input(blob, (16, 16), rgb)[:, ::-1]).max() <= 1e-6
        if opencv_available():
            cv = opencv_u8(blob, (16, 16), bgr)
            assert np.array_equal(cv, opencv_u8(blob, (16, 16), rgb)[..., ::-1])
            assert np.abs(cv.astype(np.int32) - host_u8(blob, (16, 16), bgr)).mean() < 4  # the same order, B, G, R
    engines = {e.target: e for e in engines_of_run(out, report)}
    for target in ("onnxruntime", "openvino"):
        backend = backend_for(engines[target], threads=2, input_shape=(1, 3, 16, 16))
        runner, folded = backend.sync_runner(), backend.folded_sync(bgr, "normalize")
        try:
            runner.prepare(1)
            for blob in blobs:
                u8 = host_u8(blob, (16, 16), bgr)
                host, inside = np.asarray(runner(preprocess(u8, bgr))), np.asarray(folded(u8))
                assert np.abs(host - inside).max() <= 1e-3 * max(1.0, float(np.abs(host).max())), target
        finally:
            runner.close()
            getattr(folded, "close", lambda: None)()
            backend.close()
    frames = Frames(blobs, None, "colour photos", {"JPEG": len(blobs)}, (40, 40))
    settings = ServingSettings(threads=2, images=len(blobs), in_flight=[1], seconds=0.05, batches=[1],
                               memory=False, referee=False)
    row = serve_engine(engines["openvino"], frames, bgr, [1, 3, 16, 16], settings, lambda _m: None)
    assert row["folded_agreement"]["normalize"] == 100.0, row["folded_differs"]
    assert row["folded_agreement"]["resize"] >= 50.0, row["folded_differs"]
    if opencv_available():
        assert row["opencv_agreement"] >= 80.0


def test_crop_box_keeps_what_resize_then_center_crop_keeps():
    if "center_crop" not in Preprocessing.model_fields:
        pytest.skip("this Preprocessing has no resize / center_crop")
    prep = Preprocessing(resize=8, center_crop=8)
    assert crop_box(64, 32, prep) == (16, 0, 48, 32)  # the shorter side is kept whole, the middle of the longer
    assert crop_box(32, 64, Preprocessing(resize=16, center_crop=8)) == (8, 24, 24, 40)
    assert crop_box(50, 40, Preprocessing()) is None
    # resize 20 + center crop 16 of a 40x80 photo: the crop is 16/20 of the shorter side
    blob = _photos([(40, 80)])[0]
    prep = Preprocessing(resize=20, center_crop=16, mean=[0.5] * 3, std=[0.5] * 3)
    host = host_u8(blob, (16, 16), prep)[0].astype(np.float32)
    native = native_u8(blob, prep)[0]
    assert native.shape[:2] == (32, 32)  # the box: 16 of the resized 20x40 is 32 of the photo's 40x80
    from PIL import Image

    folded = np.asarray(Image.fromarray(native).resize((16, 16), Image.BILINEAR)).astype(np.float32)
    assert np.abs(host - folded).mean() < 12  # the same region of the photo, resized by another path


def test_double_buffering_overlaps_decoding_and_inference():
    """Decoding takes 4 ms and inference 4 ms, both releasing the GIL (as PIL and the runtimes do): one
    at a time that is 125 frames a second; with decoding of frame i+1 during inference of frame i, close
    to 250 with one request in flight."""
    def decode(_b):
        time.sleep(0.004)
        return np.zeros((1, 3), np.float32)

    def infer(x):
        time.sleep(0.004)
        return np.ones((len(x), 3), np.float32)

    pool = ThreadPool([infer])
    try:
        e2e = stream([b"x"] * 4, decode, pool, seconds=0.6, warm=0.05, decoders=1, depth=1)
    finally:
        pool.close()
    assert 150 < e2e["fps"] < 260, e2e  # well above 125 even where a loaded machine wakes threads late
    assert e2e["latency_ms"]["p99"] >= e2e["latency_ms"]["p50"] >= 7.5  # decode + inference, at least
    sync, classes = measure_sync([b"x"] * 2, [("decode", decode), ("infer", infer), ("argmax", lambda y: 0)],
                                 seconds=0.2, warm=0.01)
    assert sync["fps"] < 130 and classes == [0, 0]
    assert 0.4 < sync["outside_engine_share"] < 0.6


def test_a_failing_request_is_raised_not_swallowed():
    def infer(x):
        raise ValueError("engine fell over")

    pool = ThreadPool([infer])
    try:
        with pytest.raises(ValueError, match="fell over"):
            stream([b"x"], lambda b: np.zeros((1, 1), np.float32), pool, seconds=0.1, warm=0.0, decoders=1, depth=1)
    finally:
        pool.close()


def test_serve_command_writes_and_refuses_to_replace(served_run, tmp_path, capsys, model_files):
    out, _ = served_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    args = ["serve", run, "--trust-model", "--images", "6", "--seconds", "0.05", "--in-flight", "1",
            "--batches", "1", "--no-memory", "--no-referee"]
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    section = json.loads((run / "serving.json").read_text())
    assert section["settings"]["images"] == 6 and section["frames"]["count"] == 6
    assert {r["target"] for r in section["engines"]} == {"openvino", "onnxruntime", "tflite"}
    assert "# Serving: from image bytes to class index" in (run / "serving.md").read_text()
    assert "wrote" in stdout
    before = (run / "serving.json").read_bytes()
    line = one_error_line(*cli(capsys, *args))
    assert "serving.json" in line and "--overwrite" in line
    assert (run / "serving.json").read_bytes() == before
    code, _, err = cli(capsys, *args, "--overwrite")
    assert code == 0, err
    # a run directory holding serving figures is still a run directory the next run may replace
    from compressor.job import preflight_out_dir

    preflight_out_dir(run, overwrite=True)


def test_serve_refuses_what_it_cannot_serve(served_run, tmp_path, capsys):
    out, _ = served_run
    line = one_error_line(*cli(capsys, "serve", tmp_path / "nowhere"))
    assert "not a compressor run directory" in line
    (tmp_path / "empty").mkdir()
    assert "not a compressor run directory" in one_error_line(*cli(capsys, "serve", tmp_path / "empty"))
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "engines" / "onnxruntime-fp32" / "model.onnx").unlink()
    line = one_error_line(*cli(capsys, "serve", run, "--trust-model"))
    assert "model.onnx is missing" in line
    assert not (run / "serving.json").exists()
    line = one_error_line(*cli(capsys, "serve", out, "--in-flight", "0,2"))
    assert "--in-flight" in line
    line = one_error_line(*cli(capsys, "serve", out, "--trust-model", "--model", tmp_path / "none.pt"))
    assert "is not found" in line
