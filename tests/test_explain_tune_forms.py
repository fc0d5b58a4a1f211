"""Issue 21, sections 2-4: compress explain and compress tune on a state dict (--arch), and explain
refusing another model or data set than the run's.

A run made from a state dict records its architecture, class count, data root and evaluation
limit (report.json's run_options) and explain reuses them; explain refuses (exit 2) a model file
or images whose fingerprint differs from the run's; tune takes --arch/--num-classes, records the
validation images it really used, drops a candidate whose engine bytes equal another's, and
writes a tuned.yaml that `compress MODEL --recipe tuned.yaml` runs as written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from .conftest import cli, one_error_line, write_recipe

ARCH = ["--arch", "torchvision:resnet18", "--num-classes", "10"]
ENGINE = "onnxruntime-int8"
RECIPE = """
name: sd
data:
  source: folder
  calibration: {samples: 30}
passes:
  - export_onnx
  - quantize_ptq: {backend: onnxruntime}
targets: [onnxruntime]
evaluation: {batch_size: 32, warmup: 1, latency_runs: 10, latency_min_seconds: 0, latency_rounds: 1,
             throughput_batch: 4, throughput_seconds: 0.01, threads: 2}
"""


def _digits_folder(root: Path, per_class: tuple[int, int] | None, *, noisy_train: bool = False) -> Path:
    """The bundled digits as an ImageFolder tree at their own 8x8 (``per_class``: at most that many
    train and test images of each class; ``noisy_train``: the training split is uniform noise)."""
    from PIL import Image

    from compressor.data import digits_source

    rng = np.random.default_rng(1)
    for i, split in enumerate(("train", "test")):
        src = digits_source(split)
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            idx = np.flatnonzero(src.labels == c)[: per_class[i] if per_class else None]
            for k, img in enumerate(src.load_images(idx, (8, 8), "RGB")):
                if split == "train" and noisy_train:
                    img = rng.integers(0, 256, size=img.shape, dtype=np.uint8)
                Image.fromarray(img).save(root / split / str(c) / f"{k:04d}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A torchvision ResNet-18 state dict (10 classes, seeded, untrained) and another one."""
    import torchvision

    d = tmp_path_factory.mktemp("weights")
    out = {}
    for seed, name in ((0, "resnet18_weights.pt"), (1, "other_weights.pt")):
        torch.manual_seed(seed)
        out[name.split("_")[0]] = d / name
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / name)
    return out


@pytest.fixture(scope="module")
def sd_run(weights, tmp_path_factory):
    """A state-dict run for the device x86-avx2, with --data, --eval-limit and its own pass cache."""
    from compressor.cli import main

    d = tmp_path_factory.mktemp("sd-run")
    data = _digits_folder(d / "digits", (10, 6))
    recipe = write_recipe(d / "sd.yaml", RECIPE)
    out, cache = d / "out", d / "cache"
    code = main([str(weights["resnet18"]), "--recipe", str(recipe), *ARCH, "--data", str(data), "--eval-limit", "40",
                 "--device", "x86-avx2", "--out", str(out), "--cache-dir", str(cache), "-q"])
    assert code == 0
    return {"out": out, "cache": cache, "data": data, "dir": d}


def _explain(capsys, run: dict, *args) -> tuple[int, str, str]:
    return cli(capsys, "explain", run["out"], "--cache-dir", run["cache"], *args)


def test_a_state_dict_run_records_its_arch_and_explain_reuses_it(sd_run, capsys):
    """Explain after a state-dict run for another device: no --arch, --data or --device needed; every
    pass output comes from the cache (same device, same data); again only with --overwrite."""
    out = sd_run["out"]
    report = json.loads((out / "report.json").read_text())
    assert report["run_options"] == {"arch": "torchvision:resnet18", "num_classes": 10, "eval_limit": 40,
                                     "data_root": str(sd_run["data"].resolve())}
    code, stdout, err = _explain(capsys, sd_run, "--images", 16)
    assert code == 0, err[-2000:]
    data = json.loads((out / "explain.json").read_text())
    assert data["images"]["count"] == 16 and "stages_not_in_cache" not in data
    assert [s["step"] for s in data["stages"]] == ["source", "passes[0].export_onnx", "passes[1].quantize_ptq", ENGINE]
    assert data["engines"][ENGINE]["layers"] and "sensitivity" in data["engines"][ENGINE]
    assert f"{ENGINE}: worst layer" in stdout
    # again: refused without --overwrite, nothing changed; with it, --no-sensitivity
    before = (out / "explain.json").read_bytes()
    assert "--overwrite" in one_error_line(*_explain(capsys, sd_run, "--images", 16))
    assert (out / "explain.json").read_bytes() == before
    code, stdout, err = _explain(capsys, sd_run, "--images", 8, "--no-sensitivity", "--overwrite")
    assert code == 0, err[-2000:]
    data = json.loads((out / "explain.json").read_text())
    assert data["images"]["count"] == 8 and "sensitivity" not in data["engines"][ENGINE]


