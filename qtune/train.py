"""The only module that builds trl / transformers trainers and their arguments.

Upstream renames (trl 1 and transformers 5 moved several arguments) are absorbed here, once.
"""

from __future__ import annotations

import math
import os
from array import array
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from qtune.checkpoint import is_main_process  # noqa: F401  (the recipes ask train.is_main_process())
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
        # One row per micro-batch, no padding; position_ids restart at each example, from which transformers
        # builds a block-diagonal mask (sdpa, eager) or varlen boundaries (flash attention): no cross-attention.
        # A micro-batch of one has no padding to remove.
        padding_free=cfg.train.padding_free and cfg.train.batch_size > 1,
        pad_to_multiple_of=cfg.train.pad_to_multiple_of or None,
        dataset_num_proc=None,
    )


def build_sft_trainer(model, tokenizer, train_dataset, cfg: RunConfig, checkpoints: Path, callbacks=None):
    """An SFTTrainer over pre-tokenized (input_ids, labels, row) data, with checkpoints and the non-finite guard.

    `checkpoints` is the run's checkpoint folder (qtune.checkpoint.root): the trainer writes into its
    .incoming/ and each complete checkpoint is moved up into it.
    """
    from trl import SFTTrainer

    class QtuneSFTTrainer(_TrainedPositionsLoss, _GuardedSteps, SFTTrainer):
        pass

    trainer = _with_guards(
        QtuneSFTTrainer, model, tokenizer, train_dataset, cfg, checkpoints, callbacks, sft_args, data_collator=None
    )
    trainer.qtune_chunked_loss = cfg.train.chunked_loss and _takes_logits_to_keep(trainer.model)
    return trainer


