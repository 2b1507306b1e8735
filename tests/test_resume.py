"""Crash safety: a real SIGKILL mid-run and `resume=auto` give the uninterrupted run's adapter, bit for bit;
partial checkpoints are never resumed; a NaN/inf loss stops (or skips) before the weights change."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtune import lora
from qtune.config import ConfigError, load_config
from qtune.errors import TrainingError
from qtune.lora import read_meta
from qtune.train import checkpoint
from recipes import sft

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["great", "boring", "wonderful", "terrible", "fine", "dull", "good", "bad"]
ROWS = [
    {
        "messages": [
            {
                "role": "user",
                "content": f"review {i}: the movie was {' '.join(WORDS[(i + k) % 8] for k in range(i % 5 + 1))}",
            },
            {"role": "assistant", "content": "positive" if i % 2 else "negative"},
        ]
    }
    for i in range(32)
]


@pytest.fixture()
def run_args(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return [
        f"model.name={tiny_model_dir}",
        "model.dtype=fp32",
        "quant.method=none",
        f"data.train={data}",
        "train.max_steps=20",  # 2.5 epochs of 8 steps: the resume crosses epoch boundaries
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=1e-2",
        "train.logging_steps=1",
        "train.save_every=2",
        "lora.r=4",
        "lora.dropout=0.1",  # dropout draws random numbers: the RNG state must be restored too
        f"output.dir={tmp_path / 'adapters'}",
    ]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / lora.ADAPTER_WEIGHTS)), load_file(str(b / lora.ADAPTER_WEIGHTS))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter_bitwise(run_args, tmp_path):
    reference = sft.main(load_config(None, [*run_args, "output.name=reference"]))

    rng = random.Random()
    kill_after = rng.choice(range(4, 15, 2))  # a checkpoint in the first three quarters of the run
    delay = rng.uniform(0, 0.05)  # then into the middle of a later step (or of a checkpoint write)
    folder = tmp_path / "adapters" / "killed.checkpoints"
    log = (tmp_path / "child.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    config = tmp_path / "run.yaml"
    config.write_text("recipe: sft\n")
    child = subprocess.Popen(
        [sys.executable, "-m", "qtune.cli", "train", str(config), *run_args, "output.name=killed"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while not (folder / f"checkpoint-{kill_after}").is_dir():
        assert child.poll() is None, (tmp_path / "child.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the child never reached its checkpoint"
        time.sleep(0.002)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not (tmp_path / "adapters" / "killed").exists(), "the run finished before the kill: nothing was tested"
    steps = [checkpoint.step_of(p) for p in checkpoint.complete(folder)]
    assert steps and steps[-1] >= kill_after and steps[-1] < 20, steps

    with pytest.raises(ConfigError, match="resume=auto"):  # never silently restart over an interrupted run
        sft.main(load_config(None, [*run_args, "output.name=killed"]))
    resumed = sft.main(load_config(None, [*run_args, "output.name=killed", "resume=auto"]))
    meta = read_meta(resumed)
    assert meta["training"]["resumed_from_step"] == steps[-1]
    assert meta["training"]["steps"] == 20
    same_weights(reference, resumed)
    # The loss curve covers the whole run, before and after the kill.
    assert [s for s, _ in meta["training"]["loss_curve"]] == list(range(1, 21))


def test_partial_checkpoints_are_never_resumed(run_args, tmp_path):
    cfg = load_config(None, [*run_args, "output.name=run", "train.max_steps=4"])
    sft.main(load_config(None, [*run_args, "output.name=run", "train.max_steps=4", "output.keep_checkpoints=true"]))
    folder = checkpoint.root(cfg)
    assert [p.name for p in checkpoint.complete(folder)] == ["checkpoint-2", "checkpoint-4"]
    # A kill during a write leaves a folder in .incoming, or (by hand) a checkpoint missing its optimizer.
    (folder / checkpoint.INCOMING / "checkpoint-6").mkdir(parents=True)
    (folder / "checkpoint-8").mkdir()
    (folder / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"partial")
    assert [checkpoint.step_of(p) for p in checkpoint.complete(folder)] == [2, 4]
    assert (
        checkpoint.prepare(
            load_config(None, [*run_args, "output.name=run", "train.max_steps=4", "resume=auto"]),
            json.loads((folder / checkpoint.RUN_FILE).read_text()),
        )
        == folder / "checkpoint-4"
    )
    assert not (folder / checkpoint.INCOMING).exists()


def test_a_checkpoint_that_is_a_link_is_refused_by_name_before_the_model_loads(run_args, tmp_path, monkeypatch):
    """Its files come from elsewhere: this run's run.json says nothing about them."""
    first = [*run_args, "output.name=run", "train.max_steps=4", "output.keep_checkpoints=true"]
    sft.main(load_config(None, first))
    folder = checkpoint.root(load_config(None, first))
    (tmp_path / "elsewhere").mkdir()
    (folder / "checkpoint-4").rename(tmp_path / "elsewhere" / "checkpoint-4")
    (folder / "checkpoint-4").symlink_to(tmp_path / "elsewhere" / "checkpoint-4")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sft.models, "load_base", no_model)
    link = re.escape(f"{folder / 'checkpoint-4'} is a link to {tmp_path / 'elsewhere' / 'checkpoint-4'}: a run resumes")
    for resume in ("resume=auto", "resume=checkpoint-4"):
        with pytest.raises(ConfigError, match=link):
            sft.main(load_config(None, [*first, "output.overwrite=true", resume]))


