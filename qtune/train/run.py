"""What every training recipe does around its own steps, in one place: a recipe reads its data, builds its
model and trainer, evaluates, and leaves the rest to a `Run`.

    run = train.start(cfg)              output folder checked, seed set, base folder and tokenizer
    train, held, report = run.held_out(train, read)  data.eval, or a seeded data.eval_fraction of train
    cfg = run.prepare(report, longest)  train.fit_to_vram applied; resume point found (or an interrupted run refused)
    run.eval_sample(held)               the held-out examples whose loss is logged while training (train.eval_every)
    run.train(trainer)                  fit, timed; under FSDP the sharded weights gathered
    if run.writes: ...                  rank 0 alone evaluates and writes
    run.save(model, trainer, ...)       qtune.json + loss curve + PEFT files, atomically; checkpoints removed
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtune import atomic, lora, models
from qtune.config import ConfigError, RunConfig
from qtune.data import apply_template, describe, hold_out
from qtune.meta import Labels, new_meta
from qtune.train import checkpoint
from qtune.train.args import eval_steps, report_to
from qtune.train.fit import check_vram, fit, fit_to_vram, gathered_weights, planned_steps
from qtune.train.loss_curve import eval_loss_points, loss_curve_png, loss_points


@dataclass
class Run:
    """One training run: its config (as adjusted by `prepare`), where it writes, its base, and how it went."""

    cfg: RunConfig
    out_dir: Path
    base_path: Path
    tokenizer: Any
    fingerprint: str = ""  # the base's (models.fingerprint_base), set by prepare
    identity: dict | None = None  # what a checkpoint must agree with to resume this run (checkpoint.identity)
    resume_from: Path | None = None
    result: Any = None  # the trainer's TrainOutput
    seconds: float = 0.0
    weights: dict | None = None  # under FSDP: the gathered full weights, for saving

    @property
    def checkpoints(self) -> Path:
        """The run's checkpoint folder, where the trainer writes."""
        return checkpoint.root(self.cfg)

    @property
    def writes(self) -> bool:
        """Whether this process evaluates and writes (rank 0 of a torchrun / accelerate launch; a single process)."""
        return checkpoint.is_main_process()

    def prepare(self, train_report, longest: int) -> RunConfig:
        """Before any model is loaded: apply train.fit_to_vram at the `longest` example, then find the checkpoint
        to resume from (resume=auto), or refuse to start over an interrupted run. Returns the run's config."""
        if self.cfg.train.fit_to_vram:  # micro-batch, accumulation and checkpointing that fit the GPU (qtune plan)
            self.cfg, note = fit_to_vram(self.cfg, self.base_path, longest)
            print(note)
        if self.cfg.train.vram:  # a run the planner says does not fit the stated GPU is refused here
            print(check_vram(self.cfg, self.base_path, longest))
        self.fingerprint = models.fingerprint_base(self.base_path)
        lora.check_from_adapter(self.cfg, self.fingerprint)  # an adapter of another base is refused before it loads
        template = self.tokenizer.chat_template
        self.identity = checkpoint.identity(self.cfg, self.fingerprint, train_report.fingerprint, template)
        self.resume_from = checkpoint.prepare(self.cfg, self.identity)
        return self.cfg

    def train(self, trainer):
        """Train (resuming if prepared so), writing a resumable checkpoint every train.save_every steps."""
        t = self.cfg.train
        steps = planned_steps(self.cfg, len(trainer.train_dataset))
        print(f"training {steps} steps of {t.batch_size}x{t.grad_accum} examples")
        start = time.perf_counter()
        self.result = fit(trainer, self.resume_from, self.identity)
        self.seconds = time.perf_counter() - start
        self.weights = gathered_weights(trainer)  # under FSDP every process helps gather the sharded weights
        return self.result

    def held_out(self, train_examples: list, read_eval: Callable[[str], tuple]) -> tuple[list, list, Any]:
        """The evaluation data: data.eval read by `read_eval(path)` -> (examples, report, ...), or else a seeded
        data.eval_fraction of the training examples; at most eval.limit of them.

        Returns (training examples, evaluation examples, evaluation report or None).
        """
        data = self.cfg.data
        if data.eval:
            evaluation, report = read_eval(data.eval)[:2]
        elif data.eval_fraction:  # one file: a seeded fraction of it held out
            train_examples, evaluation, report = hold_out(
                train_examples, data.eval_fraction, self.cfg.train.seed, describe(data)
            )
        elif self.cfg.train.eval_every:
            raise ConfigError(
                f"train.eval_every={self.cfg.train.eval_every} needs held-out data: set data.eval (a file) or "
                "data.eval_fraction (e.g. 0.05), or drop train.eval_every"
            )
        else:
            return train_examples, [], None
        print(f"eval data:  {report.summary()}")
        return train_examples, evaluation[: self.cfg.eval.limit] if self.cfg.eval.limit else evaluation, report

    def eval_sample(self, eval_examples) -> list:
        """The held-out examples whose loss the trainer logs every train.eval_every steps: a seeded sample of at most
        train.eval_max_examples, the same at every evaluation (and after a resume). Empty when that is off."""
        every, n = eval_steps(self.cfg), len(eval_examples)
        if not (every and n):
            return []
        picked = sorted(random.Random(self.cfg.train.seed).sample(range(n), min(self.cfg.train.eval_max_examples, n)))
        sample = (
            eval_examples.select(picked) if hasattr(eval_examples, "select") else [eval_examples[i] for i in picked]
        )
        print(f"held-out loss every {every} steps while training, on {len(sample)} of the {n} held-out examples")
        return sample

    def evaluates(self, eval_examples: list) -> bool:
        """Whether there is held-out data to evaluate here (a sharded model cannot run on rank 0 alone)."""
        if eval_examples and self.cfg.train.fsdp:
            data = self.cfg.data.eval or "HELD_OUT_FILE"
            print(f"held-out evaluation skipped under FSDP: run `qtune eval {self.out_dir} --data {data}`")
            return False
        return bool(eval_examples)

    def save(
        self,
        model,
        trainer,
        *,
        kind: str,
        train_report,
        eval_report,
        metrics: dict[str, Any],
        files: dict[str, bytes] | None = None,
        training: dict[str, Any] | None = None,
        labels: Labels | None = None,
        samples: list[dict] | None = None,
        chat_template: str | None = None,
    ) -> Path:
        """Write the adapter folder (PEFT files, qtune.json, loss.png and `files`) atomically, then remove the
        run's checkpoints (unless output.keep_checkpoints). `training` adds recipe-specific training facts."""
        cfg = self.cfg
        losses, eval_losses = loss_points(trainer.state.log_history), eval_loss_points(trainer.state.log_history)
        meta = new_meta(
            kind=kind,
            cfg=cfg,
            base_path=self.base_path,
            fingerprint=self.fingerprint,
            train_report=train_report,
            eval_report=eval_report,
            steps=self.result.global_step,
            train_loss=self.result.training_loss,
            seconds=self.seconds,
            losses=losses,
            eval_losses=eval_losses,
            metrics=metrics,
            training={
                **(training or {}),
                "resumed_from_step": checkpoint.step_of(self.resume_from) if self.resume_from else None,
                "nonfinite_skipped": trainer.qtune_guard.events,
            },
            labels=labels,
            samples=samples,
            chat_template=chat_template,
        )
        png = loss_curve_png(losses, f"{self.out_dir.name}: {cfg.model.name}, LoRA r={cfg.lora.r}", eval_losses)
        files = {"loss.png": png, **(files or {})}
        lora.save_adapter(model, self.out_dir, meta, files, overwrite=cfg.output.overwrite, state_dict=self.weights)
        checkpoint.finish(cfg)
        unlock_output(self.out_dir)
        print(f"adapter written to {self.out_dir} ({self.seconds:.0f} s of training)")
        return self.out_dir


