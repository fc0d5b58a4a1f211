"""Issue 22, part 1: accuracy budgets judged by a one-sided upper confidence bound of the drop
(compressor.bound), not by its point estimate: the bound's arithmetic against hand-computed cases,
its coverage, images_needed, budgets a point estimate calls met and the bound does not, and the
refusal of confidence values and fixed image counts that cannot prove a budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import beta

from compressor.bound import (DropBound, drop_interval, fixed_count_problem, from_predictions, images_needed,
                              lower_bound, paired, planned_images, upper_bound)

from .conftest import cli, one_error_line, write_recipe
from .test_bad_input import FAST_RECIPE

# ---------------------------------------------------------------------- arithmetic


def test_no_disagreement_on_1000_images_bounds_the_drop_at_0_37_point():
    """m = 0: D_U = 100 (1 - (alpha/2)^(1/n)) = 100 (1 - 0.025^(1/1000))."""
    assert upper_bound(1000, 0, 0, 0.95) == pytest.approx(0.3682, abs=1e-4)
    assert upper_bound(1000, 0, 0, 0.95) == pytest.approx(100 * (1 - 0.025 ** (1 / 1000)), rel=1e-9)
    assert upper_bound(1000, 0, 0, 0.95) == pytest.approx(100 * math.log(2 / 0.05) / 1000, rel=0.01)


def test_losses_and_gains_against_beta_quantiles_by_hand():
    """n 1000, 6 lost, 2 gained: pi_U = Beta(0.975; 9, 992), q_U = Beta(0.975; 7, 2), D_U = 100 pi_U (2 q_U - 1)."""
    pi_u, q_u = beta.ppf(0.975, 8 + 1, 1000 - 8), beta.ppf(0.975, 6 + 1, 8 - 6)
    assert upper_bound(1000, 6, 2) == pytest.approx(100 * pi_u * (2 * q_u - 1), rel=1e-9)
    assert upper_bound(1000, 6, 2) == pytest.approx(1.4702, abs=1e-4)
    # more gained than lost, q_U < 1/2: the lower limit of pi gives the (negative) bound
    pi_l, q_u = beta.ppf(0.025, 20, 1000 - 20 + 1), beta.ppf(0.975, 2 + 1, 20 - 2)
    assert 2 * q_u - 1 < 0
    assert upper_bound(1000, 2, 18) == pytest.approx(100 * pi_l * (2 * q_u - 1), rel=1e-9)
    assert upper_bound(1000, 2, 18) == pytest.approx(-0.4487, abs=1e-4)
    # the lower bound is the upper one with losses and gains swapped; the interval holds the point
    assert lower_bound(1000, 6, 2) == pytest.approx(-upper_bound(1000, 2, 6))
    low, high = drop_interval(1000, 6, 2)
    assert low < 0.4 < high and high > upper_bound(1000, 6, 2)


def test_the_bound_covers_the_true_drop_at_least_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for n, pi, q in ((400, 0.05, 0.6), (1000, 0.03, 0.5), (300, 0.02, 0.3), (2000, 0.01, 0.9)):
        true = 100 * pi * (2 * q - 1)
        m = rng.binomial(n, pi, 400)
        b = rng.binomial(m, q)
        misses = sum(upper_bound(n, int(bb), int(mm - bb)) < true for mm, bb in zip(m, b))
        assert misses / len(m) <= 0.05 + 0.02, (n, pi, q, misses)


def test_paired_counts_lost_and_gained_images():
    ref = np.array([1, 1, 1, 0, 0, 1], bool)
    eng = np.array([1, 0, 0, 1, 0, 1], bool)
    v = paired(ref, eng, budget=50.0)
    assert (v.images, v.lost, v.gained) == (6, 2, 1) and v.point == pytest.approx(100 / 6)
    assert v.bound == pytest.approx(upper_bound(6, 2, 1)) and v.met is (v.bound <= 50.0)
    labels = np.array([3, 1, 2])
    assert from_predictions([3, 1, 0], [3, 0, 2], labels).to_json() == {
        "point": 0.0, "bound": round(upper_bound(3, 1, 1), 4), "images": 3, "lost": 1, "gained": 1,
        "confidence": 0.95, "met": None}
    with pytest.raises(ValueError, match="differ in length"):
        paired(ref, eng[:3])


# ---------------------------------------------------------------------- images needed


def test_images_needed_with_no_disagreement_is_the_closed_form():
    for budget in (0.1, 0.2, 0.5, 1.0):
        n = images_needed(budget)
        assert n == math.ceil(math.log(0.025) / math.log(1 - budget / 100))
        assert upper_bound(n, 0, 0) <= budget < upper_bound(n - 1, 0, 0)
    assert (images_needed(0.5), images_needed(0.2)) == (736, 1843)


def test_images_needed_at_a_disagreement_is_the_smallest_count_that_meets():
    n = images_needed(0.5, 0.95, disagreement=0.03)
    assert n is not None and n > images_needed(0.5)
    assert upper_bound(n, n * 0.015, n * 0.015) <= 0.5 < upper_bound(n - 1, (n - 1) * 0.015, (n - 1) * 0.015)
    assert images_needed(0.5, 0.99, disagreement=0.03) > n  # more confidence, more images
    assert images_needed(0.5, disagreement=0.03, point=0.5) is None  # a point drop at the budget: never
    assert planned_images(0.5, 0.95, 5000) == 736 and planned_images(0.5, 0.95, 500) == 500
    assert planned_images(0.5, 0.95, 50_000, disagreement=0.03, point=0.49) == 10_000  # the cap


# ---------------------------------------------------------------------- the point calls it met, the bound not


def test_a_budget_the_point_estimate_meets_and_the_bound_does_not():
    """200 images, the engine right wherever the float model is: drop 0.00 <= 1.0, bound 1.83 > 1.0;
    368 images with no disagreement would prove it."""
    from compressor.passes._ptq.accuracy_budget import Budget, metrics_block

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 200)
    logits = np.eye(10, dtype=np.float32)[np.where(rng.random(200) < 0.9, labels, (labels + 1) % 10)]
    budget = Budget(max_drop=1.0, x=logits, labels=labels, max_kept_layers=1, threads=1)
    budget.set_reference(lambda x: x)
    found = budget.verdict(lambda x: x)  # no loader: the set cannot grow
    assert found.point == 0.0 and found.point <= budget.max_drop
    assert found.bound == pytest.approx(100 * (1 - 0.025 ** (1 / 200))) and found.bound > 1.0
    assert not budget.holds(found) and found.short_of_images() and found.needed() == 368
    block = metrics_block(budget, method="planted", plain=found, final=found, kept=[], tries=[])
    assert block["met"] is False and block["drop"] == 0.0 and block["drop_bound"] > 1.0
    assert block["images_needed"] == 368 and block["validation_images"] == 200 and block["confidence"] == 0.95


def test_a_budget_grows_its_validation_set_to_what_the_bound_needs():
    from compressor.passes._ptq.accuracy_budget import Budget

    rng = np.random.default_rng(2)
    labels_all = rng.integers(0, 10, 2000)
    x_all = np.eye(10, dtype=np.float32)[labels_all]
    asked: list[int] = []

    def load(count):
        asked.append(count)
        return x_all[:count], labels_all[:count]

    budget = Budget(max_drop=1.0, x=x_all[:200], labels=labels_all[:200], max_kept_layers=1, threads=1,
                    load=load, available=2000)
    budget.set_reference(lambda x: x)
    found = budget.verdict(lambda x: x)
    assert asked == [368] and len(budget.labels) == 368 and budget.grown_from == 200
    assert found.met and found.images == 368 and found.bound <= 1.0


def test_acceptance_max_top1_drop_is_judged_by_the_bound():
    from compressor.evaluate import Measurement
    from compressor.recipe import AcceptanceConfig
    from compressor.report import acceptance_checks, drop_bounds

    labels = np.arange(300) % 10
    wrong = (labels + 1) % 10
    engine = labels.copy()
    engine[:2] = wrong[:2]  # 2 images lost of 300: drop 0.67 point
    rows = [{"name": n, "top1": t} for n, t in (("source", 100.0), ("int8", 100.0 * 298 / 300))]
    ms = [Measurement(n, "t", "p", 0, 0, 0, {}, 0, 0, 1, 1, predictions=p) for n, p in
          (("source", labels), ("int8", engine))]
    drop_bounds(rows, ms, labels, 0.95)
    (check,) = acceptance_checks(rows, AcceptanceConfig(max_top1_drop=1.0))
    assert check["value"] == pytest.approx(0.6667, abs=1e-4) and check["passed"] is False
    assert check["bound"] == pytest.approx(upper_bound(300, 2, 0), abs=1e-4) and check["images"] == 300
    assert check["images_needed"] == images_needed(1.0, 0.95, 2 / 300, 100 * 2 / 300)
    (check,) = acceptance_checks(rows, AcceptanceConfig(max_top1_drop=3.0))
    assert check["passed"] is True and check["bound"] <= 3.0
    del rows[1]["top1_drop_bound"]  # a report without per-image predictions: the point estimate, as before
    assert acceptance_checks(rows, AcceptanceConfig(max_top1_drop=1.0))[0]["passed"] is True


FAST = FAST_RECIPE + "acceptance: {max_top1_drop: 1.0}\n"


def test_a_run_whose_point_drop_meets_max_top1_drop_on_too_few_images_fails_it(tmp_path, capsys, model_files):
    """An FP32 engine of the same model on 60 test images: its point drop is within 1 point, but 60
    images cannot prove 1 point (bound 5.96 with no disagreement): exit 1, the report says why."""
    recipe = write_recipe(tmp_path / "fast.yaml", FAST)
    code, _, err = cli(capsys, model_files["pickle"], "--recipe", recipe, "--trust-model", "--out", tmp_path / "o",
                       "-q")
    assert code == 1, err[-3000:]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    (check,) = [c for c in report["acceptance"]["checks"] if c["metric"] == "top1_drop"]
    assert check["passed"] is False and check["images"] == 60 and check["bound"] > 5.0
    assert check["value"] <= 1.0  # the point estimate alone would have passed it
    row = next(r for r in report["results"] if r["name"] != "source")
    assert row["top1_drop_bound"]["bound"] == check["bound"]
    assert "upper bound" in (tmp_path / "o" / "report.md").read_text()


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("where, value, says", [
    ("acceptance", "{max_top1_drop: 1.0, confidence: 1.0}", "acceptance.confidence"),
    ("acceptance", "{max_top1_drop: 1.0, confidence: 0.4}", "acceptance.confidence"),
    ("pass", "{backend: onnxruntime, max_drop: 1.0, confidence: 1.5}", "quantize_ptq.confidence"),
    ("pass", "{backend: onnxruntime, max_drop: 1.0, validation_samples: 200}", "368 images would"),
    ("target", "{quantization: int8, max_drop: 0.5, validation_samples: 100}", "736 images would"),
    ("target", "{quantization: int8, max_drop: 0.5, confidence: .nan}", "tflite.confidence"),
])
def test_bad_confidence_and_unprovable_counts_are_one_line(tmp_path, capsys, where, value, says):
    text = FAST
    if where == "acceptance":
        text = text.replace("acceptance: {max_top1_drop: 1.0}", f"acceptance: {value}")
    elif where == "pass":
        text = text.replace("  - fuse\n", f"  - fuse\n  - export_onnx\n  - quantize_ptq: {value}\n")
    else:
        text = text.replace("  - onnxruntime\n", f"  - tflite: {value}\n")
    line = one_error_line(*cli(capsys, "validate", write_recipe(tmp_path / "r.yaml", text)))
    assert says in line, line


def test_tune_refuses_validation_images_that_cannot_prove_max_drop(tmp_path, capsys, model_files):
    """Refused before the model or the data is read (the data folder here is empty)."""
    line = one_error_line(*cli(capsys, "tune", model_files["pickle"], "--data", tmp_path, "--max-drop", "1.0",
                               "--validation-images", "300", "--trust-model", "--out", tmp_path / "t", "-q"))
    assert "--validation-images 300 cannot prove --max-drop 1.0" in line and "368 images would" in line
    assert not (tmp_path / "t").exists()


def test_fixed_count_problem_names_the_fields():
    assert fixed_count_problem(1.0, 400, 0.95) is None and fixed_count_problem(None, 10, 0.95) is None
    assert "validation_samples 300 cannot prove max_drop 1.0" in fixed_count_problem(1.0, 300, 0.95)


def test_drop_bound_describes_itself():
    v = DropBound(point=0.1, bound=0.45, images=1000, lost=12, gained=11, confidence=0.95, budget=0.5)
    assert v.met and v.describe() == "drop 0.10 (bound 0.45 at 95%, 1000 images, 12 lost, 11 gained)"
