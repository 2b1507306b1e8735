"""Resumable checkpoints: written by the trainer, made visible only once complete, found again by `resume=auto`.

One run's checkpoints live beside its adapter, in <output.dir>/<output.name>.checkpoints/:
    run.json           what the run is: its config, base and data fingerprints. A resume with a
                       different config, base or data is refused (it would not continue this run).
    checkpoint-40/     complete checkpoints in transformers' format: adapter_model.safetensors,
                       optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json (step, log, data position)
    .incoming/         the trainer writes here; a checkpoint is fsynced and renamed out of it only
                       when every file is on disk, so a kill mid-write leaves nothing that looks complete.
After the adapter is written the folder is removed (keep it with output.keep_checkpoints=true).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from qtune import atomic
from qtune.config import RunConfig, to_dict
from qtune.errors import ConfigError

RUN_FILE = "run.json"
FINISHED = "finished"  # written beside kept checkpoints once the adapter is written: not an interrupted run
INCOMING = ".incoming"
# What a resumable checkpoint must hold (the optimizer and scheduler files are what make it resumable);
# the optimizer is optimizer.pt, or optimizer.bin when accelerate saves it under FSDP.
REQUIRED = ("adapter_model.safetensors", "trainer_state.json", "scheduler.pt")
OPTIMIZER = ("optimizer.pt", "optimizer.bin")
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Settings that may change between the interrupted run and its resume: they do not change what is
# learned. (train.save_every and train.logging_steps are not among them: the trainer restores both
# from the checkpoint, so a new value would be ignored.) Paths are not compared either: the base and
# the data are compared by their fingerprints, so `data.train=x.jsonl` and its absolute path agree.
_MAY_DIFFER = {
    "resume",
    "model.name",
    "model.revision",
    "data.train",
    "data.num_proc",
    "output.dir",
    "output.name",
    "output.overwrite",
    "output.keep_checkpoints",
    "train.save_limit",
    "train.on_nonfinite",
    "data.eval",
    "eval.batch_size",
    "eval.max_new_tokens",
    "eval.limit",
    "train.eval_every",  # held-out loss while training: never changes the trained weights (tests/test_observe.py)
    "train.eval_max_examples",
    "train.report_to",
    "train.vram",  # a check before loading, not a setting of the run
}


def is_main_process() -> bool:
    """True in a single process, and in rank 0 of a torchrun / accelerate launch: the one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


# What qtune did before a key existed, where that differs from the key's default: a checkpoint written then
# resumes only with that value, so a resumed run trains as the interrupted one did.
_BEFORE_THE_KEY = {"train.pad_to_multiple_of": 0}


def root(cfg: RunConfig) -> Path:
    """The run's checkpoint folder."""
    return Path(cfg.output.dir) / f"{cfg.output.name}.checkpoints"


def step_of(checkpoint: Path) -> int:
    match = _NAME.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def is_complete(checkpoint: Path) -> bool:
    return all((checkpoint / f).is_file() for f in REQUIRED) and any((checkpoint / f).is_file() for f in OPTIMIZER)