def test_a_checkpoint_folder_that_is_a_link_to_another_disk_is_followed(run_args, tmp_path):
    first = [*run_args, "output.name=run", "train.max_steps=4", "output.keep_checkpoints=true"]
    (disk := tmp_path / "big-disk" / "run.checkpoints").mkdir(parents=True)
    (tmp_path / "adapters").mkdir()
    (link := tmp_path / "adapters" / "run.checkpoints").symlink_to(disk)
    sft.main(load_config(None, first))
    assert sorted(p.name for p in disk.iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "finished",
        "progress.jsonl",
        "run.json",
    ]
    again = [*first, "output.overwrite=true", "resume=auto", "output.keep_checkpoints=false"]
    assert read_meta(sft.main(load_config(None, again)))["training"]["resumed_from_step"] == 4
    assert link.is_symlink() and list(disk.iterdir()) == []  # the run's checkpoints went; the user's link stays


def test_resume_compares_data_by_content_not_by_how_its_path_is_written(run_args, tmp_path, monkeypatch):
    first = [*run_args, "output.name=run", "train.max_steps=4", "output.keep_checkpoints=true"]
    out = sft.main(load_config(None, first))
    monkeypatch.chdir(tmp_path)  # the same file, now given relative to the working directory
    again = [*first, "data.train=train.jsonl", "output.overwrite=true", "resume=auto"]
    assert read_meta(sft.main(load_config(None, again)))["training"]["resumed_from_step"] == 4
    assert out.is_dir()
    # Kept checkpoints of a finished run do not block a fresh run.
    sft.main(load_config(None, [*first, "output.overwrite=true"]))


def test_resume_may_change_what_is_reported_but_not_what_is_trained(run_args):
    first = [*run_args, "output.name=run", "train.max_steps=4", "output.keep_checkpoints=true"]
    sft.main(load_config(None, [*first, "train.report_to=none"]))
    again = [*first, "output.overwrite=true", "resume=auto", "train.report_to=tensorboard"]
    again += ["train.eval_max_examples=3", "train.vram=80GB"]
    assert read_meta(sft.main(load_config(None, again)))["training"]["resumed_from_step"] == 4


def test_resume_with_a_different_config_or_data_is_refused(run_args, tmp_path):
    first = [*run_args, "output.name=run", "train.max_steps=4", "output.keep_checkpoints=true"]
    sft.main(load_config(None, first))
    again = [*first, "output.overwrite=true", "resume=auto"]
    with pytest.raises(ConfigError, match=r"different run; train.lr: 0.01 then, 0.02 now"):
        sft.main(load_config(None, [*again, "train.lr=0.02"]))
    data = next(a for a in run_args if a.startswith("data.train=")).split("=", 1)[1]
    Path(data).write_text(Path(data).read_text() + json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ConfigError, match="training data file differs"):
        sft.main(load_config(None, again))
    with pytest.raises(ConfigError, match="give auto, or one of this run's checkpoints .*checkpoint-2, checkpoint-4"):
        sft.main(load_config(None, [*first, "output.overwrite=true", f"resume={tmp_path}"]))  # from elsewhere
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        sft.main(load_config(None, [*first, "output.overwrite=true", "resume=checkpoint-3"]))
    with pytest.raises(ConfigError, match="different run"):  # by name, the checkpoint is found and checked
        sft.main(load_config(None, [*first, "output.overwrite=true", "resume=checkpoint-2"]))


