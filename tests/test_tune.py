"""Issue 14, part 3: compress tune builds a search space, screens candidates on validation images
held out of the training split, times the survivors in one session, and writes the choice and a
recipe that rebuilds it exactly."""

from __future__ import annotations

import json

import pytest
import yaml

from compressor.devices import resolve
from compressor.environment import default_threads
from compressor.tune import (TIE_MARGIN, pareto, search_space, thread_counts, tune_recipe, tuned_recipe,
                             validation_images_default)

from .conftest import cli, one_error_line


def test_the_search_space_follows_the_device():
    amx, _ = search_space(resolve("x86-amx"), "torch", 0.5, ("openvino",))
    avx2, left = search_space(resolve("x86-avx2"), "torch", 0.5, ("openvino",))
    assert {"ov_bf16", "ov_int8_bf16"} <= {c.name for c in amx}
    assert not {"ov_bf16", "ov_int8_bf16"} & {c.name for c in avx2}
    assert any("no native bf16" in x["why"] for x in left)
    arm, left = search_space(resolve("arm64"), "torch", 0.5, ("openvino", "tflite"))
    assert all(c.target == "tflite" for c in arm) and any("does not run openvino" in x["why"] for x in left)
    onnx, left = search_space(resolve("x86-avx2"), "onnx", 0.5, ("onnxruntime", "tflite"))
    assert all("export_onnx" not in c.passes for c in onnx) and any("input is ONNX" in x["why"] for x in left)


def test_tflite_candidates_are_built_from_the_unfused_model_and_the_rest_after_fuse():
    """litert-torch folds batch norm itself; the engine it built from the fused ResNet-50 ran about 1 %
    slower than the one from the source (benchmarks/results/tune_peers_resnet50)."""
    device = resolve("x86-amx")
    cands, _ = search_space(device, "torch", 0.5, ("openvino", "onnxruntime", "tflite"))
    recipe = tune_recipe(cands, device, {}, {})
    assert "fuse" not in recipe["passes"] and recipe["targets"] == [{"tflite": {"quantization": "none"}}]
    branches = {b["name"]: b["passes"] for b in recipe["branches"]}
    assert "fuse" not in branches["tfl_int8"] and branches["tfl_int8_fused"] == ["fuse"]  # TFLite INT8 both ways
    others = [n for n in branches if not n.startswith("tfl_")]
    assert others and all(branches[n][0] == "fuse" for n in others)
    by_name = {c.name: c for c in cands}
    assert tuned_recipe(by_name["tfl_int8"], device, {}, 0.5, "m.pt")["passes"] == []
    assert tuned_recipe(by_name["ov_int8_perf_minmax"], device, {}, 0.5, "m.pt")["passes"][0] == "fuse"
    # without a TFLite candidate the main chain fuses once, for every branch
    ov, _ = search_space(device, "torch", 0.5, ("openvino",))
    recipe = tune_recipe(ov, device, {}, {})
    assert recipe["passes"] == ["fuse"] and all("fuse" not in b["passes"] for b in recipe["branches"])
    onnx, _ = search_space(device, "onnx", 0.5, ("onnxruntime",))
    assert not any(c.fused for c in onnx) and "fuse" not in tune_recipe(onnx, device, {}, {})["passes"]


