"""Issue 13 item 6: are bf16 autocast and channels-last memory worth it for training on this CPU,
and does ``train.bf16: auto`` / ``train.channels_last: auto`` (the loop's own probe) pick the fastest?

Trains each reference model (whole pickled torch modules in ../shared/models) for one epoch on
6,400 class-balanced CIFAR-10 training images (50 steps of batch 128, AdamW, cosine schedule,
random crop + flip) through the project's own loop, ``compressor.training.train``, once per
setting on a fresh copy of the same weights with the same seed: fp32 and bf16 autocast, each with
contiguous and with channels-last weights and batches, then both on auto. bf16 runs only where the
CPU has native bf16 (AVX512-BF16/AMX) or on a GPU.

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
SETTINGS = [("off", "off"), ("on", "off"), ("off", "on"), ("on", "on"), ("auto", "auto")]
"""(train.bf16, train.channels_last); the first is the reference"""


def rel(path: Path) -> str:
    return os.path.relpath(path, REPO)


def run(name: str, model: Any, tdata: Any, cfg: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = train(model, tdata, cfg, description=f"{name} bf16 {cfg.bf16}")
    except RuntimeError as exc:  # ten non-finite losses in a row
        return {"bf16": cfg.bf16, "channels_last": cfg.channels_last, "error": str(exc).splitlines()[0]}
    last = result.history[-1] if result.history else {}
    return {"bf16": cfg.bf16, "channels_last": cfg.channels_last, "precision": result.precision,
            "memory_format": result.memory_format, "probe": result.probe, "device": result.torch_device,
            "steps": result.steps,
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
                           channels_last="off", augment=True, lr=5e-4, schedule="cosine")
        tdata = training_data(artifact, data, base)
        for bf16, layout in SETTINGS:
            row: dict[str, Any] = {"model": name, "file": rel(SHARED / "models" / MODELS[name])}
            if bf16 == "on" and not bf16_ok:
                row |= {"bf16": bf16, "channels_last": layout, "precision": NO_BF16}
            else:
                row |= run(name, copy.deepcopy(artifact.model), tdata,
                           base.model_copy(update={"bf16": bf16, "channels_last": layout}))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    for row in rows:  # step time against fp32 contiguous, same model
        ref = next(r for r in rows if r["model"] == row["model"] and (r["bf16"], r["channels_last"]) == SETTINGS[0])
        if "s_per_step" in row and "s_per_step" in ref:
            row["ratio"] = round(row["s_per_step"] / ref["s_per_step"], 3)
    command = " ".join([".venv/bin/python benchmarks/bf16_training.py", *(["--smoke"] if args.smoke else []),
                        *([f"--threads {args.threads}"] if args.threads != 2 else []),
                        *([f"--models {args.models}"] if names != list(MODELS) else []),
                        *([f"--train-samples {n_train}"] if not args.smoke and n_train != 6400 else [])])
    verdicts = []
    for m in names:
        fixed = [r for r in rows if r["model"] == m and r["bf16"] != "auto" and "s_per_step" in r]
        auto = next((r for r in rows if r["model"] == m and r["bf16"] == "auto" and "s_per_step" in r), None)
        if not fixed or auto is None:
            continue
        best = min(fixed, key=lambda r: r["s_per_step"])
        picked = f"{'bf16' if auto['precision'].startswith('bf16') else 'fp32'} {auto['memory_format']}"
        verdicts.append(f"{m}: the fastest fixed setting is {best['precision']} {best['memory_format']} "
                        f"({best['s_per_step']:.3f} s/step, {best['ratio']:.2f}x fp32 contiguous); auto chose "
                        f"{picked} ({auto['s_per_step']:.3f} s/step)")
    conclusion = ("; ".join(verdicts) + ".") if verdicts else "Nothing was timed to compare (see the table)."
    report = {"benchmark": "bf16_training", "command": command, "environment": env, "native_bf16": has_native_bf16(),
              "data": rel(data_root), "config": base.model_dump(exclude={"bf16", "channels_last"}), "results": rows,
              "conclusion": conclusion}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    cpu = (f"CPU: {env['cpu']}, {env['cores_available']} cores, {args.threads} threads; ISA: "
           f"{' '.join(env['isa_flags']) or 'none'}; native bf16: {'yes' if has_native_bf16() else 'no'}; "
           f"torch {env['versions']['torch']}; {n_train} training images, batch 128, 1 epoch, {n_val} validation images")
    lines = ["# Training step time: bf16 autocast and channels-last against fp32 contiguous", "", cpu, "",
             "| model | asked (bf16, channels_last) | ran as | s/step | against fp32 contiguous | skipped steps | "
             "last loss | val top-1 % |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ran = r.get("error") or (f"{r['precision']}, {r['memory_format']}" if "memory_format" in r else r["precision"])
        lines.append(f"| {r['model']} | {r['bf16']}, {r['channels_last']} | {ran} | {fmt(r.get('s_per_step'), '.3f')} | "
                     f"{fmt(r.get('ratio'), '.3f')}x | {fmt(r.get('skipped_steps'), 'd')} | "
                     f"{fmt(r.get('last_train_loss'), '.4f')} | {fmt(r.get('val_top1'), '.2f')} |")
    probes = [(r["model"], r["probe"]) for r in rows if r.get("probe")]
    if probes:
        lines += ["", "The auto rows' probe (one batch-128 step per option, median of 3 after a warm-up; an option "
                  "replaces fp32 contiguous only when 5 % faster):", "",
                  "| model | " + " | ".join(probes[0][1]["s_per_step"]) + " | chosen |",
                  "|---|" + "---|" * (len(probes[0][1]["s_per_step"]) + 1)]
        for m, pr in probes:
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f} s" for v in pr["s_per_step"].values())
                         + f" | {pr['chosen']} |")
    lines += ["", conclusion, "", f"Command: `{command}`",
              "", ("s/step: the loop's own time (one validation pass included) over its steps; last loss: the "
                  "mean training loss since the last validation.")]
    write_text(args.out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
