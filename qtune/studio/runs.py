"""Runs under the studio's output folder: their state and live progress, and start / stop / resume.

A run is found by what it leaves in <dir>: its checkpoint folder (with the progress file every `qtune train`
writes, qtune/progress.py), its adapter folder, and, for the runs this studio launched, its records in
<dir>/.studio/ (<name>.yaml, <name>.log, <name>.json). Training always runs as a separate `qtune train` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtune import atomic
from qtune.errors import ConfigError
from qtune.progress import PROGRESS_FILE, Progress, read_progress
from qtune.studio.common import NAME, ApiError, Studio, api, check_name, error_line, read_json, spawn, tail
from qtune.studio.configs import FORM_KEYS, check_paths, field_of, load, overrides, resolve_config

ACTIVE = ("starting", "running", "stopping")
STOP_ESCALATION_S = 20.0  # SIGINT, then SIGTERM this long after, then SIGKILL as long again


@dataclass
class Launched:
    """A `qtune train` process this studio started."""

    process: subprocess.Popen
    started: float
    stopping: bool = False


# ---------------------------------------------------------------- what is on disk


def _alive(pid: Any) -> bool:
    """Is `pid` a live process (a zombie, exited but not yet reaped by its parent, is not)?"""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _record_path(studio: Studio, name: str) -> Path:
    return studio.state_dir / f"{name}.json"


def _record(studio: Studio, name: str) -> dict[str, Any] | None:
    """The studio's record of a training run it launched (None for anything else, e.g. an export job's file)."""
    try:
        record = json.loads(_record_path(studio, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    command = record.get("command") if isinstance(record, dict) else None
    return record if isinstance(command, list) and command[:1] == ["train"] else None


def _write_record(studio: Studio, name: str, record: dict[str, Any]) -> None:
    studio.state_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(_record_path(studio, name), json.dumps(record, indent=2) + "\n")


def _meta(studio: Studio, name: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((studio.dir / name / "qtune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _names(studio: Studio) -> set[str]:
    """Every run under the output folder: checkpoint folders, adapter folders, the studio's records, its processes."""
    names = set(studio.processes)
    if studio.dir.is_dir():
        for path in studio.dir.iterdir():
            if path.name.endswith(".checkpoints") and path.is_dir():
                names.add(path.name.removesuffix(".checkpoints"))
            elif (path / "qtune.json").is_file():
                names.add(path.name)
    if studio.state_dir.is_dir():
        names.update(p.stem for p in studio.state_dir.glob("*.json") if _record(studio, p.stem))
    return {n for n in names if NAME.match(n) and ".." not in n}


def _reap(studio: Studio) -> None:
    """Record the exit code of every process this studio launched that has exited."""
    for name, launched in list(studio.processes.items()):
        code = launched.process.poll()
        record = _record(studio, name)
        if code is not None and record is not None and record.get("exit_code") != code:
            _write_record(studio, name, {**record, "exit_code": code})


def _begin_config(studio: Studio, name: str, progress: Progress) -> dict[str, Any] | None:
    """The config a terminal-started run recorded in its progress file, when a resume from here would train the same
    run: started in this project folder, into this output folder, under this name."""
    from qtune.config import from_dict, to_dict

    begin = progress.begin or {}
    if not isinstance(begin.get("config"), dict) or not isinstance(begin.get("cwd"), str):
        return None
    if Path(begin["cwd"]).resolve() != studio.project:
        return None
    try:
        cfg = from_dict(begin["config"])
    except ConfigError:
        return None
    if (studio.project / cfg.output.dir).resolve() != studio.dir or cfg.output.name != name:
        return None
    return {k: v for k, v in to_dict(cfg).items() if k != "resume"}


def _config_file(studio: Studio, name: str) -> Path:
    return studio.state_dir / f"{name}.yaml"


