"""Issue 22, part 1: does an accuracy budget that validation calls met hold on images the tool never saw?

For each model and budget, one run builds every quantizing backend under ``max_drop`` (OpenVINO
through NNCF accuracy control, ONNX Runtime static INT8, TFLite PT2E INT8, TensorRT's QDQ graph
measured on ONNX Runtime where TensorRT is missing), each judged by the 95 % upper confidence bound
of its validation drop (compressor.bound). Validation (--validation test, the default): half the
test split, class-balanced (data.validation), and every engine is measured on the other half, images
the tool never saw; (--validation train) training images calibration does not use, which the models
were trained on, and the whole test split. The test drop is paired per image with the
source, with its two-sided 95 % interval. The figures: the bound on validation, met or not, the
test drop and its interval, and how often the test drop exceeded a budget that validation said was
met (goal: at most 1 in 20, none by more than its interval). Writes
benchmarks/results/budget_bound/report.json + report.md (--smoke: budget_bound_smoke/).

    .venv/bin/python benchmarks/budget_bound.py                    # ResNet-50 and MobileNetV2, 0.2 and 0.5
    .venv/bin/python benchmarks/budget_bound.py --models mobilenetv2 --backends openvino,tflite --budgets 0.5
    .venv/bin/python benchmarks/budget_bound.py --smoke            # a ResNet-18 trained briefly on the bundled digits
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMPRESS, HERE, REPO, SHARED, scrub, write_text  # noqa: E402
from explain_real import MODELS, cpu  # noqa: E402

BACKENDS = ("openvino", "onnxruntime", "tflite", "tensorrt")
CONFIDENCE = 0.95
QUIET_TIMING = {"warmup": 1, "latency_runs": 10, "latency_min_seconds": 0, "latency_rounds": 1,
                "throughput_batch": 8, "throughput_seconds": 0.1}
"""the run's timing is not this benchmark's figure: as short as the runner allows"""
SMOKE_ARCH = "resnet18"


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot quantize here, or None (TensorRT needs only ModelOpt: without TensorRT its
    QDQ graph is measured on ONNX Runtime)."""
    from compressor.registry import get_target

    if backend == "tensorrt":
        return None if importlib.util.find_spec("modelopt") else "nvidia-modelopt is not installed"
    found = get_target(backend).availability()
    return None if found.ok else found.reason


def branch(backend: str, budget: float) -> dict:
    """The recipe branch that builds ``backend``'s INT8 engine under ``max_drop: budget`` (from the
    main chain's fused model)."""
    ptq = {"max_drop": budget, "kept_layer_latency": False}
    if backend == "tflite":
        return {"name": "tfl", "passes": [], "targets": [{"tflite": {"quantization": "int8", **ptq}}]}
    if backend == "openvino":
        return {"name": "ov", "passes": [{"quantize_ptq": {"backend": "openvino", **ptq}}], "targets": ["openvino"]}
    short = {"onnxruntime": "ort", "tensorrt": "trt"}[backend]
    return {"name": short, "passes": ["export_onnx", {"quantize_ptq": {"backend": backend, **ptq}}],
            "targets": [backend]}


VALIDATION_SHARE = 0.5


def recipe(budget: float, backends: list[str], smoke: bool, validation: str = "test") -> dict:
    """One run for every backend: the main chain fuses batch norm; TFLite builds from it (its budget
    sits on the target), every other backend is a branch. Without TFLite the main chain's target is
    OpenVINO FP32 (a recipe's main chain needs one). ``validation`` test: budgets validate on half the
    test split and every engine is evaluated on the other half; train: on training images calibration
    does not use (the models were trained on them), evaluated on the whole test split."""
    data = ({"source": "digits", "calibration": {"split": "train", "samples": 128, "seed": 0}} if smoke else
            {"source": "cifar10", "calibration": {"split": "train", "samples": 512, "seed": 0}})
    main = branch("tflite", budget)["targets"] if "tflite" in backends else [{"openvino": {"precision_hint": "f32"}}]
    return {"name": f"budget_bound_{budget:g}", "description": f"every quantizing backend under max_drop {budget}",
            "data": {**data, "evaluation": {"split": "test"},
                     **({"validation": {"split": "test", "share": VALIDATION_SHARE, "seed": 0}}
                        if validation == "test" else {})},
            "passes": ["fuse"], "targets": main,
            "branches": [branch(b, budget) for b in backends if b != "tflite"], "evaluation": QUIET_TIMING}


def smoke_model(work: Path) -> tuple[Path, list[str]]:
    """A ResNet-18 trained for one epoch on the bundled digits (a state dict), and its intake flags."""
    from compressor.data import digits_source
    from compressor.demo import save_weights, train_digits_model

    path = work / f"digits_{SMOKE_ARCH}.pt"
    if not path.exists():
        model, top1 = train_digits_model(epochs=1, threads=2, arch=SMOKE_ARCH)
        save_weights(model, path, digits_source("test").classes)
        print(f"smoke model: {SMOKE_ARCH} on digits, test top-1 {top1:.2f}%", flush=True)
    return path, ["--arch", f"torchvision:{SMOKE_ARCH}", "--num-classes", "10"]


