"""The trainer hooks qtune adds by subclassing (no upstream code is changed): the loss from logits at the
trained positions only (in training and in the held-out loss while training), the non-finite guard, the
resumable data order and random stream, checkpoint promotion, where TensorBoard writes, and the live progress
file (qtune/progress.py).

`_TrainedPositionsLoss` reads a few of trl's SFTTrainer internals to log the metrics trl logs; they are
checked when a trainer is built (`check_trl_internals`), and a trl without them falls back to trl's own
loss with a printed line, never an error mid-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from array import array
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from qtune.data.store import lengths
from qtune.progress import PROGRESS_FILE, process_start

# What _TrainedPositionsLoss reads of trl's SFTTrainer, and the versions it was written and tested against.
TRL_INTERNALS = ("_metrics", "_total_train_tokens", "_tp_size", "aux_loss_enabled", "get_tp_size", "compute_loss_func")
WRITTEN_AGAINST = {"trl": "1.16", "transformers": "5.24"}
_SAID: set[str] = set()  # fallback reasons already printed in this process


def check_trl_internals(trainer) -> list[str]:
    """The trl internals the trained-positions loss reads that this trainer lacks (empty: all there).

    A trl that renamed one of them gets trl's own loss for the run, with a line saying why.
    """
    missing = [name for name in TRL_INTERNALS if not hasattr(trainer, name)]
    if missing:
        print(
            f"loss: trl {version('trl')} has no {', '.join(missing)} (qtune's trained-positions loss was written "
            f"against trl {WRITTEN_AGAINST['trl']} and transformers {WRITTEN_AGAINST['transformers']}): "
            "trl's own loss is used"
        )
    return missing


def barrier() -> None:
    """Wait for every process of a torchrun / accelerate launch (nothing in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
        if logits.size(0) > rows and torch.is_grad_enabled():  # (evaluating: no backward to save memory for)
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
    The held-out loss while training (train.eval_every) is the same loss, without gradients. Anything
    trl computes differently (DFT, label smoothing, a compute_loss_func, MoE auxiliary losses, logits
    asked for by evaluation) goes to trl.
    """

    qtune_chunked_loss = False  # set by build_sft_trainer: train.chunked_loss, where the model allows it
    qtune_fast_steps = 0  # micro-batches whose loss came from the trained positions (tests assert it)

    def _why_trl_loss(self, model, inputs, return_outputs) -> str | None:
        """Why this call goes to trl's own loss (None: the trained-positions loss applies)."""
        for applies, why in (
            (return_outputs, "outputs requested"),
            (not self.qtune_chunked_loss, "train.chunked_loss is off, or the model takes no logits_to_keep"),
            (self.args.loss_type != "nll", f"loss_type {self.args.loss_type!r}"),
            (self.compute_loss_func is not None, "a compute_loss_func is set"),
            (self.label_smoother is not None, "label smoothing is on"),
            (self.aux_loss_enabled, "the model adds an auxiliary (MoE router) loss"),
            ("labels" not in inputs, "the batch has no labels"),
        ):
            if applies:
                return why
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        why = self._why_trl_loss(model, inputs, return_outputs)
        if why is not None:
            if model.training and why not in _SAID:
                _SAID.add(why)
                print(f"loss: trl's own (every position scored): {why}")
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.qtune_fast_steps += model.training
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
        """The metrics trl's compute_loss logs: entropy, mean_token_accuracy, num_tokens (trained tokens so far)."""
        gather = self.accelerator.gather_for_metrics
        valid, entropy, hits = gather(count).sum(), gather(entropy).sum(), gather(hits).sum()
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((hits / valid).item() if valid > 0 else 0.0)
        if self.model.training:
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:  # padding-free: one row of real tokens
                ids = inputs["input_ids"]
                tokens = gather(torch.tensor(ids.numel(), device=ids.device)).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


class _GuardedSteps:
    """Trainer subclass mixin (no upstream code is changed): hands each micro-batch and its loss to the
    NonFiniteGuard, draws the length-grouped data order from the seed and epoch alone, so a resumed
    run sees the same batches as an uninterrupted one, and leaves the random stream as an evaluation found it.
    """

    def evaluate(self, *args, **kwargs):
        # Iterating the eval DataLoader draws a seed from torch's global RNG: without this, each held-out loss
        # (train.eval_every) would shift the dropout masks and a random sampler's next epoch, and a run with
        # evaluation would train differently from one without.
        saved = _rng_states()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            _set_rng_states(saved)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSeededLengthSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            lengths=sequence_lengths(dataset),
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        # transformers groups held-out rows by their input_ids' length; preference data has prompt and answer ids
        # instead, and the order of a held-out loss's rows does not change it.
        if eval_dataset is not None and "input_ids" not in getattr(eval_dataset, "column_names", ["input_ids"]):
            return torch.utils.data.SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self.qtune_guard.saw(inputs, loss_finite=False)
            return torch.zeros_like(loss)  # keep the logged running loss finite; the step is handled by the guard
        self.qtune_guard.saw(inputs, loss_finite=True)
        return loss


def _rng_states() -> dict:
    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


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
        for batch in train_dataset.iter(batch_size=1000):  # in batches: a large data set stays on disk
            for i, row in enumerate(batch["row"]):
                for ids in _sequences(batch, i):
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
    return hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()


def _sequences(batch: dict, i: int) -> list[list[int]]:
    """The token rows the trainer builds from example `i` of a dataset batch: its input_ids (SFT, classification),
    prompt + chosen and prompt + rejected (DPO), prompt + completion (KTO); none from GRPO's prompts (its rows are
    generated)."""
    if "input_ids" in batch:
        return [batch["input_ids"][i]]
    answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in batch]
    return [batch["prompt_ids"][i] + batch[c][i] for c in answers] if "prompt_ids" in batch else []