def test_a_tie_on_speed_goes_to_the_higher_validation_top1():
    from compressor.tune import Candidate, Screen, summarise

    cands = [Candidate("a", "tflite", "int8", "A"), Candidate("b", "tflite", "int8", "B", fused=True)]

    def summary(p50_b, val_b):
        report = {"engines": [{"name": "tflite-int8"}, {"name": "b-tflite-int8"}],
                  "results": [{"name": n, "top1": t, "latency_ms": {"p50": p}} for n, t, p in
                              (("source", 80.0, 10.0), ("tflite-int8", 79.8, 1.0), ("b-tflite-int8", 79.7, p50_b))]}
        screen = Screen(0.5, 1000, [])
        screen.source_top1 = 85.0
        screen.rows = [{"name": "tflite-int8", "validation_top1": 84.9, "drop": 0.1, "kept": True},
                       {"name": "b-tflite-int8", "validation_top1": val_b, "drop": 85.0 - val_b, "kept": True}]
        return summarise(report, cands, [], screen, resolve("x86-amx"), 0.5, 1.0)

    s = summary(1.02, 85.0)  # within 3 %, better on validation images: b
    assert s["chosen"]["engine"] == "b-tflite-int8"
    assert "within 3% of the fastest" in s["candidates"][1]["verdict"] and s["candidates"][0]["verdict"].startswith("tied")
    assert summary(1.02, 84.9)["chosen"]["engine"] == "tflite-int8"  # same validation top-1: the search order
    assert summary(1.10, 85.0)["chosen"]["engine"] == "tflite-int8"  # 10 % slower is no tie
    s = summary(0.99, 84.0)  # b the fastest, a within 3 % and better on validation
    assert s["chosen"]["engine"] == "tflite-int8"


def test_thread_counts_go_from_one_to_every_core():
    assert thread_counts(1) == [1] and thread_counts(2) == [1, 2] and thread_counts(16) == [1, 8, 16]


def test_validation_images_follow_the_budget():
    """What the confidence bound needs to prove the budget with no disagreement (0.5 points: 736 images,
    ln(0.025) / ln(0.995)), at least 500; the screen adds what the disagreement it sees needs."""
    assert [validation_images_default(d) for d in (0.1, 0.5, 1.0, 5.0)] == [3688, 736, 500, 500]
    assert validation_images_default(0.5, 0.99) == 1058


def test_pareto_front():
    pts = [("a", 90.0, 1.0), ("b", 89.0, 0.5), ("c", 88.0, 0.7), ("d", 90.0, 2.0)]
    assert pareto(pts) == ["a", "b"]


