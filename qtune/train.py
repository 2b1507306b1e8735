"""The only module that builds trl / transformers trainers and their arguments.

Upstream renames (trl 1 and transformers 5 moved several arguments) are absorbed here, once.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qtune.config import ConfigError, RunConfig

OPTIMIZERS = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit"}


def _common_args(cfg: RunConfig, work_dir: Path) -> dict:
    """TrainingArguments fields every qtune trainer shares (checkpoints off: qtune writes the adapter itself)."""
    t = cfg.train
    return dict(
        output_dir=str(work_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup if t.warmup < 1 else int(t.warmup),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS[t.optim],
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
        use_cpu=not torch.cuda.is_available(),
        # Checkpointing is switched on when the base is loaded (non-reentrant), not here.
        activation_checkpointing=False,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


def sft_args(cfg: RunConfig, work_dir: Path):
    """trl.SFTConfig for a qtune RunConfig."""
    from trl import SFTConfig

    return SFTConfig(
        **_common_args(cfg, work_dir),
        # Data arrive tokenized with labels already masked and truncated by qtune.data.
        max_length=None,
        packing=False,
        dataset_num_proc=None,
    )


def build_sft_trainer(model, tokenizer, train_dataset, cfg: RunConfig, work_dir: Path, callbacks=None):
    """An SFTTrainer over pre-tokenized (input_ids, labels) data."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=sft_args(cfg, work_dir),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def fit_to_vram(cfg: RunConfig, base_path: Path, longest: int) -> tuple[RunConfig, str]:
    """Apply `train.fit_to_vram`: pick micro-batch, grad_accum and checkpointing that fit, per qtune.plan.

    The effective batch (batch_size x grad_accum) is kept. `longest` is the longest tokenized
    example, where memory peaks. Returns the adjusted config and a sentence saying what was chosen.
    """
    import dataclasses

    from qtune import plan

    vram = plan.parse_bytes(cfg.train.fit_to_vram)
    wanted = plan.PlanInput(
        seq=longest,
        batch=cfg.train.batch_size * cfg.train.grad_accum,
        quant=cfg.quant.method,
        double_quant=cfg.quant.double_quant,
        lora_r=cfg.lora.r,
        targets=cfg.lora.targets,
        optim=cfg.train.optim,
        dtype=cfg.model.dtype,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )
    arch = plan.load_arch(str(base_path))
    try:
        chosen, accum = plan.fit_to_vram(arch, wanted, vram)
    except plan.PlanError as e:  # the planner speaks in `qtune plan` flags; say which config keys to change
        raise ConfigError(
            f"train.fit_to_vram={cfg.train.fit_to_vram} cannot be met at the longest example ({longest} tokens): "
            f"{e} (lower data.max_length, quant.method or lora.r, or raise train.fit_to_vram)"
        ) from None
    train_cfg = dataclasses.replace(
        cfg.train, batch_size=chosen.batch, grad_accum=accum, gradient_checkpointing=chosen.gradient_checkpointing
    )
    peak = plan.estimate(arch, chosen).total
    note = (
        f"fit_to_vram {cfg.train.fit_to_vram}: micro-batch {chosen.batch} x grad_accum {accum}, gradient "
        f"checkpointing {'on' if chosen.gradient_checkpointing else 'off'} (planned peak {peak / 2**30:.2f} GiB "
        f"at {longest} tokens)"
    )
    return dataclasses.replace(cfg, train=train_cfg), note


def planned_steps(cfg: RunConfig, n_examples: int) -> int:
    """Optimizer steps the run will take (single process)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_examples / cfg.train.batch_size / cfg.train.grad_accum)
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def build_classification_trainer(model, tokenizer, train_dataset, cfg: RunConfig, work_dir: Path, callbacks=None):
    """A transformers Trainer for sequence classification over pre-tokenized (input_ids, labels) data."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    return Trainer(
        model=model,
        args=TrainingArguments(**_common_args(cfg, work_dir)),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