def sequence_lengths(dataset) -> list[int]:
    """Each example's token count as length grouping sees it: input_ids, or the prompt and its longest answer."""
    if "input_ids" in dataset.column_names:
        return lengths(dataset)
    return [max(map(len, _sequences(b, i))) for b in dataset.iter(batch_size=1000) for i in range(len(b["prompt_ids"]))]


def _examples(batch: dict) -> list[list[int]]:
    """The token ids of each example in a micro-batch: padded rows cut by the attention mask, or a
    padding-free row split where position_ids restart at 0."""
    if "attention_mask" not in batch and "position_ids" in batch:
        out = []
        for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            out += [ids[a:b] for a, b in zip(starts, starts[1:])]
        return out
    if "input_ids" not in batch:  # (GRPO: generated rows, not the data set's)
        return []
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
        barrier()  # every process has written its part (its RNG state) before the folder moves
        if state.is_world_process_zero:
            from qtune.train import checkpoint

            checkpoint.promote(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.keep)
        return control


class TensorBoardLogs(TensorBoardCallback):
    """transformers' TensorBoard callback, writing into `logging_dir` (qtune.train.args.runs_dir) instead of under
    the trainer's output_dir, which is the checkpoints' scratch folder. TENSORBOARD_LOGGING_DIR, if set, wins."""

    def __init__(self, logging_dir: Path):
        super().__init__()
        self.logging_dir = self.logging_dir or str(logging_dir)  # (the parent has read the environment variable)


class ProgressLog(TrainerCallback):
    """Appends the run's begin, steps, logged losses and end to `folder`/progress.jsonl (rank 0 only; the file's
    lines are described in qtune/progress.py). Steps are written at most once a second, and the last one."""

    def __init__(self, folder: Path, name: str, config: dict[str, Any]):
        self.path = Path(folder) / PROGRESS_FILE
        self.name = name
        self.config = config
        self.last_step_line = 0.0

    def _write(self, state, event: str, **values: Any) -> None:
        if not state.is_world_process_zero:
            return
        line = {"event": event, "time": time.time(), "step": state.global_step, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        pid = os.getpid()
        begin = {"max_steps": state.max_steps, "pid": pid, "pid_start": process_start(pid), "name": self.name}
        begin["cwd"] = os.getcwd()
        self._write(state, "begin", **begin, config=self.config)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self.last_step_line >= 1.0 or state.global_step >= state.max_steps:
            self.last_step_line = now
            self._write(state, "step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self._write(state, "log", **numbers)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state, "end")