def complete(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted((p for p in found if is_complete(p)), key=step_of)


def identity(cfg: RunConfig, base_fingerprint: str, data_fingerprint: str, template: str | None = None) -> dict:
    """What a checkpoint must agree with to be resumed by this run: config, base, data, the chat template's text
    (a .jinja file named by data.chat_template may be edited in place), process count."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # the global batch and data sharding depend on it
    return {
        "config": _flat(to_dict(cfg)),
        "base": base_fingerprint,
        "data": data_fingerprint,
        "template": hashlib.sha256(json.dumps(template or "", sort_keys=True).encode()).hexdigest(),  # (or a dict)
        "processes": processes,
    }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in _MAY_DIFFER:
            out[f"{prefix}{key}"] = value
    return out


def _differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    diffs = []
    if recorded.get("base") != now["base"]:
        diffs.append("the base model's weights differ (fingerprint)")
    if recorded.get("data") != now["data"]:
        diffs.append("the training data file differs (fingerprint)")
    if recorded.get("template", now["template"]) != now["template"]:  # (a checkpoint of an older qtune: not recorded)
        diffs.append("the chat template's text differs (data.chat_template: was its .jinja file edited?)")
    if recorded.get("processes", 1) != now["processes"]:
        diffs.append(f"{recorded.get('processes', 1)} training processes then, {now['processes']} now")
    # A key the recorded run did not have (an older qtune) held its default then, or what that qtune did.
    old, new, defaults = recorded.get("config", {}), now["config"], _flat(to_dict(RunConfig()))
    for key in sorted(set(old) | set(new)):
        then, now_ = old.get(key, _BEFORE_THE_KEY.get(key, defaults.get(key))), new.get(key, defaults.get(key))
        if then != now_:
            diffs.append(f"{key}: {then!r} then, {now_!r} now")
    return diffs


def prepare(cfg: RunConfig, run: dict[str, Any]) -> Path | None:
    """Decide where training starts, before any model is loaded: the checkpoint to resume from, or None.

    Without `resume`, the checkpoints of an interrupted run are never overwritten: the run is refused.
    Only the run's own checkpoints are resumed (their optimizer/scheduler/RNG files are torch files,
    read with torch.load(weights_only=True) by transformers): a folder from elsewhere is refused.
    """
    folder = root(cfg)
    _check_links(folder)
    found = complete(folder)
    if cfg.resume is None:
        if found and (folder / FINISHED).is_file():
            print(f"{folder} holds the kept checkpoints of a finished run: starting a new run replaces them")
        elif found:
            raise ConfigError(
                f"{folder} holds checkpoints of an interrupted run (newest: step {step_of(found[-1])}): "
                "pass resume=auto to continue it, or delete that folder to start over"
            )
        return None
    if cfg.resume == "auto":
        if not found:
            print(f"resume=auto: no complete checkpoint in {folder}; starting from step 0")
            return None
        checkpoint = found[-1]
    else:  # one of this run's own checkpoints, by name or path: nothing from elsewhere is loaded
        checkpoint = folder / Path(cfg.resume).name
        if Path(cfg.resume).parent not in (Path("."), folder) and Path(cfg.resume).resolve().parent != folder.resolve():
            raise ConfigError(
                f"resume={cfg.resume}: give auto, or one of this run's checkpoints in {folder} "
                f"({', '.join(p.name for p in found) or 'none yet'})"
            )
        if not is_complete(checkpoint):
            missing = [f for f in REQUIRED if not (checkpoint / f).is_file()]
            missing += [] if any((checkpoint / f).is_file() for f in OPTIMIZER) else [" or ".join(OPTIMIZER)]
            raise ConfigError(f"resume={cfg.resume}: not a complete checkpoint folder (missing {', '.join(missing)})")
    recorded_file = checkpoint.parent / RUN_FILE
    if not recorded_file.is_file():
        raise ConfigError(f"resume: {recorded_file} is missing; cannot tell which run {checkpoint} belongs to")
    try:
        recorded = json.loads(recorded_file.read_text())
    except ValueError as e:
        raise ConfigError(f"resume: {recorded_file} is not valid JSON ({e})") from None
    diffs = _differences(recorded, run)
    if diffs:
        raise ConfigError(
            f"resume: {checkpoint} belongs to a different run; "
            + "; ".join(diffs)
            + ". Resume with the same config and data, or delete the checkpoints to start over"
        )
    if is_main_process():
        shutil.rmtree(folder / INCOMING, ignore_errors=True)  # a checkpoint the kill interrupted mid-write
    print(f"resuming from {checkpoint} (step {step_of(checkpoint)})")
    return checkpoint


def _check_links(folder: Path) -> None:
    """Refuse, before any model is loaded, a checkpoint folder that cannot be used: the run's folder is a file or a
    link to nothing, or a checkpoint in it is a link. (The run's folder may be a link to another disk: it is followed.)
    A linked checkpoint is refused because its files come from elsewhere, unchecked by this run's run.json."""
    if os.path.lexists(folder) and not folder.is_dir():
        what = f"a link to {os.readlink(folder)}, which is not a folder" if folder.is_symlink() else "a file"
        raise ConfigError(
            f"{folder} is {what}: the run's checkpoints are written there; remove it, or make it a folder"
        )
    links = sorted(p for p in folder.iterdir() if p.is_symlink() and _NAME.match(p.name)) if folder.is_dir() else []
    if links:
        raise ConfigError(
            f"{links[0]} is a link to {os.readlink(links[0])}: a run resumes only from the checkpoints it wrote into "
            f"{folder}; put the checkpoint folder itself there in place of the link, or delete the link"
        )


def _clear(folder: Path) -> None:
    """Remove the run's checkpoint folder; where it is a link (checkpoints kept on another disk), keep the link and
    empty the folder it points to."""
    if not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def start(folder: Path, run: dict[str, Any]) -> None:
    """Right before step 0 of a fresh run: an empty checkpoint folder holding run.json (what `prepare` checks)."""
    if not is_main_process():  # under torchrun, rank 0 alone prepares the folder
        return
    _clear(folder)  # only partial leftovers can be here: complete ones were refused
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / RUN_FILE, json.dumps(run, indent=2, default=str) + "\n")


def promote(written: Path, keep: int) -> Path:
    """Move a checkpoint the trainer finished writing out of .incoming; delete all but the newest `keep`."""
    folder = written.parent.parent
    atomic.fsync_tree(written)
    final = folder / written.name
    atomic.replace_folder(written, final)  # the same step saved twice (a stop and a scheduled save): the newer
    for old in complete(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def finish(cfg: RunConfig) -> None:
    """After the adapter is written: remove the run's checkpoints, or only the scratch folder if kept."""
    folder = root(cfg)
    if cfg.output.keep_checkpoints:
        shutil.rmtree(folder / INCOMING, ignore_errors=True)
        (folder / FINISHED).write_text("the adapter of this run was written; these checkpoints are kept\n")
    else:
        _clear(folder)
