"""The training loop's settings (``train:`` of every training pass)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    epochs: float = Field(default=1.0, gt=0)
    """passes over the training images (fractions allowed)"""
    max_steps: int | None = Field(default=None, ge=1)
    """stop after this many optimizer steps (overrides epochs)"""
    batch_size: int = Field(default=128, ge=1)
    """global batch size (split across processes under torchrun)"""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """SGD momentum"""
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    """linear warm-up share of the steps (cosine schedule)"""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: bool = True
    """random crop (padding 4) and horizontal flip"""
    bf16: Literal["auto", "on", "off"] = "auto"
    """bf16 autocast; auto: on GPUs with bf16; on CPUs with native bf16 (AVX512-BF16/AMX) where the
    probe of this model's training step measures it faster than fp32 (on an AMX Xeon it was 1.7x
    slower for MobileNetV2 and 5 % faster for ResNet-50), and switched off for the rest of the run
    at the first loss that is not finite; fp32 on other CPUs"""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """channels-last (NHWC) weights and batches; auto: where the probe of this model's training step
    measures it faster (on an AMX Xeon, MobileNetV2 trained 2.2x faster in fp32)"""
    train_samples: int | None = Field(default=None, ge=1)
    """train on a class-balanced subset of this size (default: the whole split minus validation)"""
    val_samples: int = Field(default=2000, ge=0)
    """class-balanced images held out of the training split to pick the best checkpoint"""
    evals_per_epoch: int = Field(default=1, ge=1)
    seed: int = 0


TrainConfig.__module__ = "compressor.training"  # its public name (compress passes prints the fields' types)
