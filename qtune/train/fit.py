"""Run the trainer: fit (resuming, stopping cleanly on a non-finite step), and size the run to a GPU."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from qtune.config import ConfigError, RunConfig
from qtune.errors import TrainingError
from qtune.train import checkpoint


def fit(trainer, resume_from: Path | None, run: dict):
    """Train, continuing from a checkpoint if given (else a fresh checkpoint folder records `run`, from
    qtune.train.checkpoint.identity); a stop on a non-finite loss raises TrainingError."""
    if resume_from is None:
        checkpoint.start(Path(trainer.args.output_dir).parent, run)
    elif _finished(trainer, resume_from):
        return _restore_finished(trainer, resume_from)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as e:
        # A checkpoint is written into .incoming and moved out once complete: one still there failed mid-write,
        # whatever the error's type (the tokenizers library reports a full disk as a bare Exception).
        writing = sorted(Path(trainer.args.output_dir).glob("checkpoint-*"), key=checkpoint.step_of)
        if not (isinstance(e, OSError) or writing):
            raise
        folder = Path(trainer.args.output_dir).parent
        kept = [p.name for p in checkpoint.complete(folder)]
        where = f" while writing {writing[-1].name}" if writing else ""
        reason = e if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise TrainingError(
            f"training stopped at step {trainer.state.global_step}{where}: {reason}. Complete checkpoints in "
            f"{folder}: {', '.join(kept) or 'none'}; free disk space if it is full (the usual cause), then "
            "resume=auto continues from the newest"
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


def _padded(cfg: RunConfig, longest: int) -> int:
    """The longest example's length as batched: padded up to train.pad_to_multiple_of."""
    multiple = cfg.train.pad_to_multiple_of
    return -(-longest // multiple) * multiple if multiple else longest


def fit_to_vram(cfg: RunConfig, base_path: Path, longest: int) -> tuple[RunConfig, str]:
    """Apply `train.fit_to_vram`: pick micro-batch, grad_accum and checkpointing that fit, per qtune.plan.

    The effective batch (batch_size x grad_accum) is kept. `longest` is the longest tokenized
    example, where memory peaks (planned padded up to train.pad_to_multiple_of). Returns the adjusted
    config and a sentence saying what was chosen.
    """
    from qtune import plan

    vram = plan.parse_bytes(cfg.train.fit_to_vram)
    longest = _padded(cfg, longest)
    # The effective batch, to be split into micro-batches x accumulation.
    wanted = plan.PlanInput.from_config(cfg, seq=longest, batch=cfg.train.batch_size * cfg.train.grad_accum)
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


def check_vram(cfg: RunConfig, base_path: Path, longest: int) -> str:
    """Apply `train.vram`: refuse, before any model loads, a run that qtune.plan says does not fit the stated GPU.

    The run is planned as it is configured (quantization, LoRA, optimizer, dtype, checkpointing, loss, micro-batch
    train.batch_size) at the `longest` tokenized example padded as batched: the same numbers train.fit_to_vram uses.
    Returns a sentence with the planned peak.

    Raises:
        ConfigError: the run does not fit; the message names the settings that would make it fit.
    """
    from qtune import plan

    t = cfg.train
    vram = plan.parse_bytes(t.vram)
    seq = _padded(cfg, longest)
    arch = plan.load_arch(str(base_path))
    inp = plan.PlanInput.from_config(cfg, seq=seq, batch=t.batch_size)
    need = plan.estimate(arch, inp).total
    where = f"at seq {seq} (longest example) x batch {t.batch_size}"
    if need <= vram:
        return f"train.vram {t.vram}: planned peak {need / 2**30:.2f} GiB {where}"

    def largest_batch(run: plan.PlanInput) -> int:
        return next((b for b in range(t.batch_size, 0, -1) if _fits(arch, dataclasses.replace(run, batch=b), vram)), 0)

    fixes = []
    smaller = largest_batch(inp) if t.batch_size > 1 else 0
    if smaller:
        fixes.append(f"lower train.batch_size (fits at {smaller})")
    if not t.gradient_checkpointing or t.checkpoint_every > 1:
        checkpointed = dataclasses.replace(inp, gradient_checkpointing=True, checkpoint_every=1)
        at = largest_batch(checkpointed)
        key = "set train.checkpoint_every=1" if t.gradient_checkpointing else "set train.gradient_checkpointing=true"
        if at == t.batch_size:
            fixes.append(key)
        elif at > smaller:
            fixes.append(f"{key} with train.batch_size={at}")
    effective = dataclasses.replace(inp, batch=t.batch_size * t.grad_accum)
    try:
        micro, accum = plan.fit_to_vram(arch, effective, vram)
        fixes.append(
            f"train.fit_to_vram={t.vram} (it would choose micro-batch {micro.batch} x grad_accum {accum}, "
            f"checkpointing {'on' if micro.gradient_checkpointing else 'off'})"
        )
    except plan.PlanError:  # not even micro-batch 1 with every layer checkpointed fits at this length
        longest_fit = plan.estimate(arch, dataclasses.replace(plan.frugal(inp), vram=vram)).max_seq
        if longest_fit:
            fixes.append(
                f"lower data.max_length to {longest_fit} (what fits at micro-batch 1 with gradient checkpointing)"
            )
        else:
            fixes.append("use a smaller base, quant.method=nf4 or a lower lora.r: nothing fits at micro-batch 1")
    raise ConfigError(
        f"train.vram={t.vram}: this run needs {need / 2**30:.2f} GiB {where}, more than {vram / 2**30:.2f} GiB; "
        + ", or ".join(fixes)
    )


def _fits(arch: dict, inp, vram: int) -> bool:
    from qtune import plan

    return plan.estimate(arch, inp).total <= vram


def planned_steps(cfg: RunConfig, n_examples: int) -> int:
    """Optimizer steps the run will take (single process)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_examples / cfg.train.batch_size / cfg.train.grad_accum)
    return max(1, math.ceil(per_epoch * cfg.train.epochs))
