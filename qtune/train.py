"""The only module that builds trl / transformers trainers and their arguments.

Upstream renames (trl 1 and transformers 5 moved several arguments) are absorbed here, once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from qtune.config import ConfigError, RunConfig
from qtune.errors import TrainingError

OPTIMIZERS = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit"}


def _common_args(cfg: RunConfig, work_dir: Path) -> dict:
    """TrainingArguments fields every qtune trainer shares.

    The trainer writes resumable checkpoints into `work_dir` every `train.save_every` steps; the
    CheckpointPromoter callback moves each one out once complete. The adapter itself qtune writes.
    """
    t = cfg.train
    return dict(
        output_dir=str(work_dir),
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=None,  # rotation is qtune.checkpoint's, among complete checkpoints only
        save_only_model=False,  # optimizer, scheduler and RNG states too: that is what makes it resumable
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
        eval_strategy="no",
        report_to="none",
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
        use_cpu=not torch.cuda.is_available(),
        # Checkpointing is switched on when the base is loaded (non-reentrant), not here.
        activation_checkpointing=False,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        **(_fsdp_args(cfg) if t.fsdp else {}),
        remove_unused_columns=True,
    )


def _fsdp_args(cfg: RunConfig) -> dict:
    """FSDP over the launched processes: each transformer block a shard unit; frozen and trained weights mixed."""
    if not torch.cuda.is_available():
        # accelerate 1.x turns its FSDP plugin on only for GPU-type launches (MULTI_GPU, ...); on CPU
        # processes (MULTI_CPU) it would drop it silently and run DDP. Say so instead.
        raise ConfigError(
            "train.fsdp=true needs GPUs: accelerate runs FSDP only on accelerators, and on CPU processes it "
            "would silently fall back to DDP. Drop train.fsdp (CPU processes run DDP)"
        )
    return dict(
        fsdp=True,
        fsdp_config={
            "version": 2,  # FSDP2 (per-parameter sharding): frozen 4-bit and trainable LoRA weights mix freely
            "reshard_after_forward": True,  # full shard
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer (`_no_split_modules`)
            "state_dict_type": "FULL_STATE_DICT",  # rank 0 gathers the whole adapter to save it
            "cpu_ram_efficient_loading": False,
            "activation_checkpointing": False,  # qtune switches it on itself (non-reentrant), when asked
        },
    )


def is_main_process() -> bool:
    """True in a single process, and in rank 0 of a torchrun / accelerate launch: the one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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


def build_sft_trainer(model, tokenizer, train_dataset, cfg: RunConfig, checkpoints: Path, callbacks=None):
    """An SFTTrainer over pre-tokenized (input_ids, labels, row) data, with checkpoints and the non-finite guard.

    `checkpoints` is the run's checkpoint folder (qtune.checkpoint.root): the trainer writes into its
    .incoming/ and each complete checkpoint is moved up into it.
    """
    from trl import SFTTrainer

    class QtuneSFTTrainer(_GuardedSteps, SFTTrainer):
        pass

    return _with_guards(
        QtuneSFTTrainer, model, tokenizer, train_dataset, cfg, checkpoints, callbacks, sft_args, data_collator=None
    )


def _with_guards(cls, model, tokenizer, train_dataset, cfg, checkpoints, callbacks, make_args, data_collator):
    from qtune import checkpoint

    guard = NonFiniteGuard(cfg.train.on_nonfinite, train_dataset)
    promoter = CheckpointPromoter(cfg.train.keep_checkpoints)
    kwargs = {"data_collator": data_collator} if data_collator is not None else {}
    trainer = cls(
        model=model,
        args=make_args(cfg, Path(checkpoints) / checkpoint.INCOMING),
        train_dataset=train_dataset.remove_columns("row"),
        processing_class=tokenizer,
        callbacks=[guard, promoter, *(callbacks or [])],
        **kwargs,
    )
    trainer.qtune_guard = guard
    return trainer


def fit(trainer, resume_from: Path | None, run: dict):
    """Train, continuing from a checkpoint if given (else a fresh checkpoint folder records `run`, from
    qtune.checkpoint.identity); a stop on a non-finite loss raises TrainingError."""
    from qtune import checkpoint

    if resume_from is None:
        checkpoint.start(Path(trainer.args.output_dir).parent, run)
    elif _finished(trainer, resume_from):
        return _restore_finished(trainer, resume_from)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except OSError as e:  # a full disk or a lost mount, most likely while writing a checkpoint
        folder = Path(trainer.args.output_dir).parent
        kept = [p.name for p in checkpoint.complete(folder)]
        raise TrainingError(
            f"training stopped on an OS error at step {trainer.state.global_step}: {e}. Complete checkpoints in "
            f"{folder}: {', '.join(kept) or 'none'}; free the space, then resume=auto continues from the newest"
        ) from e
    stopped = trainer.qtune_guard.stopped
    if stopped:
        where = Path(trainer.args.output_dir).parent / f"checkpoint-{stopped['step']}"
        raise TrainingError(
            f"non-finite {stopped['what']} at step {stopped['step']}, from training rows {stopped['rows']}; "
            f"training stopped before the weights changed. The last good weights are in {where}; fix those rows, "
            "lower train.lr, or set train.on_nonfinite=skip; then resume=auto continues after that batch"
        )
    return result


