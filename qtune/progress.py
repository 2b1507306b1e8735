"""A run's live progress, for whoever watches it (`qtune studio`): one JSON line per event, appended by the training
process (qtune.train.hooks.ProgressLog) to <output.dir>/<output.name>.checkpoints/progress.jsonl, and read back
by `read_progress`. Light: no torch or transformers import, so a watcher starts fast.

    {"event": "begin", "time": ..., "step": 0, "max_steps": 120, "pid": 4242, "pid_start": 81234, "name": "run",
     "cwd": "/project", "config": {...the resolved RunConfig...}}
    {"event": "step", "time": ..., "step": 1}       (at most one a second, and the last)
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

PROGRESS_FILE = "progress.jsonl"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None (no such process, not Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None where that cannot be
    read. With the pid it names one process: a pid alone may be reused once that process is gone."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def is_alive(pid: int | None, started: int | None = None) -> bool:
    """Is process `pid` running (a zombie is not), and, where `started` is known, the process that started then?"""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, but not ours to check further
        return started is None
    fields = _stat(pid)
    if fields and fields[0] == "Z":  # exited, not yet reaped by its parent
        return False
    return started is None or process_start(pid) in (started, None)


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