_LOCKS: dict[Path, Any] = {}  # the output locks this process holds: open files, flock'ed


def _lock_path(out_dir: Path) -> Path:
    """The lock of an output folder, in qtune's cache (nothing appears beside the folder before the adapter)."""
    import hashlib

    key = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:32]
    return models.qtune_home() / "locks" / f"{key}.lock"


def lock_output(out_dir: Path) -> None:
    """One training per output folder: an OS lock (flock) held by this process until its run is saved or the
    process ends (a crash, a kill: the OS releases it). Another process's run into the same folder is refused,
    naming it; this process may run again (a retry after an error)."""
    import fcntl
    import os
    import socket

    path = _lock_path(out_dir)
    if path in _LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"{out_dir} is being trained by {holder}: wait for that run to end, or pick another output.name"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _LOCKS[path] = f


def unlock_output(out_dir: Path) -> None:
    f = _LOCKS.pop(_lock_path(out_dir), None)
    if f is not None:
        f.close()  # (the lock file stays: removing it could let two runs lock two different files)


def start(cfg: RunConfig) -> Run:
    """Begin a run: refuse an existing output folder now (not after training), and one another process is training
    into; seed, find the base and its tokenizer (with data.chat_template applied).

    The embedded SmolLM2 is converted once, on first use.
    """
    from transformers import set_seed

    out_dir = lora.output_dir(cfg)
    report_to(cfg)  # a train.report_to whose package is missing fails now, not after the data and the model load
    if checkpoint.is_main_process():  # (under torchrun / accelerate, rank 0 writes and holds the lock)
        lock_output(out_dir)
        # Holding the lock, nothing else writes here: a staging folder beside the output is a killed save's.
        for done in atomic.remove_leftovers(out_dir):
            print(f"note: a save of {out_dir} was killed; {done}")
    set_seed(cfg.train.seed)
    base_path = models.resolve_base(cfg.model)
    tokenizer = models.load_tokenizer(base_path, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.chat_template)  # data.chat_template: stored with the adapter by save
    return Run(cfg, out_dir, base_path, tokenizer)
