"""The live progress file every training run writes (qtune/progress.py): what `qtune studio` shows."""

from __future__ import annotations

import json
import os

from qtune.config import from_dict, to_dict
from qtune.progress import PROGRESS_FILE, read_progress
from qtune.train import checkpoint
from recipes import sft
from tests.conftest import tiny_run
from tests.test_train import ROWS


def test_a_run_writes_its_begin_steps_losses_and_end(tmp_path, tiny_model_dir):
    make = tiny_run(tmp_path, tiny_model_dir, ROWS, "train.max_steps=4", "train.logging_steps=2")
    cfg = make("output.keep_checkpoints=true", "resume=auto")
    sft.main(cfg)
    folder = tmp_path / "adapters" / "run.checkpoints"
    lines = [json.loads(line) for line in (folder / PROGRESS_FILE).read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert events[0] == "begin" and events[-1] == "end"
    steps = [line["step"] for line in lines if line["event"] == "step"]  # at most one a second, and the last
    assert steps == sorted(set(steps)) and steps[-1] == 4 and steps[0] >= 1
    begin = lines[0]
    assert begin["max_steps"] == 4 and begin["pid"] == os.getpid() and begin["cwd"] == os.getcwd()
    # The recorded config is the run's: what a resume of this run is started with (resume=auto added then).
    recorded = from_dict(begin["config"])
    assert to_dict(recorded) == {**to_dict(cfg), "resume": None} and begin["name"] == "run"
    progress = read_progress(folder / PROGRESS_FILE)
    assert progress.ended and progress.step == 4 and progress.max_steps == 4
    # (and step 1: qtune logs the first step too, logging_first_step)
    assert [s for s, _ in progress.loss] == [1, 2, 4] and all(v > 0 for _, v in progress.loss)
    assert progress.eta_seconds() is None  # ended


def _line(event: str, step: int, t: float, **values) -> str:
    return json.dumps({"event": event, "step": step, "time": t, **values}) + "\n"


def test_a_resume_drops_the_points_logged_after_its_checkpoint_and_a_torn_line_is_ignored(tmp_path):
    path = tmp_path / PROGRESS_FILE
    path.write_text(
        _line("begin", 0, 100.0, max_steps=10, pid=1)
        + "".join(_line("log", s, 100.0 + s, loss=5.0 - s) for s in (2, 4, 6))
        + _line("begin", 4, 200.0, max_steps=10, pid=2)  # resumed from checkpoint-4: step 6 is redone
        + _line("step", 5, 210.0)
        + _line("log", 5, 210.0, loss=1.5, eval_loss=1.7)
        + '{"event": "step", "st'  # a write the reader raced
    )
    progress = read_progress(path)
    assert progress.loss == [(2, 3.0), (4, 1.0), (5, 1.5)] and progress.eval_loss == [(5, 1.7)]
    assert progress.pid == 2 and progress.step == 5 and not progress.ended
    # One step in 10 s since the resume began: 5 steps left, 10 s each, less the 4 s since the last line.
    assert progress.eta_seconds(now=214.0) == 46.0
    assert read_progress(tmp_path / "missing.jsonl").begin is None


def test_the_progress_file_goes_with_the_checkpoints_of_a_finished_run(tmp_path, tiny_model_dir):
    cfg = tiny_run(tmp_path, tiny_model_dir, ROWS, "train.max_steps=2")()
    sft.main(cfg)
    assert not checkpoint.root(cfg).exists() and (tmp_path / "adapters" / "run" / "qtune.json").is_file()


def test_a_process_is_named_by_its_pid_and_start_time(tmp_path):
    import subprocess
    import sys

    from qtune.progress import is_alive, process_start

    me = process_start(os.getpid())
    assert isinstance(me, int) and is_alive(os.getpid(), me) and is_alive(os.getpid())
    assert not is_alive(os.getpid(), me + 1)  # the same pid, another process (a pid reused after a reboot)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while _state(child.pid) != "Z":  # exited, not yet reaped
        pass
    assert not is_alive(child.pid)
    child.wait()
    assert not is_alive(child.pid) and not is_alive(None) and not is_alive(-1)


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