def test_explain_with_more_images_than_exist_says_how_many_it_used(sd_run, capsys):
    code, stdout, err = _explain(capsys, sd_run, "--images", 100_000, "--no-sensitivity", "--overwrite")
    assert code == 0, err[-2000:]
    data = json.loads((sd_run["out"] / "explain.json").read_text())
    assert data["images"]["count"] == 100 - 30  # the train split less its calibration images
    assert "explained on 70 images, not the 100000 asked for" in stdout


def test_explain_refuses_another_model(sd_run, weights, capsys):
    out = sd_run["out"]
    before = {p.name: p.read_bytes() for p in out.glob("explain.*")}
    line = one_error_line(*_explain(capsys, sd_run, "--model", weights["other"], "--overwrite"))
    assert f"the model {weights['other']} is not the run's: its model file fingerprint" in line
    assert {p.name: p.read_bytes() for p in out.glob("explain.*")} == before


def test_explain_refuses_another_data_set(sd_run, tmp_path, capsys):
    other = _digits_folder(tmp_path / "noisy", (10, 6), noisy_train=True)
    line = one_error_line(*_explain(capsys, sd_run, "--data", other, "--overwrite", "--no-sensitivity"))
    assert "is not the run's: its calibration (training split) images fingerprint" in line


def test_explain_takes_the_runs_model_and_data_moved_elsewhere(sd_run, weights, tmp_path, capsys):
    """--model and --data name the same bytes somewhere else: the same fingerprints, explained."""
    model = shutil.copy(weights["resnet18"], tmp_path / "moved.pt")
    data = shutil.copytree(sd_run["data"], tmp_path / "moved-data")
    code, stdout, err = _explain(capsys, sd_run, "--model", model, "--data", data, "--images", 8, "--no-sensitivity",
                                 "--overwrite")
    assert code == 0, err[-2000:]
    assert "stages_not_in_cache" not in json.loads((sd_run["out"] / "explain.json").read_text())


def test_explain_with_a_deleted_engine_directory_is_one_line(sd_run, tmp_path, capsys):
    run = shutil.copytree(sd_run["out"], tmp_path / "run")
    for f in run.glob("explain.*"):
        f.unlink()
    shutil.rmtree(run / "engines" / ENGINE)
    line = one_error_line(*cli(capsys, "explain", run, "--cache-dir", sd_run["cache"], "--no-sensitivity"))
    assert f"engines/{ENGINE}/engine.json cannot be read" in line
    assert not list(run.glob("explain.*"))


def test_explain_with_a_cleared_cache_says_so_on_the_console(sd_run, tmp_path, capsys):
    code, stdout, err = cli(capsys, "explain", sd_run["out"], "--cache-dir", tmp_path / "empty", "--images", 8,
                            "--no-sensitivity", "--overwrite")
    assert code == 0, err[-2000:]
    data = json.loads((sd_run["out"] / "explain.json").read_text())
    assert data["stages_not_in_cache"] == ["passes[0].export_onnx", "passes[1].quantize_ptq"]
    assert [s["step"] for s in data["stages"]] == ["source", ENGINE]
    notes = [line for line in stdout.splitlines() if line.startswith("no per-pass rows")]
    assert len(notes) == 1 and "passes[0].export_onnx and 1 more" in notes[0] and "pass cache" in notes[0]


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT delivered and at its default, as a shell's foreground job has
    it. A child inherits a blocked signal mask and an ignored disposition from this process: in the
    full suite (fresh-clone CI, twice, never with this file alone) the explain ran on to its end after
    the SIGINT and exited 0; an earlier test leaving SIGINT blocked or ignored is the suspect (not
    yet found)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_explain_keeps_the_previous_explanation(sd_run, tmp_path):
    """Ctrl-C while the sensitivity ranking runs: exit 130, one line, the previous explain.json intact."""
    run = shutil.copytree(sd_run["out"], tmp_path / "run")
    before = (run / "explain.json").read_bytes()
    env = {**os.environ, "COMPRESSOR_CACHE_DIR": str(sd_run["cache"])}
    proc = subprocess.Popen([sys.executable, "-c", "from compressor.cli import entry; entry()", "explain", str(run),
                             "--overwrite", "--images", "16", "-v"], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, preexec_fn=_ctrl_c_as_in_a_terminal)
    seen = []
    for line in proc.stderr:  # the sensitivity ranking has started: the explanation is under way
        seen.append(line)
        if "sensitivity 1/" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seen[-20:], rest)
    assert rest[1].strip().splitlines()[-1] in ("aborted", "interrupted") and "Traceback" not in rest[1]
    assert (run / "explain.json").read_bytes() == before
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".") and "explain" in p.name]


