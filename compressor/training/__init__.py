"""The one training loop every training pass shares (fine-tuning after pruning, distillation, QAT).

Optimizer and schedule, epochs or steps, bf16 autocast and channels-last memory (on GPUs bf16 where
supported; on CPUs each is measured on the model's own training step before training, and kept
only where it is faster: see ``probe_step``), a rich progress bar with loss and accuracy, best
checkpoint by top-1 on a class-balanced validation subset held out of the training split, seeded.
Launched under ``torchrun`` it trains with DistributedDataParallel (gloo on CPU, nccl on GPUs)
with no change of code and takes the steps one process takes: every process draws the same
epoch permutation and cuts the same global batches (``batch_size`` images; the last partial one
dropped, as in one process), takes every size-th image of each, draws the augmentation of the
whole batch and applies its share, weighs its loss by its share of the batch (gradients averaged
by DDP are then the global batch's), and normalises batch-norm layers with the statistics of the
whole global batch (see ``synchronized_batch_norm``). Same step count, same learning-rate
schedule, validation on the whole held-out set; only dropout masks differ (each process draws
its own).
"""

from .augment import AUGMENT_PAD, augment, augment_share, crop_flip
from .config import TrainConfig
from .launch import synchronized_batch_norm, torch_device, world
from .loop import MAX_NONFINITE_STEPS, TrainData, TrainResult, evaluate_top1, train, training_data
from .losses import LogitLoss, LossFn, cross_entropy_loss, logit_loss
from .probe import PROBE_MARGIN, PROBE_MIN_STEP_S, StepOption, probe_step, step_options, use_bf16

__all__ = ["AUGMENT_PAD", "MAX_NONFINITE_STEPS", "PROBE_MARGIN", "PROBE_MIN_STEP_S", "LogitLoss", "LossFn",
           "StepOption", "TrainConfig", "TrainData", "TrainResult", "augment", "augment_share", "crop_flip",
           "cross_entropy_loss", "evaluate_top1", "logit_loss", "probe_step", "step_options",
           "synchronized_batch_norm", "torch_device", "train", "training_data", "use_bf16", "world"]
