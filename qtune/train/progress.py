"""A run's live progress, for whoever watches it (`qtune studio`): one JSON line per event, appended by the training
process to <output.dir>/<output.name>.checkpoints/progress.jsonl, and read back by `read_progress`.

    {"event": "begin", "time": ..., "step": 0, "max_steps": 120, "pid": 4242, "name": "run", "cwd": "/project",
     "config": {...the resolved RunConfig...}}
    {"event": "step", "time": ..., "step": 1}
    {"event": "log", "time": ..., "step": 5, "loss": 2.31, "learning_rate": ...}     (and "eval_loss" ones)
    {"event": "end", "time": ..., "step": 120}

A resumed run appends a new "begin" (its step is the checkpoint's). The file lives in the checkpoint folder, so it
goes when the run's checkpoints go (once the adapter is written, whose qtune.json keeps the loss curves).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

PROGRESS_FILE = "progress.jsonl"


class ProgressLog(TrainerCallback):
    """Appends the run's begin, steps, logged losses and end to `folder`/progress.jsonl (rank 0 only)."""

    def __init__(self, folder: Path, name: str, config: dict[str, Any]):
        self.path = Path(folder) / PROGRESS_FILE
        self.name = name
        self.config = config

    def _write(self, state, event: str, **values: Any) -> None:
        if not state.is_world_process_zero:
            return
        line = {"event": event, "time": time.time(), "step": state.global_step, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        begin = {"max_steps": state.max_steps, "pid": os.getpid(), "name": self.name, "cwd": os.getcwd()}
        self._write(state, "begin", **begin, config=self.config)

    def on_step_end(self, args, state, control, **kwargs):
        self._write(state, "step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self._write(state, "log", **numbers)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state, "end")


@dataclass
class Progress:
    """What a progress file says: the latest begin, the step reached, the loss points, whether it ended."""

    begin: dict[str, Any] | None = None
    step: int = 0
    max_steps: int | None = None
    ended: bool = False
    loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    started: float | None = None  # time of the latest begin
    updated: float | None = None  # time of the latest line

    @property
    def pid(self) -> int | None:
        return self.begin.get("pid") if self.begin else None

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left at the pace since the latest begin (None before the first step of this begin)."""
        if not (self.begin and self.max_steps and self.started and self.updated) or self.ended:
            return None
        done = self.step - int(self.begin.get("step", 0))
        if done <= 0:
            return None
        rate = (self.updated - self.started) / done
        return max(0.0, (self.max_steps - self.step) * rate - ((now or time.time()) - self.updated))


def read_progress(path: Path) -> Progress:
    """Read a progress file (a torn last line, from a write the reader raced, is ignored). Missing: empty Progress."""
    progress = Progress()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return progress
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("step"), int):
            continue
        step, event = line["step"], line.get("event")
        progress.step, progress.updated = step, line.get("time")
        if event == "begin":
            progress.begin, progress.started, progress.ended = line, line.get("time"), False
            progress.max_steps = line.get("max_steps")
            # A resume restarts from its checkpoint: points past it were logged by the interrupted run after it.
            progress.loss = [p for p in progress.loss if p[0] <= step]
            progress.eval_loss = [p for p in progress.eval_loss if p[0] <= step]
        elif event == "log":
            if isinstance(line.get("loss"), (int, float)):
                progress.loss.append((step, float(line["loss"])))
            if isinstance(line.get("eval_loss"), (int, float)):
                progress.eval_loss.append((step, float(line["eval_loss"])))
        elif event == "end":
            progress.ended = True
    return progress
