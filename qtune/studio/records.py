"""What a run leaves under the studio's output folder, read for the runs screen: the studio's records of what it
launched (<dir>/.studio/<name>.json, .yaml, .log), the live progress file every `qtune train` writes (read once per
change), the adapter's qtune.json; which process trains a run; and forgetting a run's files.

Everything read here comes from files another process writes (or a person edits): a value of the wrong type is
treated as missing, never as a reason to fail the whole runs list.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path
from typing import Any

from qtune import atomic
from qtune.errors import ConfigError
from qtune.progress import PROGRESS_FILE, Progress, is_alive, read_progress
from qtune.studio.common import NAME, Studio, error_line, tail

_PROGRESS: dict[Path, tuple[tuple[int, int], Progress]] = {}  # path -> ((mtime_ns, size), what it said)
_PROGRESS_LOCK = threading.Lock()


def number(value: Any) -> float | None:
    """A finite number from a file, or None (a string, a bool, NaN and infinity are not: JSON cannot carry them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def whole(value: Any) -> int | None:
    """A whole number from a file (a step count), or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def points(curve: Any) -> list[list]:
    """A loss curve's [step, loss] points whose step and loss are finite numbers (a NaN loss is dropped)."""
    if not isinstance(curve, (list, tuple)):
        return []
    kept = []
    for point in curve:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            step, loss = number(point[0]), number(point[1])
            if step is not None and loss is not None:
                kept.append([step, loss])
    return kept


def checkpoints(studio: Studio, name: str) -> Path:
    return studio.dir / f"{name}.checkpoints"


def progress_of(studio: Studio, name: str) -> Progress:
    """The run's progress file as read_progress reads it, parsed again only when its (mtime, size) changed: the
    page polls every run every second or two, and a long run's file has thousands of lines."""
    path = checkpoints(studio, name) / PROGRESS_FILE
    try:
        stat = path.stat()
    except OSError:
        with _PROGRESS_LOCK:
            _PROGRESS.pop(path, None)
        return Progress()
    key = (stat.st_mtime_ns, stat.st_size)
    with _PROGRESS_LOCK:
        cached = _PROGRESS.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    progress = read_progress(path)
    with _PROGRESS_LOCK:
        _PROGRESS[path] = (key, progress)
    return progress


def record_path(studio: Studio, name: str) -> Path:
    return studio.state_dir / f"{name}.json"


def config_file(studio: Studio, name: str) -> Path:
    return studio.state_dir / f"{name}.yaml"


def log_file(studio: Studio, name: str) -> Path:
    return studio.state_dir / f"{name}.log"


def record(studio: Studio, name: str) -> dict[str, Any] | None:
    """The studio's record of a training run it launched (None for anything else, e.g. an export job's file)."""
    try:
        found = json.loads(record_path(studio, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    command = found.get("command") if isinstance(found, dict) else None
    return found if isinstance(command, list) and command[:1] == ["train"] else None


def write_record(studio: Studio, name: str, data: dict[str, Any]) -> None:
    studio.state_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(record_path(studio, name), json.dumps(data, indent=2) + "\n")


def meta(studio: Studio, name: str) -> dict[str, Any] | None:
    """The adapter's qtune.json, when the run wrote its adapter."""
    try:
        found = json.loads((studio.dir / name / "qtune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def names(studio: Studio) -> set[str]:
    """Every run under the output folder: checkpoint folders, adapter folders, the studio's records, its processes."""
    found = set(studio.processes)
    if studio.dir.is_dir():
        for path in studio.dir.iterdir():
            if path.name.endswith(".checkpoints") and path.is_dir():
                found.add(path.name.removesuffix(".checkpoints"))
            elif (path / "qtune.json").is_file():
                found.add(path.name)
    if studio.state_dir.is_dir():
        found.update(p.stem for p in studio.state_dir.glob("*.json") if record(studio, p.stem))
    return {n for n in found if NAME.fullmatch(n) and ".." not in n}


def record_pid(data: dict[str, Any] | None, *, sure: bool = False) -> int | None:
    """The pid of the process a record names while that very process runs (pid and start time), else None. `sure`:
    only when the record has the start time too (a record without one cannot tell its process from a reused pid)."""
    if not data or data.get("exit_code") is not None:
        return None
    pid, started = whole(data.get("pid")), whole(data.get("pid_start"))
    if sure and started is None:
        return None
    return pid if is_alive(pid, started) else None


def progress_pid(progress: Progress) -> int | None:
    """The pid of the process that wrote the latest begin while that very process runs, else None."""
    if not progress.begin:
        return None
    pid, started = whole(progress.pid), whole(progress.begin.get("pid_start"))
    return pid if is_alive(pid, started) else None


def log_error(studio: Studio, name: str) -> str | None:
    """Why a run the studio launched failed: the `error:` line of its log, else the log's last non-empty line."""
    text = tail(log_file(studio, name))
    found = error_line(text)
    if found:
        return found
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), None)


def begin_config(studio: Studio, name: str, progress: Progress) -> dict[str, Any] | None:
    """The config a terminal-started run recorded in its progress file, when a resume from here would train the same
    run: started in this project folder, into this output folder, under this name."""
    from qtune.config import from_dict, to_dict

    begin = progress.begin or {}
    if not isinstance(begin.get("config"), dict) or not isinstance(begin.get("cwd"), str):
        return None
    try:
        if Path(begin["cwd"]).resolve() != studio.project:
            return None
        cfg = from_dict(begin["config"])
        if (studio.project / cfg.output.dir).resolve() != studio.dir or cfg.output.name != name:
            return None
    except (ConfigError, OSError, RuntimeError, TypeError, ValueError):
        return None
    return {k: v for k, v in to_dict(cfg).items() if k != "resume"}


def config_of(studio: Studio, name: str, progress: Progress) -> dict[str, Any] | None:
    """The run's config: the studio's file, else what its progress file (already read) or its adapter recorded."""
    import yaml

    try:
        tree = yaml.safe_load(config_file(studio, name).read_text(encoding="utf-8"))
        if isinstance(tree, dict):
            return tree
    except (OSError, yaml.YAMLError):
        pass
    config = (progress.begin or {}).get("config") or (meta(studio, name) or {}).get("config")
    return config if isinstance(config, dict) else None


def remove(studio: Studio, name: str) -> None:
    """Delete the studio's records of a run and its checkpoint folder (a link is removed, not followed)."""
    for path in (record_path(studio, name), config_file(studio, name), log_file(studio, name)):
        path.unlink(missing_ok=True)
    folder = checkpoints(studio, name)
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    with _PROGRESS_LOCK:
        _PROGRESS.pop(folder / PROGRESS_FILE, None)
