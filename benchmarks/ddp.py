"""Issues #3 and #21: one DDP run of a training pass with two processes on one machine (torchrun
--nproc-per-node 2, gloo, one thread each) against the single-process run of the same recipe
(recipes/mobilenetv2_prune_finetune.yaml on the real MobileNetV2: prune a quarter of the channels,
fine-tune one epoch of CIFAR-10): the same optimizer steps, the same samples, and top-1 within
0.5 point. The processes take the single process's global batches, augmentation and batch-norm
statistics (compressor/training/launch.py); only dropout masks and rounding differ.

    .venv/bin/python benchmarks/ddp.py [--epochs E]   (E < 1 trains on a share of the epoch)
"""

import argparse
import os
import sys
import time

from _common import COMPRESS, SHARED, figure, publish, row, run_compress

from compressor.environment import environment

ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs [the recipe's: 1]")
args = ap.parse_args()

model = SHARED / "models" / "mobilenet_v2_cifar10.pt"
recipe = "mobilenetv2_prune_finetune"
if args.epochs is not None:  # the shipped recipe with fewer epochs, written beside the results
    from pathlib import Path

    import yaml

    from compressor.recipe import load_recipe

    _, path = load_recipe(recipe)
    text = yaml.safe_load(Path(path).read_text())
    text["passes"][0]["prune_structured"]["finetune"]["epochs"] = args.epochs
    short = Path(__file__).resolve().parent / "work" / "ddp_recipe.yaml"
    short.parent.mkdir(parents=True, exist_ok=True)
    short.write_text(yaml.safe_dump(text, sort_keys=False))
    recipe = str(short)

started = time.perf_counter()
single = run_compress("ddp_single", model, recipe, "--no-cache", "-q")
os.environ["OMP_NUM_THREADS"] = "1"
torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(COMPRESS)]
ddp = run_compress("ddp_two_processes", model, recipe, "--no-cache", "-q", launcher=torchrun)
s, d = row(single, "openvino-fp32"), row(ddp, "openvino-fp32")
s_train = single["passes"][0]["metrics"]["steps"][0]["finetune"]
d_train = ddp["passes"][0]["metrics"]["steps"][0]["finetune"]
env = environment(2)
figures = [
    figure("single process: top-1 %", s["top1"], "-", True),
    figure("torchrun 2 processes (DDP, gloo): top-1 %", d["top1"], "-", True),
    figure("difference (points)", d["top1"] - s["top1"], "|d| <= 0.5", abs(d["top1"] - s["top1"]) <= 0.5),
    figure("optimizer steps, single", s_train["steps"], "-", True),
    figure("optimizer steps, DDP", d_train["steps"], "= single", d_train["steps"] == s_train["steps"]),
    figure("best validation top-1 %, single", s_train["best_val_top1"] or 0, "-", True),
    figure("best validation top-1 %, DDP", d_train["best_val_top1"] or 0, "-", True),
    figure("fine-tuning wall time, single (s)", s_train["seconds"], "-", True),
    figure("fine-tuning wall time, DDP (s)", d_train["seconds"], "-", True),
]
ddp["single_process_report"] = {"command": single["command"], "results": single["results"],
                                "passes": single["passes"]}
ddp["benchmark"] = {"cpu": env["cpu"], "isa_flags": env["isa_flags"], "epochs": args.epochs or 1.0,
                    "seconds": round(time.perf_counter() - started, 1),
                    "note": "run beside other jobs (the machine is shared): wall times are not comparable"}
sections = ["", f"CPU: {env['cpu']} ({', '.join(env['isa_flags'])}); fine-tuning "
            f"{args.epochs or 1.0:g} epoch(s); whole benchmark {ddp['benchmark']['seconds']:.0f} s. "
            "Run beside other jobs (the machine is shared): the wall times are not comparable, the top-1 are."]
publish("ddp", ddp, figures, sections)