def run(name: str, model: Path, recipe_path: Path, extra: list[str], threads: int) -> tuple[dict, dict, float]:
    """One ``compress`` run into benchmarks/work/NAME: its report, its predictions and its seconds."""
    out = HERE / "work" / name
    cmd = [str(COMPRESS), str(model), "--recipe", str(recipe_path), "--trust-model", "--threads", str(threads),
           "--out", str(out), "--overwrite", "-q", *extra]
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    code = subprocess.call(cmd)
    if code not in (0, 1):
        sys.exit(code)
    report = json.loads((out / "report.json").read_text())
    report["command"] = " ".join(cmd)
    with np.load(out / "predictions.npz") as npz:
        predictions = {k: npz[k] for k in npz.files}
    return report, predictions, time.perf_counter() - started


def engine_prefix(report: dict, backend: str, budget: float) -> tuple[str, str]:
    """(what the backend's engine names start with, what its pass steps start with): the main chain's
    engines are named after their target, a branch's after the branch."""
    name = branch(backend, budget)["name"]
    index = next((i for i, b in enumerate(report["recipe_config"].get("branches") or []) if b["name"] == name), None)
    return (f"{backend}-", "passes[") if index is None else (f"{name}-", f"branches[{index}]")


def budget_block(report: dict, engine: str, step: str) -> dict | None:
    """The ``accuracy_budget`` block of a backend: its quantize_ptq pass's, or its tflite target's."""
    for p in report["passes"]:
        if p["step"].startswith(step) and "accuracy_budget" in (p.get("metrics") or {}):
            return p["metrics"]["accuracy_budget"]
    for e in report["engines"]:
        if e["name"].startswith(engine) and "accuracy_budget" in (e.get("info") or {}):
            return e["info"]["accuracy_budget"]
    return None


def rows_of(report: dict, predictions: dict, model: str, budget: float, backends: list[str]) -> list[dict]:
    """One row per backend: its validation verdict and its paired test-split drop."""
    from compressor.bound import drop_interval, paired

    labels = predictions["labels"].astype(np.int64)
    source_ok = predictions["source"].astype(np.int64) == labels
    rows = []
    for backend in backends:
        prefix, step = engine_prefix(report, backend, budget)
        engine = next((n for n in predictions if n.startswith(prefix)), None)
        block = budget_block(report, prefix, step)
        if engine is None or block is None:
            why = next((f["reason"] for f in report.get("failures", []) if f.get("step", "").startswith(step)
                        or prefix in f.get("reason", "")), "no engine row in the report")
            rows.append({"model": model, "budget": budget, "backend": backend, "missing": why})
            continue
        test = paired(source_ok, predictions[engine].astype(np.int64) == labels, confidence=CONFIDENCE)
        low, high = drop_interval(test.images, test.lost, test.gained, CONFIDENCE)
        rows.append({
            "model": model, "budget": budget, "backend": backend, "engine": engine,
            "validation_images": block["validation_images"], "validation_drop": round(block["drop"], 3),
            "validation_bound": block.get("drop_bound"), "met": bool(block["met"]),
            "images_needed": block.get("images_needed"), "kept_in_float": len(block.get("kept_in_float") or []),
            "retry": bool(block.get("retry")),
            "test_images": test.images, "test_drop": round(test.point, 3),
            "test_interval": [round(low, 3), round(high, 3)], "test_lost": test.lost, "test_gained": test.gained,
            "exceeded": bool(block["met"] and test.point > budget),
            "exceeded_beyond_interval": bool(block["met"] and low > budget),
        })
    return rows


def summary(rows: list[dict]) -> dict:
    met = [r for r in rows if r.get("met")]
    exceeded = [r for r in met if r["exceeded"]]
    return {"met_on_validation": len(met), "exceeded_on_test": len(exceeded),
            "exceeded_beyond_interval": sum(r["exceeded_beyond_interval"] for r in met),
            "share_exceeded": round(len(exceeded) / len(met), 3) if met else None,
            "goal": "at most 1 in 20 exceeded, none beyond its interval",
            "goal_met": (len(exceeded) <= len(met) / 20) and not any(r["exceeded_beyond_interval"] for r in met)}


