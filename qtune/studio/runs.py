"""Runs under the studio's output folder: their state and live progress, and start / stop / resume / forget.

A run is found by what it leaves in <dir> (records.py reads it): its checkpoint folder (with the progress file every
`qtune train` writes, qtune/progress.py), its adapter folder, and, for the runs this studio launched, its records in
<dir>/.studio/ (<name>.yaml, <name>.log, <name>.json). Training always runs as a separate `qtune train` process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from qtune import atomic
from qtune.errors import ConfigError
from qtune.progress import is_alive, process_start
from qtune.studio import records
from qtune.studio.common import ApiError, Studio, api, check_name, check_output_name, read_json, spawn, tail
from qtune.studio.configs import FORM_KEYS, check_paths, field_of, load, overrides, resolve_config

ACTIVE = ("starting", "running", "stopping")
MAX_ACTIVE_RUNS = 2  # runs training at once under one studio folder (one GPU: a third would only wait or crash)
STOP_ESCALATION_S = 20.0  # SIGINT, then SIGTERM this long after, then SIGKILL as long again
CLEAN_EXITS = (0, 130)  # finished, or interrupted by SIGINT (the trainer kept its last complete checkpoint)
# One start, stop, resume or forget at a time: the routes run on a thread pool, and two starts must not both pass
# the MAX_ACTIVE_RUNS check.
_CHANGING = threading.RLock()


@dataclass
class Launched:
    """A `qtune train` process this studio started."""

    process: subprocess.Popen
    started: float
    stopping: bool = False


def _reap(studio: Studio) -> None:
    """Record the exit code of every process this studio launched that has exited."""
    for name, launched in list(studio.processes.items()):
        code = launched.process.poll()
        record = records.record(studio, name)
        if code is not None and record is not None and record.get("exit_code") != code:
            records.write_record(studio, name, {**record, "exit_code": code})


def describe(studio: Studio, name: str) -> dict[str, Any] | None:
    """The run called `name` as docs/studio.md shapes it, or None if there is no such run."""
    from qtune.train.checkpoint import FINISHED, complete

    launched, record = studio.processes.get(name), records.record(studio, name)
    folder = records.checkpoints(studio, name)
    progress, meta = records.progress_of(studio, name), records.meta(studio, name)
    interrupted = bool(complete(folder)) and not (folder / FINISHED).is_file()
    # (a terminal run's checkpoint folder before its first step is not listed yet: nothing says who trains it)
    if not (launched or record or meta or progress.begin or interrupted):
        return None
    code = launched.process.poll() if launched else records.whole((record or {}).get("exit_code"))

    # Who trains it: our child; else a process of an earlier studio (its record) or of a terminal (the latest begin),
    # each known by pid and start time (a pid alone may have been reused by another process since).
    pid = ours = None
    if launched and code is None:
        pid = ours = launched.process.pid
    elif record and not launched:
        pid = ours = records.record_pid(record)
    if pid is None and progress.begin and not (progress.ended and meta):
        pid = records.progress_pid(progress)

    stopped = bool((launched and launched.stopping) or name in studio.stopping or (record or {}).get("stopped"))
    if pid is not None and pid == ours and stopped:
        state = "stopping"
    elif pid is not None:
        state = "running" if progress.begin and progress.pid == pid else "starting"
    elif interrupted:
        state = "interrupted"
    elif meta:
        state = "finished"
    else:
        state = "failed"

    error = _error(studio, name, state, code, stopped)
    training = (meta or {}).get("training")
    training = training if isinstance(training, dict) else {}
    from_meta = state == "finished" or not progress.begin
    elapsed, eta = _timing(state, progress, launched, record, training if from_meta else None)
    updated = records.number(progress.updated)
    return {
        "name": name,
        "state": state,
        "resumable": state == "interrupted"
        and (records.config_file(studio, name).is_file() or records.begin_config(studio, name, progress) is not None),
        "step": records.whole(training.get("steps") if from_meta else progress.step),
        "max_steps": records.whole(training.get("steps") if from_meta else progress.max_steps),
        "eta_s": eta,
        "elapsed_s": elapsed,
        "loss": records.points(training.get("loss_curve") if from_meta else progress.loss),
        "eval_loss": records.points(training.get("eval_loss_curve") if from_meta else progress.eval_loss),
        "studio": launched is not None or record is not None,
        "exit_code": code,
        "error": error,
        "adapter": meta is not None,
        "_time": max(
            records.number((record or {}).get("started")) or 0,
            updated or 0,
            launched.started if launched else 0,
            _mtime(studio.dir / name / "qtune.json"),
        ),
        "_progress": progress,
    }


def _error(studio: Studio, name: str, state: str, code: int | None, stopped: bool) -> str | None:
    """Why a run ended badly, for the page: before its first checkpoint (failed), or a crash after one."""
    if state == "failed":
        if stopped:
            return "stopped before its first checkpoint"
        if code not in (None, 0):
            return records.log_error(studio, name) or f"exited with code {code}"
        return "ended before its first checkpoint"
    if state not in ACTIVE and code not in (None, *CLEAN_EXITS) and not stopped:
        # a crash after a checkpoint: interrupted (resumable), but the page says why
        return records.log_error(studio, name) or f"exited with code {code}"
    return None


def _timing(state: str, progress, launched, record, training: dict | None) -> tuple[float | None, float | None]:
    """(seconds elapsed, seconds left) of a run: while active, since it was launched or began; when finished, the
    training time its qtune.json records (`training`); otherwise the span of its progress file."""
    now = time.time()
    began, updated = records.number(progress.started), records.number(progress.updated)
    if state in ACTIVE:
        since = launched.started if launched else began or records.number((record or {}).get("started"))
        elapsed = now - since if since else None
    elif training is not None:
        elapsed = records.number(training.get("seconds"))
    else:
        elapsed = updated - began if updated is not None and began is not None else None
    eta = None
    if state == "running" and began is not None and updated is not None:
        try:
            eta = records.number(progress.eta_seconds(now))
        except (TypeError, ValueError):  # a max_steps of the wrong type
            eta = None
    return elapsed, eta


def _mtime(path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def list_runs(studio: Studio) -> list[dict[str, Any]]:
    """Every run, newest first."""
    _reap(studio)
    runs = [r for r in (describe(studio, n) for n in records.names(studio)) if r is not None]
    return [_public(r) for r in sorted(runs, key=lambda r: (-r["_time"], r["name"]))]


def details(studio: Studio, name: str) -> dict[str, Any]:
    """One run with its log tail and config (GET /api/runs/{name})."""
    _reap(studio)
    run = describe(studio, name)
    if run is None:
        raise ApiError(404, f"no run named {name} in {studio.relative(studio.dir)}")
    config = records.config_of(studio, name, run["_progress"])
    return {**_public(run), "log_tail": tail(records.log_file(studio, name)), "config": config}


def active(studio: Studio, name: str) -> bool:
    """Is a run training into <dir>/<name> (starting, running or stopping)? The adapters check it before a delete."""
    _reap(studio)
    run = describe(studio, name)
    return run is not None and run["state"] in ACTIVE


def forget(studio: Studio, name: str) -> None:
    """Remove the studio's records of a run (<dir>/.studio/<name>.json/.yaml/.log) and its checkpoint folder, so the
    run is listed no more (once its adapter is deleted too); a 409 while it trains. The adapters call it on delete."""
    check_name(name, "run name")
    with _CHANGING:
        _reap(studio)
        run = describe(studio, name)
        if run is not None and run["state"] in ACTIVE:
            raise ApiError(409, f"run {name} is {run['state']}: stop it first")
        studio.processes.pop(name, None)
        studio.stopping.pop(name, None)
        records.remove(studio, name)


# ---------------------------------------------------------------- start, stop, resume


def _write_config(studio: Studio, name: str, tree: dict[str, Any]):
    import yaml

    path = records.config_file(studio, name)
    studio.state_dir.mkdir(parents=True, exist_ok=True)
    header = f"# qtune studio: the resolved config of run {name} (qtune train {studio.relative(path)})\n"
    atomic.write_text(path, header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return path


def _check_room(studio: Studio, name: str) -> None:
    """A 409 naming the active runs when MAX_ACTIVE_RUNS train already (terminal ones count: same GPU)."""
    busy = [r["name"] for r in list_runs(studio) if r["state"] in ACTIVE and r["name"] != name]
    if len(busy) >= MAX_ACTIVE_RUNS:
        raise ApiError(
            409,
            f"{len(busy)} runs are training ({', '.join(sorted(busy))}): at most {MAX_ACTIVE_RUNS} at once; "
            "wait for one to end, or stop one",
        )


def _launch(studio: Studio, name: str, argv: list[str], fresh: bool) -> None:
    log = records.log_file(studio, name)
    if fresh:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")
    process = spawn(studio, argv, log)
    studio.processes[name] = Launched(process, time.time())
    studio.stopping.pop(name, None)
    record = {"command": argv, "pid": process.pid, "pid_start": process_start(process.pid)}
    records.write_record(studio, name, {**record, "started": time.time(), "exit_code": None})


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
    name = check_output_name(cfg.output.name)
    check_paths(studio, cfg)
    with _CHANGING:
        _reap(studio)
        if os.path.lexists(studio.dir / name):
            where = studio.relative(studio.dir / name)
            raise ApiError(409, f"output.name: {where} exists; pick another name", "output.name")
        run = describe(studio, name)
        if run is not None and run["state"] in ACTIVE:
            raise ApiError(409, f"output.name: run {name} is {run['state']}; pick another name", "output.name")
        if run is not None and run["state"] == "interrupted":
            why = f"output.name: run {name} was interrupted; resume it, or pick another name"
            raise ApiError(409, why, "output.name")
        _check_room(studio, name)
        # (a failed run's name is free again: its records are replaced)
        config = _write_config(studio, name, {k: v for k, v in to_dict(cfg).items() if k != "resume"})
        _launch(studio, name, ["train", studio.relative(config)], fresh=True)
        return _public(describe(studio, name))


def _gone(pid: int, started: int | None, timeout: float, process: subprocess.Popen | None) -> bool:
    """Wait up to `timeout` seconds for the process to end; has it?"""
    if process is not None:
        try:
            process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while is_alive(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _escalate(studio: Studio, name: str, pid: int, started: int | None, process: subprocess.Popen | None) -> None:
    """After SIGINT: SIGTERM if the run is still there STOP_ESCALATION_S later, SIGKILL as long after that."""
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if _gone(pid, started, STOP_ESCALATION_S, process):
                break
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
        _gone(pid, started, 2 * STOP_ESCALATION_S, process)
    finally:
        if process is None:
            studio.stopping.pop(name, None)
        _reap(studio)


def _signal_stop(studio: Studio, name: str, pid: int, started: int | None, process) -> None:
    record = records.record(studio, name)
    if record is not None:
        records.write_record(studio, name, {**record, "stopped": True})
    try:
        os.killpg(pid, signal.SIGINT)  # the training process leads its group (spawn starts a new session)
    except ProcessLookupError:
        pass
    threading.Thread(
        target=_escalate, args=(studio, name, pid, started, process), name=f"qtune-studio-stop-{name}", daemon=True
    ).start()


def stop(studio: Studio, name: str) -> dict[str, Any]:
    """Interrupt a run this studio folder's studio launched (this one, or an earlier one whose record names the very
    process): the trainer keeps its last complete checkpoint."""
    with _CHANGING:
        _reap(studio)
        run = describe(studio, name)
        if run is None:
            raise ApiError(404, f"no run named {name} in {studio.relative(studio.dir)}")
        launched = studio.processes.get(name)
        if launched is not None and launched.process.poll() is None:
            if not launched.stopping:
                launched.stopping = True
                _signal_stop(studio, name, launched.process.pid, None, launched.process)
            return _public(describe(studio, name))
        record = records.record(studio, name) if launched is None else None
        pid = records.record_pid(record, sure=True)
        if pid is not None:  # launched by an earlier studio over this folder (the studio was restarted)
            if name not in studio.stopping:
                studio.stopping[name] = pid
                _signal_stop(studio, name, pid, records.whole(record.get("pid_start")), None)
            return _public(describe(studio, name))
        how = " (stop it where it was started: Ctrl-C in its terminal)" if run["state"] in ACTIVE else ""
        why = "was not started by this studio" if run["state"] in ACTIVE else f"is not running (it is {run['state']})"
        raise ApiError(409, f"run {name} {why}{how}")


def resume(studio: Studio, name: str) -> dict[str, Any]:
    """Continue an interrupted run from its newest complete checkpoint: `qtune train <config> resume=auto`."""
    from qtune.config import from_dict

    with _CHANGING:
        _reap(studio)
        run = describe(studio, name)
        if run is None:
            raise ApiError(404, f"no run named {name} in {studio.relative(studio.dir)}")
        if run["state"] != "interrupted":
            raise ApiError(409, f"run {name} is {run['state']}: only an interrupted run resumes")
        _check_room(studio, name)
        config = records.config_file(studio, name)
        if not config.is_file():
            tree = records.begin_config(studio, name, run["_progress"])
            if tree is None:
                raise ApiError(
                    409,
                    f"run {name}: its config is unknown here (it was not started in {studio.project} into "
                    f"{studio.relative(studio.dir)}); resume it where it was started, with resume=auto",
                )
            check_paths(studio, from_dict(tree))  # started from a terminal: its paths were never checked here
            config = _write_config(studio, name, tree)
        _launch(studio, name, ["train", studio.relative(config), "resume=auto"], fresh=False)
        return _public(describe(studio, name))


def routes(studio: Studio) -> list:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    # File reads, YAML and config parsing, process starts: on the thread pool, never on the event loop.
    def named(request) -> str:
        return check_name(request.path_params["name"], "run name")

    async def index(request):
        return JSONResponse({"runs": await run_in_threadpool(list_runs, studio)})

    async def one(request):
        return JSONResponse(await run_in_threadpool(details, studio, named(request)))

    async def create(request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(start, studio, body), status_code=201)

    async def stop_run(request):
        return JSONResponse(await run_in_threadpool(stop, studio, named(request)), status_code=202)

    async def resume_run(request):
        return JSONResponse(await run_in_threadpool(resume, studio, named(request)), status_code=202)

    return [
        Route("/api/runs", api(index), methods=["GET"]),
        Route("/api/runs", api(create), methods=["POST"]),
        Route("/api/runs/{name}", api(one), methods=["GET"]),
        Route("/api/runs/{name}/stop", api(stop_run), methods=["POST"]),
        Route("/api/runs/{name}/resume", api(resume_run), methods=["POST"]),
    ]