def _takes_logits_to_keep(model) -> bool:
    """Does the causal LM's forward take `logits_to_keep` (transformers' models do; remote code may not)?"""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def trained_positions_loss(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None):
    """Summed cross-entropy of `logits` (positions x vocab) against `targets`, in fp32, a chunk of rows at a time.

    Each chunk is upcast to fp32 inside a non-reentrant checkpoint, so neither the forward nor the backward
    ever holds fp32 log-probabilities for more than one chunk. Returns (loss sum, entropy sum, top-1 hits);
    the last two without gradient, for trl's logged metrics.
    """
    from torch.utils.checkpoint import checkpoint

    rows = chunk_rows or max(1, 2**24 // logits.size(-1))  # ~64 MiB of fp32 per chunk
    loss = logits.new_zeros((), dtype=torch.float32)
    entropy = torch.zeros((), dtype=torch.float32, device=logits.device)
    hits = torch.zeros((), dtype=torch.long, device=logits.device)
    for start in range(0, logits.size(0), rows):
        part, target = logits[start : start + rows], targets[start : start + rows]
        if logits.size(0) > rows:
            loss = loss + checkpoint(_cross_entropy_sum, part, target, use_reentrant=False)
        else:
            loss = loss + _cross_entropy_sum(part, target)
        with torch.no_grad():
            logp = part.float().log_softmax(-1)
            entropy += -(logp.exp() * logp).sum()
            hits += (part.argmax(-1) == target).sum()
    return loss, entropy, hits


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


class _TrainedPositionsLoss:
    """SFTTrainer mixin: the causal-LM loss from logits at the trained positions only.

    trl's fused LM head scores every position on devices without Triton (a CPU), converting each
    chunk of the LM head's weight as it goes; qtune's data train on answers only, a few positions in
    each example. Here the model is called through its wrappers (PEFT, DDP, FSDP) with transformers'
    `logits_to_keep` set to the positions whose next token is a label, and the loss is the same
    token-summed negative log-likelihood over the same normaliser as trl's, with the same metrics.
    Anything trl computes differently (DFT, label smoothing, a compute_loss_func, MoE auxiliary
    losses, evaluation outputs) goes to trl.
    """

    qtune_chunked_loss = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (
            return_outputs
            or not self.qtune_chunked_loss
            or not model.training
            or self.args.loss_type != "nll"
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or self.aux_loss_enabled
            or "labels" not in inputs
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        shifted = labels[:, 1:]
        trained = shifted != -100
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = trained  # the position whose logits predict each trained label
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**forward, use_cache=False, logits_to_keep=keep)
        loss_sum, entropy, hits = trained_positions_loss(outputs.logits, shifted[trained])
        count = trained.sum()
        loss = loss_sum / torch.as_tensor(count if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._log_metrics(inputs, count, entropy, hits)
        return loss

    def _log_metrics(self, inputs, count, entropy, hits) -> None:
        """The metrics trl's compute_loss logs: entropy, mean_token_accuracy, num_tokens."""
        gather = self.accelerator.gather_for_metrics
        valid, entropy, hits = gather(count).sum(), gather(entropy).sum(), gather(hits).sum()
        metrics = self._metrics["train"]
        metrics["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((hits / valid).item() if valid > 0 else 0.0)
        if "attention_mask" in inputs:
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
        else:  # padding-free: one row of real tokens
            tokens = gather(torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)).sum().item()
        self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


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
            f"training stopped before the weights changed; the last good weights are in {where}. Continue past "
            "that batch with resume=auto train.on_nonfinite=skip, or fix those rows or lower train.lr and "
            "start over (delete the checkpoints: a resume with other data or settings is refused)"
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
    """Whether the checkpoint is the run's last step (the crash came after training: in evaluation or saving).

    The trainer records the run's length in the checkpoint (`max_steps`, counted per process as it counts).
    """
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint_dir) / "trainer_state.json"))
    return state.max_steps > 0 and state.global_step >= state.max_steps


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
    unexpected = set_peft_model_state_dict(trainer.model, weights).unexpected_keys
    if unexpected:
        raise TrainingError(f"{checkpoint_dir}: weights {unexpected[:3]} do not fit this model")
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
        self._rows_of: dict[bytes, list[int]] = {}  # a 16-byte digest per example, not its token tuple
        for ids, row in zip(train_dataset["input_ids"], train_dataset["row"]):
            self._rows_of.setdefault(_digest(ids), []).append(row)
        self._batches: list[dict] = []
        self._bad_loss = False

    def saw(self, inputs: dict, loss_finite: bool) -> None:
        batch = {k: inputs[k].detach() for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        self._batches.append((batch, loss_finite))
        self._bad_loss |= not loss_finite

    def rows(self) -> list[int]:
        """The data rows of the micro-batches whose loss was not finite (else of the whole step)."""
        bad = [batch for batch, finite in self._batches if not finite] or [batch for batch, _ in self._batches]
        rows = set()
        for batch in bad:
            for ids in _examples(batch):
                rows.update(self._rows_of.get(_digest(ids), []))
        return sorted(rows)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Under fp16 a loss scaler owns gradient overflows (it skips those steps itself): only the loss counts.
        grads_checked = not args.fp16
        bad_grad = grads_checked and any(
            p.grad is not None and not torch.isfinite(p.grad).all() for p in model.parameters()
        )
        bad_loss, bad_grad, rows = _agree(self._bad_loss, bad_grad, self.rows() if self._bad_loss or bad_grad else [])
        if bad_loss or bad_grad:  # every process takes the same decision (and reports every process's rows)
            event = {"step": state.global_step + 1, "what": "loss" if bad_loss else "gradient", "rows": rows}
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


def _agree(bad_loss: bool, bad_grad: bool, rows: list[int]) -> tuple[bool, bool, list[int]]:
    """Under torchrun / accelerate: whether any process saw a non-finite value, and all their rows."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bad_loss, bad_grad, rows
    flags = torch.tensor([bad_loss, bad_grad], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        flags = flags.cuda()
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if not flags.any():
        return False, False, []
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, rows)
    return bool(flags[0]), bool(flags[1]), sorted({r for part in everyone for r in part})


def _digest(ids: list[int]) -> bytes:
    import hashlib

    return hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()


def _examples(batch: dict) -> list[list[int]]:
    """The token ids of each example in a micro-batch: padded rows cut by the attention mask, or a
    padding-free row split where position_ids restart at 0."""
    if "attention_mask" not in batch and "position_ids" in batch:
        out = []
        for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            out += [ids[a:b] for a, b in zip(starts, starts[1:])]
        return out
    mask = batch.get("attention_mask")
    if mask is None:
        return batch["input_ids"].tolist()
    # Tokens where the mask is 1: right or left padding alike.
    return [[t for t, m in zip(ids, keep) if m] for ids, keep in zip(batch["input_ids"].tolist(), mask.tolist())]


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
    example, where memory peaks (planned padded up to train.pad_to_multiple_of). Returns the adjusted
    config and a sentence saying what was chosen.
    """
    import dataclasses

    from qtune import plan

    vram = plan.parse_bytes(cfg.train.fit_to_vram)
    multiple = cfg.train.pad_to_multiple_of
    longest = -(-longest // multiple) * multiple if multiple else longest  # the batch is padded up to it
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
        checkpoint_every=cfg.train.checkpoint_every,
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
        cfg.train,
        batch_size=chosen.batch,
        grad_accum=accum,
        gradient_checkpointing=chosen.gradient_checkpointing,
        checkpoint_every=chosen.checkpoint_every,
    )
    peak = plan.estimate(arch, chosen).total
    note = (
        f"fit_to_vram {cfg.train.fit_to_vram}: micro-batch {chosen.batch} x grad_accum {accum}, gradient "
        f"checkpointing {'on' if chosen.gradient_checkpointing else 'off'} (planned peak {peak / 2**30:.2f} GiB "
        f"at {longest} tokens)"
    )
    if chosen.gradient_checkpointing and cfg.train.checkpoint_every > 1:
        note += f"; train.checkpoint_every {cfg.train.checkpoint_every} -> 1: fit_to_vram checkpoints every layer"
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
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.train.pad_to_multiple_of or None),
    )