def gathered_weights(trainer) -> dict | None:
    """Under FSDP: the full (unsharded) weights, gathered on rank 0 for saving; every process must call
    it. None when the model is not sharded (its own state is already whole).
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def _finished(trainer, checkpoint_dir: Path) -> bool:
    """Whether the checkpoint is the run's last step (the crash came after training: in evaluation or saving)."""
    from transformers import TrainerState

    done = TrainerState.load_from_json(str(Path(checkpoint_dir) / "trainer_state.json")).global_step
    max_steps = trainer.args.max_steps
    if max_steps <= 0:
        per_epoch = math.ceil(len(trainer.train_dataset) / trainer.args.per_device_train_batch_size)
        max_steps = math.ceil(
            math.ceil(per_epoch / trainer.args.gradient_accumulation_steps) * trainer.args.num_train_epochs
        )
    return done >= max_steps


def _restore_finished(trainer, checkpoint_dir: Path):
    """Load a finished run's weights and log from its last checkpoint, without a training step.

    (transformers' resume from the final step of a run whose max_steps is not a whole number of
    epochs trains one step more; there is nothing left to train, so qtune does not call it.)
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    state = TrainerState.load_from_json(str(Path(checkpoint_dir) / "trainer_state.json"))
    weights = load_file(str(Path(checkpoint_dir) / "adapter_model.safetensors"))
    missing = set_peft_model_state_dict(trainer.model, weights).unexpected_keys
    if missing:
        raise TrainingError(f"{checkpoint_dir}: weights {missing[:3]} do not fit this model")
    trainer.state = state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    print(f"{checkpoint_dir} is the run's last step ({state.global_step}): nothing left to train")
    return TrainOutput(state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


class _GuardedSteps:
    """Trainer subclass mixin (no upstream code is changed): hands each micro-batch and its loss to the
    NonFiniteGuard, and draws the length-grouped data order from the seed and epoch alone, so a resumed
    run sees the same batches as an uninterrupted one.
    """

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSeededLengthSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            lengths=[len(ids) for ids in dataset["input_ids"]],
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self.qtune_guard.saw(inputs, loss_finite=False)
            return torch.zeros_like(loss)  # keep the logged running loss finite; the step is handled by the guard
        self.qtune_guard.saw(inputs, loss_finite=True)
        return loss


class EpochSeededLengthSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler with its shuffle seeded by (seed, epoch) instead of the global RNG.

    The global RNG at the start of an epoch depends on everything that ran before; after a resume it
    differs, and so would the batches. The trainer calls `set_epoch` before every epoch.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer step: if a loss or gradient is NaN/inf, drop the gradients so the weights do not change.

    Then `stop` ends the run with a checkpoint of the last good weights, or `skip` goes on. Either way
    the step and the source rows of its batch are recorded (`events`).
    """

    def __init__(self, policy: str, train_dataset):
        self.policy = policy
        self.events: list[dict] = []
        self.stopped: dict | None = None
        self._rows_of: dict[tuple[int, ...], list[int]] = {}
        for ids, row in zip(train_dataset["input_ids"], train_dataset["row"]):
            self._rows_of.setdefault(tuple(ids), []).append(row)
        self._batches: list[dict] = []
        self._bad_loss = False

    def saw(self, inputs: dict, loss_finite: bool) -> None:
        batch = {k: inputs[k].detach() for k in ("input_ids", "attention_mask") if k in inputs}
        self._batches.append((batch, loss_finite))
        self._bad_loss |= not loss_finite

    def rows(self) -> list[int]:
        """The data rows of the micro-batches whose loss was not finite (else of the whole step)."""
        bad = [batch for batch, finite in self._batches if not finite] or [batch for batch, _ in self._batches]
        rows = set()
        for batch in bad:
            mask = batch.get("attention_mask")  # padding removed by the attention mask
            for i, ids in enumerate(batch["input_ids"].tolist()):
                length = int(mask[i].sum()) if mask is not None else len(ids)
                rows.update(self._rows_of.get(tuple(ids[:length]), []))
        return sorted(rows)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if self._bad_loss or bad:
            event = {
                "step": state.global_step + 1,
                "what": "loss" if self._bad_loss else "gradient",
                "rows": self.rows(),
            }
            for p in model.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: the weights stay as they were
            self.events.append(event)
            print(f"non-finite {event['what']} at step {event['step']} (rows {event['rows']}): step skipped")
            if self.policy == "stop":
                self.stopped = event
                control.should_training_stop = True
                control.should_save = True  # a checkpoint of the last good weights
        self._batches.clear()
        self._bad_loss = False
        return control


class CheckpointPromoter(TrainerCallback):
    """After the trainer writes a checkpoint: make it visible as complete, keep the newest `keep`."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every process has written its part (its RNG state) before the folder moves
        if state.is_world_process_zero:
            from qtune import checkpoint

            checkpoint.promote(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.keep)
        return control


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
        gpus=int(os.environ.get("WORLD_SIZE", "1")),  # under torchrun / accelerate: plan per GPU
        sharding="fsdp" if cfg.train.fsdp else "ddp",
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


def build_classification_trainer(model, tokenizer, train_dataset, cfg: RunConfig, checkpoints: Path, callbacks=None):
    """A transformers Trainer for sequence classification over pre-tokenized (input_ids, labels, row) data."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    class QtuneTrainer(_GuardedSteps, Trainer):
        pass

    def make_args(cfg, work_dir):
        return TrainingArguments(**_common_args(cfg, work_dir))

    return _with_guards(
        QtuneTrainer,
        model,
        tokenizer,
        train_dataset,
        cfg,
        checkpoints,
        callbacks,
        make_args,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
