"""Issue 13 item 6: is bf16 autocast worth it for training on this CPU?

Trains each reference model (whole pickled torch modules in ../shared/models) for one epoch on
6,400 class-balanced CIFAR-10 training images (50 steps of batch 128, AdamW, cosine schedule,
random crop + flip) through the project's own loop, ``compressor.training.train``: first in fp32
(train.bf16: off), then with bf16 autocast (train.bf16: on) on a fresh copy of the same weights
with the same seed. bf16 runs only where the CPU has native bf16 (AVX512-BF16/AMX) or on a GPU.

Writes benchmarks/results/bf16_training/report.{json,md}.

    .venv/bin/python benchmarks/bf16_training.py [--threads 2] [--models mobilenet_v2,resnet50] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import HERE, REPO, SHARED, write_text

from compressor.data import CalibrationConfig, DataConfig, open_data
from compressor.environment import environment, has_native_bf16
from compressor.intake import load_model
from compressor.training import TrainConfig, train, training_data

MODELS = {"mobilenet_v2": "mobilenet_v2_cifar10.pt", "resnet50": "resnet50_cifar10.pt"}
NO_BF16 = "not run: this CPU has no native bf16 (AVX512-BF16/AMX)"


def rel(path: Path) -> str:
    return os.path.relpath(path, REPO)


def run(name: str, model: Any, tdata: Any, cfg: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = train(model, tdata, cfg, description=f"{name} bf16 {cfg.bf16}")
    except RuntimeError as exc:  # ten non-finite losses in a row
        return {"bf16": cfg.bf16, "error": str(exc).splitlines()[0]}
    last = result.history[-1] if result.history else {}
    return {"bf16": cfg.bf16, "precision": result.precision, "device": result.device, "steps": result.steps,
            "seconds": round(result.seconds, 2), "wall_seconds": round(time.perf_counter() - started, 2),
            "s_per_step": round(result.seconds / max(result.steps, 1), 4), "skipped_steps": result.skipped_steps,
            "last_train_loss": last.get("train_loss"), "val_top1": result.final_val_top1, "history": result.history}


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--train-samples", type=int, default=6400)
    ap.add_argument("--smoke", action="store_true", help="256 images, 2 steps, 128 validation images")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bf16_training")
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m]
    if not names or set(names) - set(MODELS):
        ap.error(f"--models: give some of {', '.join(MODELS)}")
    data_root = SHARED / "datasets" / "cifar10"
    needed = [SHARED / "models" / MODELS[m] for m in names] + [data_root / "train"]
    if missing := [p for p in needed if not p.exists()]:
        print(f"benchmark bf16_training needs the shared models and data: missing {', '.join(map(str, missing))}",
              file=sys.stderr, flush=True)
        sys.exit(2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    n_train, n_val = (256, 128) if args.smoke else (args.train_samples, 500)
    bf16_ok = torch.cuda.is_available() or has_native_bf16()
    data = open_data(DataConfig(source="cifar10", root=str(data_root), download=False,
                                calibration=CalibrationConfig(split="train")))
    env = environment(args.threads)
    rows: list[dict[str, Any]] = []
    for name in names:
        artifact = load_model(SHARED / "models" / MODELS[name], trust=True)
        base = TrainConfig(epochs=1, train_samples=n_train, batch_size=128, val_samples=n_val, bf16="off",
                           augment=True, lr=5e-4, schedule="cosine")
        tdata = training_data(artifact, data, base)
        for setting in ("off", "on"):
            row: dict[str, Any] = {"model": name, "file": rel(SHARED / "models" / MODELS[name])}
            if setting == "on" and not bf16_ok:
                row |= {"bf16": "on", "precision": NO_BF16}
            else:
                row |= run(name, copy.deepcopy(artifact.model), tdata, base.model_copy(update={"bf16": setting}))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    for row in rows:  # bf16/fp32 step-time ratio, beside the bf16 row
        fp32 = next(r for r in rows if r["model"] == row["model"] and r["bf16"] == "off")
        if row["bf16"] == "on" and "s_per_step" in row and "s_per_step" in fp32:
            row["ratio_bf16_fp32"] = round(row["s_per_step"] / fp32["s_per_step"], 3)
    command = " ".join([".venv/bin/python benchmarks/bf16_training.py", *(["--smoke"] if args.smoke else []),
                        *([f"--threads {args.threads}"] if args.threads != 2 else []),
                        *([f"--models {args.models}"] if names != list(MODELS) else []),
                        *([f"--train-samples {n_train}"] if not args.smoke and n_train != 6400 else [])])
    ratios = {r["model"]: r["ratio_bf16_fp32"] for r in rows if "ratio_bf16_fp32" in r}
    speed = {r["model"]: r["s_per_step"] for r in rows if r["bf16"] == "off" and "s_per_step" in r}
    verdicts = [f"{m} {'faster' if q < 0.95 else 'slower' if q > 1.05 else 'no faster (within 5%)'} "
                f"({q:.2f}x fp32's {speed[m]:.3f} s/step)" for m, q in ratios.items()]
    if verdicts:
        faster = [m for m, q in ratios.items() if q < 0.95]
        where = "GPU" if torch.cuda.is_available() else "CPU"
        conclusion = (f"On this {where}, bf16 autocast makes a training step: {'; '.join(verdicts)}, so "
                      + ("bf16 autocast pays off here." if len(faster) == len(ratios) else
                         f"bf16 autocast pays off here only for {', '.join(faster)}." if faster else
                         "fp32 stays the better default here."))
    else:
        conclusion = "Only fp32 was timed: " + ("bf16 autocast diverged (see the table)." if any(
            "error" in r for r in rows) else f"bf16 autocast was {NO_BF16}.")
    report = {"benchmark": "bf16_training", "command": command, "environment": env, "native_bf16": has_native_bf16(),
              "data": rel(data_root), "config": base.model_dump(exclude={"bf16"}), "results": rows,
              "conclusion": conclusion}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    cpu = (f"CPU: {env['cpu']}, {env['cores_available']} cores, {args.threads} threads; ISA: "
           f"{' '.join(env['isa_flags']) or 'none'}; native bf16: {'yes' if has_native_bf16() else 'no'}; "
           f"torch {env['versions']['torch']}; {n_train} training images, batch 128, 1 epoch, {n_val} validation images")
    lines = ["# bf16 autocast vs fp32 training step time", "", cpu, "",
             "| model | precision | s/step | bf16/fp32 step time ratio | skipped steps | last loss | val top-1 % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('precision') or r.get('error')} | {fmt(r.get('s_per_step'), '.3f')} | "
                     f"{fmt(r.get('ratio_bf16_fp32'), '.3f')} | {fmt(r.get('skipped_steps'), 'd')} | "
                     f"{fmt(r.get('last_train_loss'), '.4f')} | {fmt(r.get('val_top1'), '.2f')} |")
    lines += ["", conclusion, "", f"Command: `{command}`",
              "", ("s/step: the loop's own time (one validation pass included) over its steps; last loss: the "
                  "mean training loss since the last validation.")]
    write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