def describe(studio: Studio, name: str) -> dict[str, Any] | None:
    """The run called `name` as docs/studio.md shapes it, or None if there is no such run."""
    from qtune.train.checkpoint import FINISHED, complete

    launched, record = studio.processes.get(name), _record(studio, name)
    folder = studio.dir / f"{name}.checkpoints"
    progress, meta = read_progress(folder / PROGRESS_FILE), _meta(studio, name)
    interrupted = bool(complete(folder)) and not (folder / FINISHED).is_file()
    # (a terminal run's checkpoint folder before its first step is not listed yet: nothing says who trains it)
    if not (launched or record or meta or progress.begin or interrupted):
        return None
    code = launched.process.poll() if launched else (record or {}).get("exit_code")

    # Who trains it: our child; else a process of an earlier studio (its record) or of a terminal (the latest begin).
    pid = None
    if launched and code is None:
        pid = launched.process.pid
    elif record and record.get("exit_code") is None and _alive(record.get("pid")):
        pid = record["pid"]
    elif progress.begin and not (progress.ended and meta) and _alive(progress.pid):
        pid = progress.pid

    if pid is not None and launched and launched.stopping and code is None:
        state = "stopping"
    elif pid is not None:
        state = "running" if progress.begin and progress.pid == pid else "starting"
    elif interrupted:
        state = "interrupted"
    elif meta:
        state = "finished"
    else:
        state = "failed"

    error = None
    if state == "failed":
        error = error_line(tail(studio.state_dir / f"{name}.log"))
        if error is None:
            error = f"exited with code {code}" if code else "ended before its first checkpoint"
    training = (meta or {}).get("training") or {}
    from_meta = state == "finished" or not progress.begin
    now = time.time()
    if state in ACTIVE:
        since = launched.started if launched else progress.started
        elapsed = now - since if since else None
    elif from_meta:
        elapsed = training.get("seconds")
    else:
        elapsed = progress.updated - progress.started if progress.updated and progress.started else None
    return {
        "name": name,
        "state": state,
        "resumable": state == "interrupted"
        and (_config_file(studio, name).is_file() or _begin_config(studio, name, progress) is not None),
        "step": training.get("steps") if from_meta else progress.step,
        "max_steps": training.get("steps") if from_meta else progress.max_steps,
        "eta_s": progress.eta_seconds(now) if state == "running" else None,
        "elapsed_s": elapsed,
        "loss": [list(p) for p in (training.get("loss_curve", []) if from_meta else progress.loss)],
        "eval_loss": [list(p) for p in (training.get("eval_loss_curve", []) if from_meta else progress.eval_loss)],
        "studio": launched is not None or record is not None,
        "exit_code": code,
        "error": error,
        "adapter": meta is not None,
        "_time": max(
            (record or {}).get("started") or 0,
            progress.updated or 0,
            launched.started if launched else 0,
            _mtime(studio.dir / name / "qtune.json"),
        ),
    }


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def list_runs(studio: Studio) -> list[dict[str, Any]]:
    """Every run, newest first."""
    _reap(studio)
    runs = [r for r in (describe(studio, n) for n in _names(studio)) if r is not None]
    return [_public(r) for r in sorted(runs, key=lambda r: (-r["_time"], r["name"]))]


def active(studio: Studio, name: str) -> bool:
    """Is a run training into <dir>/<name> (starting, running or stopping)? The adapters check it before a delete."""
    _reap(studio)
    run = describe(studio, name)
    return run is not None and run["state"] in ACTIVE


# ---------------------------------------------------------------- start, stop, resume