@pytest.fixture(scope="module")
def sd_tune(weights, tmp_path_factory):
    """compress tune on the state dict, kept cheap: ONNX Runtime, one candidate (--budget-min spent at
    once), quick timing; 20000 validation images asked for where the digits' training split has 835
    besides the 512 calibration images. Returns (exit code, console text, output, data, directory)."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from compressor.cli import main

    d = tmp_path_factory.mktemp("sd-tune")
    data = _digits_folder(d / "digits", None)
    out, console = d / "tune", StringIO()
    with redirect_stdout(console), redirect_stderr(console):
        code = main(["tune", str(weights["resnet18"]), *ARCH, "--data", str(data), "--max-drop", "100",
                     "--targets", "onnxruntime", "--device", "x86-avx2", "--validation-images", "20000",
                     "--budget-min", "0.0001", "--eval-limit", "50", "--quick", "--out", str(out),
                     "--cache-dir", str(d / "cache"), "-q"])
    return code, console.getvalue(), out, data, d


def test_tune_on_a_state_dict_records_the_validation_images_it_used_and_warns(sd_tune):
    code, console, out, _, _ = sd_tune
    assert code == 0, console[-2000:]
    summary = json.loads((out / "tune.json").read_text())
    assert summary["validation"]["images"] == 835 and summary["validation"]["requested"] == 20000
    assert "835 validation images (asked for 20000" in (out / "tune.md").read_text()
    said = " ".join(console.split())
    assert "20000 validation images asked for, but the validation images (split 'train', images not used for " \
           "calibration" in said and "are only 835" in said
    assert summary["chosen"] and json.loads((out / "report.json").read_text())["run_options"]["arch"] == ARCH[1]


def test_tuned_yaml_runs_as_the_readme_writes_it(sd_tune, weights, capsys):
    """`compress MODEL --recipe tuned.yaml`, nothing else: the data root and the architecture are in
    tuned.yaml; the engine is the same bytes as the tune's."""
    _, _, out, data, d = sd_tune
    tuned = yaml.safe_load((out / "tuned.yaml").read_text())
    assert tuned["data"]["root"] == str(data.resolve()) and tuned["model"] == {"arch": ARCH[1], "num_classes": 10}
    again = d / "again"
    code, _, err = cli(capsys, weights["resnet18"], "--recipe", out / "tuned.yaml", "--out", again,
                       "--cache-dir", d / "cache", "-q")
    assert code in (0, 1), err[-2000:]  # 1: a miss of max_top1_drop on the test split is not this test's
    chosen = json.loads((out / "tune.json").read_text())["chosen"]["engine"]
    engine = json.loads((again / "report.json").read_text())["engines"][0]["name"]
    first = sorted((out / "engines" / chosen).glob("model.*"))
    assert first and [p.read_bytes() for p in first] == [p.read_bytes() for p in
                                                         sorted((again / "engines" / engine).glob("model.*"))]


