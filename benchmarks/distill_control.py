"""Issue 13: distillation ResNet-50 -> MobileNetV2 against a cross-entropy control of the same budget.

The student is the reference MobileNetV2 of ../shared/models (trained 16 epochs from scratch). Every
variant trains it on for the same epochs, batch, optimizer, schedule and on the very same images
(the same stored augmented views of each training image): the control with cross-entropy only
(alpha 0, the teacher never runs), the others with a logit loss (KD, DKD) against the ResNet-50
teacher, whose outputs on those views are computed once into the pass cache (the first distillation
pays for it, the next one reuses it). Each variant is one `compress` run of a generated recipe
(benchmarks/work/distill_control/*.yaml) with an OpenVINO FP32 engine measured on the full test
split; the gain is the distilled student's test top-1 over the control's, and the epoch cost is
its training seconds over the control's.

    .venv/bin/python benchmarks/distill_control.py [--epochs 6] [--views 4] [--losses kd,dkd]

Writes benchmarks/results/distill_control/report.json + report.md as each variant lands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, SHARED, run_compress, scrub, write_text  # noqa: E402
from explain_real import cpu  # noqa: E402

NAME = "distill_control"


def recipe(loss: str, alpha: float, epochs: float, views: int, scratch: bool = False) -> dict:
    student = {"student": "torchvision:mobilenet_v2"} if scratch else {}
    lr = 0.002 if scratch else 0.0005
    return {
        "name": f"distill_{loss}",
        "description": f"MobileNetV2 trained on {epochs} epochs with {loss} (alpha {alpha}) from ResNet-50",
        "data": {"source": "cifar10", "calibration": {"split": "train", "samples": 512, "seed": 0}},
        "passes": [{"distill": {
            "teacher": str(SHARED / "models" / "resnet50_cifar10.pt"), "teacher_trusted": True,
            "loss": "kd" if loss == "control" else loss, "alpha": alpha, "temperature": 4.0,
            "feature_loss": "none", "teacher_views": views, **student,
            "train": {"epochs": epochs, "batch_size": 128, "optimizer": "adamw", "lr": lr, "weight_decay": 0.05,
                      "schedule": "cosine", "label_smoothing": 0.1, "augment": True, "val_samples": 2000},
        }}],
        "targets": [{"openvino": {"precision_hint": "f32"}}],
        "evaluation": {"latency_runs": 50, "latency_min_seconds": 0.2, "throughput_seconds": 0.5},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--losses", default="kd,dkd")
    ap.add_argument("--scratch", action="store_true", help="a fresh torchvision MobileNetV2 (seeded) as the student")
    args = ap.parse_args()
    name = NAME + ("_scratch" if args.scratch else "")
    work = HERE / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    out = HERE / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    variants = [("control", 0.0)] + [(loss, 0.5 if loss == "dkd" else 0.7) for loss in args.losses.split(",")]
    rows = []
    for loss, alpha in variants:
        path = work / f"{loss}.yaml"
        path.write_text(yaml.safe_dump(recipe(loss, alpha, args.epochs, args.views, args.scratch), sort_keys=False))
        report = run_compress(f"{name}_{loss}", SHARED / "models" / "mobilenet_v2_cifar10.pt", str(path), "-q")
        m = report["passes"][0]["metrics"]
        engine = next(r for r in report["results"] if r["name"] == "openvino-fp32")
        views = m.get("teacher_views") or {}
        rows.append({"variant": loss, "alpha": alpha, "test_top1_torch": m["student_top1_after"],
                     "test_top1_openvino": engine["top1"], "student_before": m["student_top1_before"],
                     "teacher_top1": m["teacher_top1"], "train_seconds": m["train"]["seconds"],
                     "epochs": args.epochs, "teacher_views": views, "best_val_top1": m["train"]["best_val_top1"],
                     "history": m["train"]["history"], "precision": m["train"].get("precision"),
                     "pass_seconds": report["passes"][0]["seconds"], "command": scrub(report["command"])})
        write(out, rows, args)
    return 0


def write(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    control = next((r for r in rows if r["variant"] == "control"), None)
    for r in rows:
        if control is not None:
            r["gain_over_control"] = round(r["test_top1_torch"] - control["test_top1_torch"], 2)
            r["epoch_cost_vs_control"] = round(r["train_seconds"] / control["train_seconds"], 3)
    figures = {"cpu": cpu(), "threads": 2, "epochs": args.epochs, "views": args.views, "scratch": args.scratch,
               "rows": rows}
    write_text(out / "report.json", json.dumps(figures, indent=1))
    student = (f"a fresh torchvision MobileNetV2 (seeded; {rows[0]['student_before']:.2f}% before), trained from "
               f"scratch for {args.epochs:g} epochs" if args.scratch else
               f"the reference MobileNetV2 ({rows[0]['student_before']:.2f}% test top-1), trained on for "
               f"{args.epochs:g} epochs")
    lr = "2e-3" if args.scratch else "5e-4"
    md = ["# Distillation ResNet-50 -> MobileNetV2 against its cross-entropy control", "",
          f"CPU: {figures['cpu']}, 2 threads. Student: {student} by every variant on the same images ({args.views} "
          "stored augmented views of each training image, image i shown view (epoch + i) mod views), same "
          f"optimizer (AdamW {lr}, cosine, wd 0.05, label smoothing 0.1, batch 128). Teacher ResNet-50 "
          f"{rows[0]['teacher_top1']:.2f}%. Test top-1 on the full 10,000-image test split.", "",
          "| variant | alpha | test top-1 % (torch) | OpenVINO FP32 engine % | gain over control | train s | "
          "epoch cost vs control | teacher outputs (views computed / reused, s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["teacher_views"]
        tv = f"{v.get('computed_views')} / {v.get('reused_views')}, {v.get('seconds')} s" if v else "none (no teacher)"
        md.append(f"| {r['variant']} | {r['alpha']} | {r['test_top1_torch']:.2f} | {r['test_top1_openvino']:.2f} | "
                  f"{r.get('gain_over_control', 0):+.2f} | {r['train_seconds']:.0f} | "
                  f"{r.get('epoch_cost_vs_control', 1):.2f}x | {tv} |")
    md += ["", "Validation top-1 (2,000 images held out of the training split) per epoch:", "",
           "| variant | " + " | ".join(f"{h['epoch']}" for h in rows[0]["history"]) + " |",
           "|---|" + "---|" * len(rows[0]["history"])]
    for r in rows:
        md.append(f"| {r['variant']} | " + " | ".join(f"{h['val_top1']:.2f}" for h in r["history"]) + " |")
    md += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    write_text(out / "report.md", "\n".join(md) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}/report.md", flush=True)


if __name__ == "__main__":
    sys.exit(main())