def test_tune_chooses_the_fastest_survivor_and_tuned_yaml_rebuilds_it(model_files, digits_folder, tmp_path, capsys):
    out = tmp_path / "tune"
    code, stdout, err = cli(capsys, "tune", model_files["pickle"], "--data", digits_folder, "--max-drop", "1.0",
                            "--targets", "onnxruntime", "--device", "x86-avx2", "--trust-model", "--out", out,
                            "--quick", "-q")
    assert code == 0, err[-3000:]
    summary = json.loads((out / "tune.json").read_text())
    rows = summary["candidates"]
    assert {r["candidate"] for r in rows} >= {"ort_fp32", "ort_int8_minmax_pc", "ort_int8_budget"}
    for r in rows:  # what was timed proved the budget on validation images (the bound); what was dropped did not
        if r.get("p50_ms") is not None:
            assert r["validation_drop"] <= r["validation_drop_bound"] <= 1.0 and r["validation_images"] >= 500
        elif r.get("validation_drop") is not None:
            assert r["validation_drop_bound"] > 1.0
            assert r["verdict"].startswith(("over budget", "not proven within the budget")), r["verdict"]
    assert summary["validation"]["confidence"] == 0.95
    assert "upper confidence bound of the drop at 95%" in (out / "tune.md").read_text()
    timed = [r for r in rows if r.get("p50_ms") is not None]
    chosen = summary["chosen"]
    fastest = min(r["p50_ms"] for r in timed)  # within TIE_MARGIN of the fastest, the best on validation images
    ties = [r for r in timed if r["p50_ms"] <= (1 + TIE_MARGIN) * fastest]
    row_c = next(r for r in rows if r["engine"] == chosen["engine"])
    assert chosen["p50_ms"] <= (1 + TIE_MARGIN) * fastest
    assert row_c["validation_top1"] == max(r["validation_top1"] for r in ties)
    assert all(r["verdict"].startswith("tied") for r in ties if r is not row_c)
    assert summary["device"]["name"] == "x86-avx2"
    assert {"tune.md", "tuned.yaml", "report.md"} <= {p.name for p in out.iterdir()}
    assert "Chosen: `" in (out / "tune.md").read_text() and chosen["engine"] in stdout
    tuned = yaml.safe_load((out / "tuned.yaml").read_text())
    assert tuned["device"] == "x86-avx2" and len(tuned["targets"]) == 1
    # threads: every Pareto-front engine timed at 1..all cores; the chosen one's fastest count is pinned
    sweep = summary["threads"]
    assert sweep["counts"] == thread_counts(default_threads())
    front = {r["engine"] for r in rows if r.get("pareto") and r.get("engine")}
    assert {r["engine"] for r in sweep["rows"]} == front and chosen["engine"] in front
    mine = next(r for r in sweep["rows"] if r["engine"] == chosen["engine"])
    assert all(v > 0 for v in mine["p50_ms"].values())
    assert chosen["threads"] == mine["fastest_threads"] == tuned["evaluation"]["threads"]
    assert mine["p50_ms"][str(chosen["threads"])] == min(mine["p50_ms"].values())
    assert "thread(s)" in (out / "tune.md").read_text()
    # CI rebuilds the chosen engine from tuned.yaml: the same bytes
    code, _, err = cli(capsys, model_files["pickle"], "--recipe", out / "tuned.yaml", "--trust-model", "--data",
                       digits_folder, "--out", tmp_path / "again", "-q")
    assert code in (0, 1), err[-3000:]
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    engine = again["engines"][0]["name"]
    first = sorted((out / "engines" / chosen["engine"]).glob("model.*"))
    second = sorted((tmp_path / "again" / "engines" / engine).glob("model.*"))
    assert first and [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    # a second tune into the same directory needs --overwrite, and then resumes from the pass cache
    line = one_error_line(*cli(capsys, "tune", model_files["pickle"], "--data", digits_folder, "--max-drop", "1.0",
                               "--targets", "onnxruntime", "--trust-model", "--out", out, "--quick", "-q"))
    assert "--overwrite" in line


def test_budget_min_stops_starting_candidates(model_files, digits_folder, tmp_path, capsys):
    out = tmp_path / "tune"
    code, _, err = cli(capsys, "tune", model_files["pickle"], "--data", digits_folder, "--max-drop", "5",
                       "--targets", "onnxruntime", "--trust-model", "--out", out, "--budget-min", "0.0001",
                       "--validation-images", "100", "--quick", "-q")
    assert code == 0, err[-3000:]
    rows = json.loads((out / "tune.json").read_text())["candidates"]
    assert rows[0].get("p50_ms") is not None  # the first candidate always runs
    assert all(r["verdict"] == "not tried: --budget-min spent" for r in rows[1:])


def test_unknown_target_is_one_line(model_files, digits_folder, tmp_path, capsys):
    code, out, err = cli(capsys, "tune", model_files["pickle"], "--data", digits_folder, "--max-drop", "1",
                         "--targets", "coreml", "--out", tmp_path / "o")
    assert "coreml" in one_error_line(code, out, err) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, says", [
    (("--max-drop", "1", "--device", "x86-amx", "--device", "x86-avx2"),
     "given 2 times (x86-amx, x86-avx2); give it once"),
    (("--max-drop", "nan"), "'nan' is not a finite number"),
    (("--max-drop", "1", "--budget-min", "inf"), "'inf' is not a finite number"),
])
def test_tune_refuses_a_device_given_twice_and_numbers_that_are_not_finite(model_files, digits_folder, tmp_path,
                                                                            capsys, args, says):
    """tune took the last of two --device, and click's FloatRange lets nan through every bound."""
    code, out, err = cli(capsys, "tune", model_files["pickle"], "--data", digits_folder, *args,
                         "--out", tmp_path / "o")
    assert says in one_error_line(code, out, err) and not (tmp_path / "o").exists()