def test_tune_drops_and_names_a_candidate_whose_engine_bytes_equal_anothers(model_files, tmp_path):
    """Two ONNX Runtime engines of the same bytes and an OpenVINO one: the screen drops the second
    ONNX Runtime one before validation and timing, and tune.json / tune.md name it and its twin. A
    third copy of the bytes that its target loads with other settings (as OpenVINO's bf16 inference
    precision runs FP32 files) is not a twin."""
    from compressor import get_target
    from compressor.data import DataConfig, open_data
    from compressor.devices import resolve
    from compressor.evaluate import ResultRow
    from compressor.intake import load_model
    from compressor.measure import source_runner
    from compressor.records import RunResult
    from compressor.tune import Candidate, Screen, render, summarise

    art = load_model(model_files["onnx"])
    ort, ov = get_target("onnxruntime")(), get_target("openvino")()
    basic = get_target("onnxruntime")(graph_optimization="basic")  # the same bytes, run otherwise
    engines = [ort.build(art, tmp_path, name="onnxruntime-fp32"), ort.build(art, tmp_path, name="b-onnxruntime-fp32"),
               ov.build(art, tmp_path, name="c-openvino-fp32"), basic.build(art, tmp_path, name="d-onnxruntime-fp32")]
    assert engines[0].path.read_bytes() == engines[1].path.read_bytes() == engines[3].path.read_bytes()
    rows = [ResultRow("source", "onnx", "fp32", source_runner(art, 1), 0)]
    rows += [ResultRow(e.name, e.target, e.precision, e.builder.load(e, threads=1), e.size_bytes, engine=str(e.path))
             for e in engines]
    # 100 images: with no disagreement they prove 5 points (the bound: 3.62), 60 would not (5.96)
    screen = Screen(5.0, 100, [open_data(DataConfig(source="digits", calibration={"samples": 64}))])
    kept = screen(rows, RunResult(source=art, artifacts=[art], records=[], engines=engines))
    for r in rows:
        r.runner.close()
    # d's files are a's bytes, but its runtime loads them with other settings: not a twin
    assert [r.name for r in kept] == ["source", "onnxruntime-fp32", "c-openvino-fp32", "d-onnxruntime-fp32"]
    assert {"name": "b-onnxruntime-fp32", "kept": False, "duplicate_of": "onnxruntime-fp32"} in screen.rows
    cands = [Candidate("a", "onnxruntime", "fp32", "A"), Candidate("b", "onnxruntime", "fp32", "B"),
             Candidate("c", "openvino", "fp32", "C")]
    report = {"engines": [{"name": e.name} for e in engines[:3]],
              "results": [{"name": n, "top1": 90.0, "latency_ms": {"p50": p}, "speedup": 1 / p} for n, p in
                          (("source", 1.0), ("onnxruntime-fp32", 0.5), ("c-openvino-fp32", 0.4))]}
    summary = summarise(report, cands, [], screen, resolve("x86-avx2"), 5.0, 1.0)
    assert summary["duplicates"] == [{"candidate": "b", "engine": "b-onnxruntime-fp32", "same_bytes_as": "a"}]
    row = next(r for r in summary["candidates"] if r["candidate"] == "b")
    assert row["verdict"].startswith("dropped: its engine is byte-identical to a's")
    assert "byte-identical to a's" in render(summary, "compress tune")


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON file"))


def test_explain_json_and_tune_json_are_strict_json(sd_run, sd_tune, tmp_path, capsys):
    """An SQNR of identical outputs is infinite: explain.json and tune.json write it as null, as
    report.json does, so that jq and other languages' parsers read them."""
    from compressor.fidelity.explain import Explanation
    from compressor.fidelity.render import write_outputs as write_explain
    from compressor.tune import write_outputs as write_tune

    code, _, tuned_out, _, _ = sd_tune
    assert code == 0
    code, _, err = _explain(capsys, sd_run, "--images", 8, "--no-sensitivity", "--overwrite")
    assert code == 0, err[-2000:]
    data = _strict((sd_run["out"] / "explain.json").read_text())
    _strict((tuned_out / "tune.json").read_text())
    data["planted"] = {"sqnr_db": float("inf"), "drop": float("nan")}
    (tmp_path / "e").mkdir()
    write_explain(Explanation(data), tmp_path / "e")
    assert _strict((tmp_path / "e" / "explain.json").read_text())["planted"] == {"sqnr_db": None, "drop": None}
    summary = _strict((tuned_out / "tune.json").read_text())
    summary["planted"] = float("inf")
    (tmp_path / "t").mkdir()
    write_tune(tmp_path / "t", summary, None, "compress tune")
    assert _strict((tmp_path / "t" / "tune.json").read_text())["planted"] is None