def render(figures: dict) -> str:
    s = figures["summary"]
    lines = ["# Accuracy budgets judged by a confidence bound: validation against the test split", "",
             "| model | budget | backend | validation images | validation drop | bound (95 %) | met | "
             "test drop (95 % interval) | exceeded | layers in float |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in figures["rows"]:
        if "missing" in r:
            lines.append(f"| {r['model']} | {r['budget']} | {r['backend']} | - | - | - | - | - | - | "
                         f"not measured: {r['missing']} |")
            continue
        bound = "-" if r["validation_bound"] is None else f"{r['validation_bound']:.3f}"
        met = "yes" if r["met"] else ("**no**" + (f" ({r['images_needed']} images would)" if r["images_needed"]
                                                   else ""))
        over = ("**yes, beyond its interval**" if r["exceeded_beyond_interval"] else "**yes**") if r["exceeded"] \
            else ("no" if r["met"] else "-")
        lines.append(f"| {r['model']} | {r['budget']} | {r['backend']} | {r['validation_images']} | "
                     f"{r['validation_drop']:.3f} | {bound} | {met} | {r['test_drop']:.3f} "
                     f"({r['test_interval'][0]:.3f} to {r['test_interval'][1]:.3f}) | {over} | "
                     f"{r['kept_in_float']}{' (NNCF retried)' if r['retry'] else ''} |")
    share = "-" if s["share_exceeded"] is None else f"{s['share_exceeded']:.3f}"
    lines += ["", "| budgets met on validation | test drop over the budget | over it beyond the interval | share | "
              "goal | verdict |", "|---|---|---|---|---|---|",
              f"| {s['met_on_validation']} | {s['exceeded_on_test']} | {s['exceeded_beyond_interval']} | {share} | "
              f"{s['goal']} | {'pass' if s['goal_met'] else '**FAIL**'} |", "",
              f"CPU: {figures['cpu']}; {figures['threads']} threads. Validation: "
              + ("images of the training split held out of calibration (the models were trained on them)"
                 if figures.get("validation", "train") == "train" else
                 f"{VALIDATION_SHARE:.0%} of the test split (data.validation), class-balanced, never evaluated")
              + ", as many as the bound asked for (compressor.bound: one-sided 95 % upper confidence "
              "bound of the drop, exact on the images lost and gained); the budget is met when the bound is within "
              f"it. Test: {'the whole test split' if figures.get('validation', 'train') == 'train' else 'the rest of the test split'} "
              f"({figures['test_images']} images), each engine's drop paired per image "
              "with the source, with its two-sided 95 % interval. `exceeded`: validation said met and the test drop "
              "is over the budget.", "", "Runs (seconds):", ""]
    lines += [f"- `{c['command']}` ({c['seconds']:.0f} s)" for c in figures["runs"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,mobilenetv2", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    ap.add_argument("--budgets", default=None, help="comma-separated points [0.2,0.5; --smoke: 2,5]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--validation", choices=("test", "train"), default="test",
                    help="test: budgets validate on half the test split, the other half is the test; train: on "
                         "training images calibration does not use, the whole test split is the test "
                         "(results/budget_bound_train_split)")
    ap.add_argument("--smoke", action="store_true",
                    help="a quick check of this script: a ResNet-18 trained briefly on the bundled digits")
    args = ap.parse_args()
    budgets = [float(b) for b in (args.budgets or ("2,5" if args.smoke else "0.2,0.5")).split(",")]
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BACKENDS] + ([] if args.smoke else
                                                           [m for m in args.models.split(",") if m not in MODELS])
    if unknown:
        print(f"budget_bound: unknown {', '.join(unknown)}", file=sys.stderr)
        return 2
    skipped = {b: why for b in wanted if (why := unavailable(b))}
    backends = [b for b in wanted if b not in skipped]
    name = ("budget_bound_smoke" if args.smoke else "budget_bound") + ("_train_split" if args.validation == "train"
                                                                       else "")
    work = HERE / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        path, intake = smoke_model(work)
        models = {"digits_" + SMOKE_ARCH: (path, intake)}
    else:
        models = {m: (SHARED / "models" / MODELS[m], ["--data", str(SHARED / "datasets" / "cifar10")])
                  for m in args.models.split(",")}
    rows, runs, test_images = [], [], None
    for model, (path, extra) in models.items():
        for budget in budgets:
            recipe_path = work / f"{model}_{budget:g}.yaml"
            recipe_path.write_text(yaml.safe_dump(recipe(budget, backends, args.smoke, args.validation), sort_keys=False))
            report, predictions, seconds = run(f"{name}/{model}_{budget:g}", path, recipe_path, extra, args.threads)
            test_images = len(predictions["labels"])
            rows += rows_of(report, predictions, model, budget, backends)
            rows += [{"model": model, "budget": budget, "backend": b, "missing": why} for b, why in skipped.items()]
            runs.append({"command": scrub(report["command"]), "seconds": round(seconds, 1)})
    figures = {"cpu": cpu(), "threads": args.threads, "validation": args.validation, "confidence": CONFIDENCE, "test_images": test_images,
               "rows": rows, "summary": summary(rows), "runs": runs}
    out = HERE / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(figures, indent=1) + "\n")
    write_text(out / "report.md", render(figures))
    print(f"wrote {(out / 'report.md').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
