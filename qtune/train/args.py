"""The only place that builds trl / transformers trainers and their arguments.

Upstream renames (trl 1 and transformers 5 moved several arguments) are absorbed here, once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

import torch

from qtune.config import ConfigError, RunConfig, to_dict
from qtune.train import checkpoint
from qtune.train.hooks import (
    CheckpointPromoter,
    NonFiniteGuard,
    ProgressLog,
    TensorBoardLogs,
    _GuardedSteps,
    _TrainedPositionsLoss,
    check_trl_internals,
)

OPTIMIZERS = {"adamw": "adamw_torch", "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit"}


def eval_steps(cfg: RunConfig) -> int:
    """Steps between two held-out losses while training, given held-out data (0: none): train.eval_every, or
    when unset train.save_every (a checkpoint's log then holds the held-out loss of its step)."""
    t = cfg.train
    return t.eval_every if t.eval_every is not None else t.save_every


def runs_dir(cfg: RunConfig) -> Path:
    """Where a run's TensorBoard logs go: beside the adapter folder (which stays plain PEFT files), one
    subfolder per start, so a resumed run shows as its own line from its step on."""
    return Path(cfg.output.dir) / f"{cfg.output.name}.runs"


def report_to(cfg: RunConfig) -> list[str]:
    """train.report_to as the trainer's integrations; auto: TensorBoard if its package is installed (and the run
    has an output.name to put its logs beside).

    An integration whose package is missing is a ConfigError (the trainer would fail later, with less to say).
    """
    wanted = cfg.train.report_to
    if wanted == "auto":
        return ["tensorboard"] if _installed("tensorboard") and cfg.output.name else []
    names = [] if wanted == "none" else [wanted] if isinstance(wanted, str) else list(wanted)
    missing = [n for n in names if not _installed(n)]
    if missing:
        raise ConfigError(
            f"train.report_to={','.join(names)}: the {', '.join(missing)} package is not installed: "
            f"pip install {' '.join(missing)}, or leave it out of train.report_to"
        )
    if "tensorboard" in names and not cfg.output.name:
        raise ConfigError("train.report_to=tensorboard: set output.name (the logs go to <output.dir>/<name>.runs/)")
    return names


def _installed(integration: str) -> bool:
    # Each integration's Python package has its name (TensorBoard is written by tensorboard or tensorboardX).
    modules = ("tensorboard", "tensorboardX") if integration == "tensorboard" else (integration,)
    return any(importlib.util.find_spec(m) is not None for m in modules)


def _common_args(cfg: RunConfig, work_dir: Path, evaluate: bool = False) -> dict:
    """TrainingArguments fields every qtune trainer shares.

    The trainer writes resumable checkpoints into `work_dir` every `train.save_every` steps; the
    CheckpointPromoter callback moves each one out once complete. The adapter itself qtune writes.
    With `evaluate` (an eval dataset is given) the held-out loss is taken every `eval_steps(cfg)` steps
    and at the last one. TensorBoard is added by the builders (its logs go to runs_dir, not work_dir).
    """
    t = cfg.train
    every = eval_steps(cfg) if evaluate else 0
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
        eval_strategy="steps" if every else "no",
        eval_steps=every or None,
        # Evaluating holds no gradients or optimizer state: what trains at this micro-batch evaluates at it.
        per_device_eval_batch_size=t.batch_size,
        report_to=[name for name in report_to(cfg) if name != "tensorboard"] or "none",
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


def sft_args(cfg: RunConfig, work_dir: Path, evaluate: bool = False):
    """trl.SFTConfig for a qtune RunConfig (`evaluate`: the held-out loss while training, see _common_args)."""
    from trl import SFTConfig

    return SFTConfig(
        **_common_args(cfg, work_dir, evaluate),
        # Data arrive tokenized with labels already masked and truncated by qtune.data.
        max_length=None,
        packing=False,
        # One row per micro-batch, no padding; position_ids restart at each example, from which transformers
        # builds a block-diagonal mask (sdpa, eager) or varlen boundaries (flash attention): no cross-attention.
        # A micro-batch of one has no padding to remove.
        padding_free=cfg.train.padding_free and cfg.train.batch_size > 1,
        pad_to_multiple_of=cfg.train.pad_to_multiple_of or None,
        dataset_num_proc=None,
    )


def build_sft_trainer(
    model, tokenizer, train_dataset, cfg: RunConfig, checkpoints: Path, callbacks=None, eval_dataset=None
):
    """An SFTTrainer over pre-tokenized (input_ids, labels, row) data, with checkpoints and the non-finite guard.

    `checkpoints` is the run's checkpoint folder (qtune.train.checkpoint.root): the trainer writes into its
    .incoming/ and each complete checkpoint is moved up into it. `eval_dataset` (the same columns): its loss,
    on the trained positions as in training, is logged every train.eval_every steps.
    """
    from trl import SFTTrainer

    class QtuneSFTTrainer(_TrainedPositionsLoss, _GuardedSteps, SFTTrainer):
        pass

    trainer = _with_guards(
        QtuneSFTTrainer, model, tokenizer, train_dataset, eval_dataset, cfg, checkpoints, callbacks, sft_args, None
    )
    trainer.qtune_chunked_loss = (
        cfg.train.chunked_loss and _takes_logits_to_keep(trainer.model) and not check_trl_internals(trainer)
    )
    return trainer


def _takes_logits_to_keep(model) -> bool:
    """Does the causal LM's forward take `logits_to_keep` (transformers' models do; remote code may not)?"""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _with_guards(
    cls, model, tokenizer, train_dataset, eval_dataset, cfg, checkpoints, callbacks, make_args, data_collator, **extra
):
    guard = NonFiniteGuard(cfg.train.on_nonfinite, train_dataset)
    promoter = CheckpointPromoter(cfg.train.save_limit)
    kwargs = {"data_collator": data_collator, **extra} if data_collator is not None else extra
    evaluate = eval_dataset is not None and len(eval_dataset) > 0 and eval_steps(cfg) > 0
    if evaluate:
        has_row = "row" in eval_dataset.column_names
        kwargs["eval_dataset"] = eval_dataset.remove_columns("row") if has_row else eval_dataset
    trainer = cls(
        model=model,
        args=make_args(cfg, Path(checkpoints) / checkpoint.INCOMING, evaluate),
        train_dataset=train_dataset.remove_columns("row"),
        processing_class=tokenizer,
        callbacks=[guard, promoter, _progress(cfg, checkpoints), *_tensorboard(cfg), *(callbacks or [])],
        **kwargs,
    )
    trainer.qtune_guard = guard
    return trainer


def _progress(cfg: RunConfig, checkpoints: Path) -> ProgressLog:
    """The run's live progress file (qtune/progress.py), in its checkpoint folder: what `qtune studio` shows."""
    # The config a resume of this run would be started with (resume=auto is added then).
    return ProgressLog(Path(checkpoints), cfg.output.name, to_dict(dataclasses.replace(cfg, resume=None)))


def _tensorboard(cfg: RunConfig) -> list:
    """The TensorBoard callback when train.report_to asks for it (auto: when installed), saying so once."""
    main = checkpoint.is_main_process()
    if "tensorboard" not in report_to(cfg):
        if cfg.train.report_to == "auto" and cfg.output.name and main:
            print("TensorBoard logs are off: the tensorboard package is not installed (pip install tensorboard)")
        return []
    logs = runs_dir(cfg) / time.strftime("%Y-%m-%d_%H-%M-%S")
    if main:
        print(f"TensorBoard logs: {logs} (tensorboard --logdir {runs_dir(cfg)})")
    return [TensorBoardLogs(logs)]


def build_classification_trainer(
    model, tokenizer, train_dataset, cfg: RunConfig, checkpoints: Path, callbacks=None, eval_dataset=None
):
    """A transformers Trainer for sequence classification over pre-tokenized (input_ids, labels, row) data;
    `eval_dataset` (the same columns): its loss is logged every train.eval_every steps."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    class QtuneTrainer(_GuardedSteps, Trainer):
        pass

    def make_args(cfg, work_dir, evaluate):
        return TrainingArguments(**_common_args(cfg, work_dir, evaluate))

    return _with_guards(
        QtuneTrainer,
        model,
        tokenizer,
        train_dataset,
        eval_dataset,
        cfg,
        checkpoints,
        callbacks,
        make_args,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.train.pad_to_multiple_of or None),
    )


# ---------------------------------------------------------------------------------------------
# Preference (DPO, KTO) and reward (GRPO) training


def _preference_args(cfg: RunConfig, work_dir: Path, evaluate: bool) -> dict:
    """What the DPO and KTO configs share beyond _common_args."""
    return dict(
        **_common_args(cfg, work_dir, evaluate),
        # Token ids arrive validated, masked and truncated by qtune.data.preference.
        max_length=None,
        pad_to_multiple_of=cfg.train.pad_to_multiple_of or None,
        dataset_num_proc=None,
        beta=cfg.dpo.beta,
        # The reference is the same model under a frozen copy of its starting LoRA weights (trl's "ref" adapter:
        # the base itself for a fresh adapter, whose B matrices are zero), computed with each batch: never a
        # second copy of the base.
        precompute_ref_log_probs=False,
    )


def dpo_args(cfg: RunConfig, work_dir: Path, evaluate: bool = False):
    """trl.DPOConfig for a qtune RunConfig (dpo.loss one of trl's paired losses)."""
    from trl import DPOConfig

    return DPOConfig(
        **_preference_args(cfg, work_dir, evaluate), loss_type=[cfg.dpo.loss], label_smoothing=cfg.dpo.label_smoothing
    )


def kto_args(cfg: RunConfig, work_dir: Path, evaluate: bool = False):
    """trl.KTOConfig for a qtune RunConfig (dpo.loss=kto)."""
    from trl import KTOConfig

    if cfg.train.batch_size < 2:
        raise ConfigError(
            "dpo.loss=kto needs train.batch_size >= 2: its KL term pairs each completion with a neighbour's prompt"
        )
    values = _preference_args(cfg, work_dir, evaluate)
    # KTO estimates its KL term from each completion paired with its neighbour's prompt in a fixed-order batch, so
    # trl requires sequential order; qtune shuffles the records with train.seed before (build_kto_trainer).
    values["train_sampling_strategy"] = "sequential"
    return KTOConfig(**values)


def grpo_args(cfg: RunConfig, work_dir: Path, evaluate: bool = False):
    """trl.GRPOConfig for a qtune RunConfig: train.batch_size counts completions (grpo.group_size per prompt)."""
    from trl import GRPOConfig

    g, t = cfg.grpo, cfg.train
    if (t.batch_size * t.grad_accum) % g.group_size:
        raise ConfigError(
            f"recipe grpo: train.batch_size x train.grad_accum ({t.batch_size} x {t.grad_accum}) counts completions "
            f"and must be a multiple of grpo.group_size ({g.group_size}), so that every prompt's group is whole"
        )
    values = _common_args(cfg, work_dir, evaluate=False)  # the held-out reward is measured after training
    values.update(
        train_sampling_strategy="random",  # GRPO draws each prompt group_size times itself (its RepeatSampler)
        remove_unused_columns=False,  # the reward functions read the data's other columns (reference)
        num_generations=g.group_size,
        max_completion_length=g.max_new_tokens,
        temperature=g.temperature,
        beta=g.beta,
        reward_weights=g.reward_weights,
        pad_to_multiple_of=t.pad_to_multiple_of or None,
        log_completions=False,
    )
    return GRPOConfig(**values)


class _Pretokenized:
    """Trainer mixin for trl's DPO and KTO trainers, which tokenize text columns themselves: qtune gives them
    token ids already validated, masked and truncated (qtune.data.preference), taken as they are."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if getattr(self, "calculate_KL", False):
            # KTO's KL completions, as trl builds them: each batch's completions rotated by one, so each is scored
            # after another example's prompt.
            def rotate(batch):
                return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

            dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def build_dpo_trainer(
    model, tokenizer, train_dataset, cfg: RunConfig, checkpoints: Path, callbacks=None, eval_dataset=None
):
    """A DPOTrainer (or KTOTrainer, dpo.loss=kto) over pre-tokenized preference data (qtune.data.pairs_dataset /
    judged_dataset), with checkpoints and the non-finite guard. `model` is the PeftModel being trained: the
    reference is the same model under a frozen copy of its starting LoRA weights (the base itself for a fresh
    adapter; lora.from_adapter's weights), never a second copy of the base."""
    from trl import DPOTrainer, KTOTrainer

    if cfg.dpo.loss == "kto":
        trainer_cls, make_args = KTOTrainer, kto_args
        train_dataset = train_dataset.shuffle(seed=cfg.train.seed).flatten_indices()  # (then read in order)
    else:
        trainer_cls, make_args = DPOTrainer, dpo_args

    class QtunePreferenceTrainer(_Pretokenized, _GuardedSteps, trainer_cls):
        pass

    return _with_guards(
        QtunePreferenceTrainer,
        model,
        tokenizer,
        train_dataset,
        eval_dataset,
        cfg,
        checkpoints,
        callbacks,
        make_args,
        None,
    )


def build_grpo_trainer(model, tokenizer, train_dataset, reward_funcs: list, cfg: RunConfig, checkpoints: Path):
    """A GRPOTrainer over (prompt, reference, row) data (qtune.data.prompts_dataset), scoring each group of
    sampled completions with `reward_funcs`; with grpo.beta > 0 the reference is the model under a frozen copy of
    its starting LoRA weights."""
    from trl import GRPOTrainer

    class QtuneGRPOTrainer(_GuardedSteps, GRPOTrainer):
        pass

    return _with_guards(
        QtuneGRPOTrainer,
        model,
        tokenizer,
        train_dataset,
        None,
        cfg,
        checkpoints,
        None,
        grpo_args,
        None,
        reward_funcs=reward_funcs,
    )
