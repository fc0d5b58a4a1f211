"""Issue #3: one DDP run of a training pass with two processes on one machine (torchrun
--nproc-per-node 2, gloo, one thread each) against the single-process run of the same recipe
(recipes/mobilenetv2_prune_finetune.yaml on the real MobileNetV2): the same accuracy within noise."""

import os
import sys

from _common import COMPRESS, SHARED, figure, publish, row, run_compress

model = SHARED / "models" / "mobilenet_v2_cifar10.pt"
single = run_compress("ddp_single", model, "mobilenetv2_prune_finetune", "--no-cache")
os.environ["OMP_NUM_THREADS"] = "1"
torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(COMPRESS)]
ddp = run_compress("ddp_two_processes", model, "mobilenetv2_prune_finetune", "--no-cache", launcher=torchrun)
s, d = row(single, "openvino-fp32"), row(ddp, "openvino-fp32")
s_train = single["passes"][0]["metrics"]["steps"][0]["finetune"]
d_train = ddp["passes"][0]["metrics"]["steps"][0]["finetune"]
figures = [
    figure("single process: top-1 %", s["top1"], "-", True),
    figure("torchrun 2 processes (DDP, gloo): top-1 %", d["top1"], "-", True),
    figure("difference (points)", d["top1"] - s["top1"], "within noise (|d| <= 1.0)", abs(d["top1"] - s["top1"]) <= 1.0),
    figure("fine-tuning wall time, single (s)", s_train["seconds"], "-", True),
    figure("fine-tuning wall time, DDP (s)", d_train["seconds"], "-", True),
]
ddp["single_process_report"] = {"command": single["command"], "results": single["results"],
                                "passes": single["passes"]}
publish("ddp", ddp, figures)
