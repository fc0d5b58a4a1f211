"""``compress demo``: the embedded default that needs no download.

Trains a torchvision ResNet-18 on scikit-learn's bundled handwritten digits (upscaled to 32x32
RGB), saves its state dict (a safe form: no code in the file) with the metadata JSON the intake
reads, and compresses it with the shipped ``demo_digits`` recipe.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .artifact import Preprocessing
from .data import digits_source, preprocess
from .hooks import ProgressHook
from .job import JobOptions, JobResult, preflight_out_dir, run_job
from .recipe import load_recipe
from .staging import json_text

log = logging.getLogger(__name__)

DEMO_PREPROCESSING = Preprocessing(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
DEMO_SHAPE = [1, 3, 32, 32]


def train_digits_model(*, epochs: int = 6, seed: int = 0, threads: int | None = None, arch: str = "resnet18"):
    """A torchvision classifier trained on the digits train split; returns (model, test top-1 %)."""
    import torch
    import torchvision

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, test = digits_source("train"), digits_source("test")
    size = (DEMO_SHAPE[2], DEMO_SHAPE[3])
    x = torch.from_numpy(preprocess(train.load_images(np.arange(len(train)), size, "RGB"), DEMO_PREPROCESSING))
    y = torch.from_numpy(train.labels)
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(train.classes))
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))  # small random shifts
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("demo training: epoch %d/%d loss %.3f", epoch + 1, epochs, loss.item())
    model.eval()
    xt = torch.from_numpy(preprocess(test.load_images(np.arange(len(test)), size, "RGB"), DEMO_PREPROCESSING))
    with torch.inference_mode():
        top1 = 100.0 * float((model(xt).argmax(1).numpy() == test.labels).mean())
    return model, top1


def save_weights(model, path: Path, classes: list[str]) -> None:
    """Save the state dict plus the metadata JSON the intake reads (input shape, preprocessing)."""
    import torch

    torch.save(model.state_dict(), str(path))
    meta = {"input_shape": DEMO_SHAPE, "preprocessing": DEMO_PREPROCESSING.model_dump(), "classes": classes}
    path.with_suffix(".json").write_text(json_text(meta))


def run_demo(out: Path, *, epochs: int = 6, threads: int | None = None, quiet: bool = False,
             overwrite: bool = False) -> JobResult:
    from rich.console import Console

    preflight_out_dir(out, overwrite=overwrite)  # before the training, not after it
    console = Console(stderr=True)
    with console.status(f"training a ResNet-18 on the bundled digits ({epochs} epochs)", spinner="dots"):
        model, top1 = train_digits_model(epochs=epochs, threads=threads)
    console.print(f"[green]✓[/] trained ResNet-18 on digits: test top-1 {top1:.2f}%")
    recipe, recipe_path = load_recipe("demo_digits")
    hooks = []
    if not quiet:
        hooks.append(ProgressHook(console))
    with tempfile.TemporaryDirectory(prefix="compressor-demo-") as tmp:
        model_path = Path(tmp) / "digits_resnet18.pt"
        save_weights(model, model_path, digits_source("test").classes)
        options = JobOptions(out_dir=out, threads=threads, hooks=hooks, arch="torchvision:resnet18", num_classes=10,
                             overwrite=overwrite,
                             extra_files=[model_path, model_path.with_suffix(".json")])  # the model beside its report
        return run_job(model_path, recipe, recipe_path, options)