def test_a_checkpoint_from_before_a_config_key_resumes_only_as_it_was_trained(run_args):
    """A qtune that lacked train.pad_to_multiple_of padded to the longest example only: its checkpoints
    resume with train.pad_to_multiple_of=0, and the new default 8 is refused by name."""
    first = [*run_args, "output.name=run", "train.max_steps=4", "train.pad_to_multiple_of=0"]
    first += ["output.keep_checkpoints=true"]
    sft.main(load_config(None, first))
    cfg = load_config(None, first)
    run_file = checkpoint.root(cfg) / checkpoint.RUN_FILE
    recorded = json.loads(run_file.read_text())
    del recorded["config"]["train.pad_to_multiple_of"]  # as an older qtune wrote it
    run_file.write_text(json.dumps(recorded))
    again = [a for a in first if a != "train.pad_to_multiple_of=0"] + ["output.overwrite=true", "resume=auto"]
    with pytest.raises(ConfigError, match=r"train.pad_to_multiple_of: 0 then, 8 now"):
        sft.main(load_config(None, again))
    resumed = sft.main(load_config(None, [*again, "train.pad_to_multiple_of=0"]))
    assert read_meta(resumed)["training"]["resumed_from_step"] == 4


def poison(monkeypatch, marker: int) -> None:
    """Make the model's embeddings NaN for any sequence holding token `marker` (a hook on our model, not a patch)."""
    attach = lora.attach_lora

    def attach_and_poison(model, cfg, task_type="CAUSAL_LM"):
        model = attach(model, cfg, task_type)

        def hook(module, args, output):
            bad = (args[0] == marker).any(dim=1)
            return torch.where(bad[:, None, None], torch.full_like(output, float("nan")), output)

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(lora, "attach_lora", attach_and_poison)


@pytest.fixture()
def poisoned_rows(run_args, tmp_path, monkeypatch, chatml_tokenizer):
    """Row 7 of the data holds a token no other row has, and that token makes the loss NaN."""
    rows = [dict(r) for r in ROWS[:8]]
    rows[6] = {"messages": [{"role": "user", "content": "~~~"}, {"role": "assistant", "content": "negative"}]}
    data = tmp_path / "poisoned.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (marker,) = set(chatml_tokenizer.encode("~~~")) - set(chatml_tokenizer.encode("negative"))
    poison(monkeypatch, marker)
    return [*run_args, f"data.train={data}", "train.max_steps=6", "train.save_every=1", "output.name=run"]


def test_nonfinite_loss_stops_with_the_last_good_weights_and_the_rows(poisoned_rows, tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss at step (\d+), from training rows \[([\d, ]+)\]") as e:
        sft.main(load_config(None, poisoned_rows))
    found = re.search(r"step (\d+), from training rows \[([\d, ]+)\]", str(e.value))
    step, rows = int(found.group(1)), [int(r) for r in found.group(2).split(",")]
    assert 7 in rows and len(rows) <= 2  # the micro-batch (2 rows) whose loss was NaN
    folder = tmp_path / "adapters" / "run.checkpoints"
    assert not (tmp_path / "adapters" / "run").exists()
    stopped = load_file(str(folder / f"checkpoint-{step}" / lora.ADAPTER_WEIGHTS))
    assert all(torch.isfinite(t).all() for t in stopped.values())
    if step > 1:  # the weights did not move in the bad step: equal to the step before
        before = load_file(str(folder / f"checkpoint-{step - 1}" / lora.ADAPTER_WEIGHTS))
        assert all(torch.equal(stopped[k], before[k]) for k in stopped)


def test_nonfinite_loss_skip_policy_finishes_and_reports_every_skipped_step(poisoned_rows, tmp_path):
    out = sft.main(load_config(None, [*poisoned_rows, "train.on_nonfinite=skip"]))
    meta = read_meta(out)
    skipped = meta["training"]["nonfinite_skipped"]
    assert skipped and all(7 in e["rows"] and len(e["rows"]) <= 2 and e["what"] == "loss" for e in skipped)
    assert len(skipped) == 3  # the poisoned row is in one step of each of the 3 epochs (8 rows, 4 per step)
    weights = load_file(str(out / lora.ADAPTER_WEIGHTS))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(loss == loss for _, loss in meta["training"]["loss_curve"])  # no NaN in the logged curve


def test_resume_after_the_chat_template_file_was_edited_is_refused(run_args, tmp_path):
    from qtune.data import TEMPLATES

    jinja = tmp_path / "mine.jinja"
    jinja.write_text(TEMPLATES["chatml"])
    first = [*run_args, "output.name=run", "train.max_steps=4", "output.keep_checkpoints=true"]
    first += [f"data.chat_template={jinja}"]
    sft.main(load_config(None, first))
    again = [*first, "output.overwrite=true", "resume=auto"]
    jinja.write_text(TEMPLATES["chatml"].replace("<|im_start|>", "<|im_start|> "))  # same path, new text
    with pytest.raises(ConfigError, match=r"the chat template's text differs \(data.chat_template"):
        sft.main(load_config(None, again))
    jinja.write_text(TEMPLATES["chatml"])
    assert read_meta(sft.main(load_config(None, again)))["training"]["resumed_from_step"] == 4
