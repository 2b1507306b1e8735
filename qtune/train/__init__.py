"""Training: the only place that builds trl / transformers trainers and their arguments.

args.py         TrainingArguments / SFTConfig / DPOConfig / KTOConfig / GRPOConfig from a RunConfig, and the
                trainers (SFT, classification, DPO and KTO, GRPO)
hooks.py        what qtune adds to them: trained-positions loss, non-finite guard, seeded order, promotion
fit.py          fit (and resume), train.fit_to_vram, planned steps
checkpoint.py   resumable checkpoints: complete-only, found by resume=auto, refused for another run
run.py          the steps every recipe shares around its own (start, prepare, train, save)
loss_curve.py   the loss curve saved with the adapter
"""

from qtune.train.args import (
    OPTIMIZERS,
    build_classification_trainer,
    build_dpo_trainer,
    build_grpo_trainer,
    build_sft_trainer,
    sft_args,
)
from qtune.train.checkpoint import is_main_process
from qtune.train.fit import fit, fit_to_vram, gathered_weights, planned_steps
from qtune.train.hooks import CheckpointPromoter, EpochSeededLengthSampler, NonFiniteGuard, trained_positions_loss
from qtune.train.run import Run, start

__all__ = [
    "OPTIMIZERS",
    "CheckpointPromoter",
    "EpochSeededLengthSampler",
    "NonFiniteGuard",
    "Run",
    "build_classification_trainer",
    "build_dpo_trainer",
    "build_grpo_trainer",
    "build_sft_trainer",
    "fit",
    "fit_to_vram",
    "gathered_weights",
    "is_main_process",
    "planned_steps",
    "sft_args",
    "start",
    "trained_positions_loss",
]