def _write_config(studio: Studio, name: str, tree: dict[str, Any]) -> Path:
    import yaml

    path = _config_file(studio, name)
    studio.state_dir.mkdir(parents=True, exist_ok=True)
    header = f"# qtune studio: the resolved config of run {name} (qtune train {studio.relative(path)})\n"
    atomic.write_text(path, header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return path


def _launch(studio: Studio, name: str, argv: list[str], fresh: bool) -> None:
    log = studio.state_dir / f"{name}.log"
    if fresh:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")
    process = spawn(studio, argv, log)
    studio.processes[name] = Launched(process, time.time())
    _write_record(studio, name, {"command": argv, "pid": process.pid, "started": time.time(), "exit_code": None})


def start(studio: Studio, body: dict[str, Any]) -> dict[str, Any]:
    """Check a run the form asks for with the config code of `qtune train`, then launch it."""
    from qtune.config import to_dict

    path = resolve_config(studio, body.get("config"))
    given = overrides(body.get("values", {}))
    submitted = [o.partition("=")[0] for o in given]
    try:
        cfg = load(path, [*given, f"output.dir={studio.relative(studio.dir)}"])
    except ConfigError as e:
        raise ApiError(400, str(e), field_of(str(e), submitted) or field_of(str(e), list(FORM_KEYS))) from None
    name = check_name(cfg.output.name, "output.name", "output.name")
    check_paths(studio, cfg)
    _reap(studio)
    if os.path.lexists(studio.dir / name):
        raise ApiError(
            409, f"output.name: {studio.relative(studio.dir / name)} exists; pick another name", "output.name"
        )
    run = describe(studio, name)
    if run is not None and run["state"] in ACTIVE:
        raise ApiError(409, f"output.name: run {name} is {run['state']}; pick another name", "output.name")
    if run is not None and run["state"] == "interrupted":
        raise ApiError(409, f"output.name: run {name} was interrupted; resume it, or pick another name", "output.name")
    # (a failed run's name is free again: its records are replaced)
    config = _write_config(studio, name, {k: v for k, v in to_dict(cfg).items() if k != "resume"})
    _launch(studio, name, ["train", studio.relative(config)], fresh=True)
    return _public(describe(studio, name))


def _escalate(launched: Launched, on_exit) -> None:
    """After SIGINT: SIGTERM if the run is still there STOP_ESCALATION_S later, SIGKILL as long after that."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            launched.process.wait(timeout=STOP_ESCALATION_S)
            break
        except subprocess.TimeoutExpired:
            try:
                os.killpg(launched.process.pid, sig)
            except ProcessLookupError:
                break
    launched.process.wait()
    on_exit()


def stop(studio: Studio, name: str) -> dict[str, Any]:
    """Interrupt a run this studio launched: the trainer keeps its last complete checkpoint."""
    _reap(studio)
    run = describe(studio, name)
    if run is None:
        raise ApiError(404, f"no run named {name} in {studio.relative(studio.dir)}")
    launched = studio.processes.get(name)
    if launched is None or launched.process.poll() is not None:
        how = " (stop it where it was started: Ctrl-C in its terminal)" if run["state"] in ACTIVE else ""
        why = "was not started by this studio" if run["state"] in ACTIVE else f"is not running (it is {run['state']})"
        raise ApiError(409, f"run {name} {why}{how}")
    if not launched.stopping:
        launched.stopping = True
        try:
            os.killpg(launched.process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        threading.Thread(
            target=_escalate, args=(launched, lambda: _reap(studio)), name=f"qtune-studio-stop-{name}", daemon=True
        ).start()
    return _public(describe(studio, name))


def resume(studio: Studio, name: str) -> dict[str, Any]:
    """Continue an interrupted run from its newest complete checkpoint: `qtune train <config> resume=auto`."""
    _reap(studio)
    run = describe(studio, name)
    if run is None:
        raise ApiError(404, f"no run named {name} in {studio.relative(studio.dir)}")
    if run["state"] != "interrupted":
        raise ApiError(409, f"run {name} is {run['state']}: only an interrupted run resumes")
    config = _config_file(studio, name)
    if not config.is_file():
        tree = _begin_config(studio, name, read_progress(studio.dir / f"{name}.checkpoints" / PROGRESS_FILE))
        if tree is None:
            raise ApiError(
                409,
                f"run {name}: its config is unknown here (it was not started in {studio.project} into "
                f"{studio.relative(studio.dir)}); resume it where it was started, with resume=auto",
            )
        config = _write_config(studio, name, tree)
    _launch(studio, name, ["train", studio.relative(config), "resume=auto"], fresh=False)
    return _public(describe(studio, name))


def _config_of(studio: Studio, name: str) -> dict[str, Any] | None:
    """The run's config: the studio's file, else what its progress file or its adapter recorded."""
    import yaml

    try:
        tree = yaml.safe_load(_config_file(studio, name).read_text(encoding="utf-8"))
        if isinstance(tree, dict):
            return tree
    except (OSError, yaml.YAMLError):
        pass
    begin = read_progress(studio.dir / f"{name}.checkpoints" / PROGRESS_FILE).begin or {}
    config = begin.get("config") or (_meta(studio, name) or {}).get("config")
    return config if isinstance(config, dict) else None


def routes(studio: Studio) -> list:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def named(request) -> str:
        return check_name(request.path_params["name"], "run name")

    async def index(request):
        return JSONResponse({"runs": list_runs(studio)})

    async def one(request):
        name = named(request)
        _reap(studio)
        run = describe(studio, name)
        if run is None:
            raise ApiError(404, f"no run named {name} in {studio.relative(studio.dir)}")
        log_tail = tail(studio.state_dir / f"{name}.log")
        return JSONResponse({**_public(run), "log_tail": log_tail, "config": _config_of(studio, name)})

    async def create(request):
        return JSONResponse(start(studio, await read_json(request)), status_code=201)

    async def stop_run(request):
        return JSONResponse(stop(studio, named(request)), status_code=202)

    async def resume_run(request):
        return JSONResponse(resume(studio, named(request)), status_code=202)

    return [
        Route("/api/runs", api(index), methods=["GET"]),
        Route("/api/runs", api(create), methods=["POST"]),
        Route("/api/runs/{name}", api(one), methods=["GET"]),
        Route("/api/runs/{name}/stop", api(stop_run), methods=["POST"]),
        Route("/api/runs/{name}/resume", api(resume_run), methods=["POST"]),
    ]
