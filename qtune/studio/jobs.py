"""Export jobs (`qtune export` as a child process, at most MAX_EXPORTS at once) and the push preview
(`qtune push --dry-run` staged in a temporary folder, one at a time) for the studio's adapters."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtune.meta import CLASSIFIER, AdapterMeta
from qtune.studio.common import EXPORTS, ApiError, Studio, api, error_line, read_json, spawn, tail

FORMATS = ("peft", "gguf", "gguf-lora")
GGUF_TYPES = ("f16", "q8_0")
MAX_EXPORTS = 2  # each merges a base in memory: more at once would starve training and the playground


@dataclass
class Job:
    """An export running as a `qtune export` process."""

    id: str
    adapter: str
    format: str
    out: Path
    log: Path
    process: subprocess.Popen

    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        return "done" if code == 0 and self.out.exists() else "failed"


def export_path(studio: Studio, name: str, fmt: str, qtype: str = "f16") -> Path:
    """Where an export goes, as `qtune export` wants OUT: a folder for peft, a folder per tensor type for gguf
    (<name>-gguf-q8_0/ holds <name>-q8_0.gguf and a Modelfile), a .gguf file for gguf-lora."""
    if fmt == "gguf":
        return studio.dir / EXPORTS / f"{name}-gguf-{qtype}"
    return studio.dir / EXPORTS / (f"{name}-{fmt}" + (".gguf" if fmt == "gguf-lora" else ""))


def _kind(path: Path) -> str | None:
    """The kind qtune.json records (None for a plain PEFT folder, or one the adapter list shows as skipped)."""
    try:
        return AdapterMeta.read(path).kind
    except Exception:  # noqa: BLE001 - unreadable here: `qtune export` says why, in its job's log
        return None


def start_export(studio: Studio, path: Path, body: dict[str, Any]) -> Job:
    """Check the request, then start `qtune export` of the adapter folder `path` into <dir>/exports/ (a 400 names
    the field; a 409: the output exists, or MAX_EXPORTS exports are running)."""
    name = path.name
    fmt, qtype = body.get("format"), body.get("type", "f16")
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", "format")
    if qtype not in GGUF_TYPES:
        raise ApiError(400, f"type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}", "type")
    if _kind(path) == CLASSIFIER:  # (qtune export refuses it too, but only once its job has started)
        raise ApiError(
            400,
            f"{name} is a classification adapter: merge and export take causal-LM adapters; serve it with "
            "qtune serve, or share it with qtune push",
            "format",
        )
    running = [j for j in studio.jobs.values() if j.state() == "running"]
    if len(running) >= MAX_EXPORTS:
        names = ", ".join(f"{j.adapter} ({j.format}, job {j.id})" for j in running)
        raise ApiError(409, f"{len(running)} exports are running ({names}): wait for one to end")
    out = export_path(studio, name, fmt, qtype)
    if any(j.out == out for j in running):
        raise ApiError(409, f"an export into {studio.relative(out)} is already running", "format")
    if out.exists() or out.is_symlink():
        raise ApiError(409, f"{studio.relative(out)} exists: delete it first to export again", "format")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ApiError(
            409, f"{studio.relative(out.parent)}: cannot hold exports ({e.strerror}); fix or remove it"
        ) from None
    job_id = secrets.token_hex(6)
    log = studio.state_dir / "jobs" / f"{job_id}.log"
    argv = ["export", str(path), str(out), "--format", fmt] + (["--type", qtype] if fmt == "gguf" else [])
    job = Job(job_id, name, fmt, out, log, spawn(studio, argv, log))
    studio.jobs[job_id] = job
    return job


def job_status(studio: Studio, job: Job) -> dict[str, Any]:
    state, log = job.state(), tail(job.log)
    return {
        "id": job.id,
        "adapter": job.adapter,
        "format": job.format,
        "state": state,
        "log": log,
        "out": studio.relative(job.out) if state == "done" else None,
        "error": (error_line(log) or f"qtune export exited with code {job.process.returncode}")
        if state == "failed"
        else None,
    }


# ---------------------------------------------------------------- push preview


def push_preview(studio: Studio, path: Path, repo_id: str, license: str | None) -> dict[str, Any]:
    """What `qtune push --dry-run` stages (card and files), staged in a temporary folder that is removed after,
    whatever happens (a whole copy of the adapter: never left behind)."""
    from qtune.hub import push
    from qtune.hub.resolve import CARD_FILE

    studio.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="push-preview-", dir=studio.state_dir))
    try:
        result = push(path, repo_id, dry_run=True, out=tmp / path.name, license=license)
        card = (result.folder / CARD_FILE).read_text(encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"card": card, "files": [{"name": n, "size": s} for n, s in result.files], "notes": result.notes}


def check_repo_id(value: Any) -> str:
    """`owner/name`, as `qtune push` takes it, or a 400 naming the field."""
    from qtune.hub import HubError, parse_repo_id

    if not isinstance(value, str) or not value:
        raise ApiError(400, "repo_id: give the hub repo as 'owner/name'", "repo_id")
    try:
        repo, revision = parse_repo_id(value)
    except HubError as e:
        raise ApiError(400, str(e), "repo_id") from None
    if revision:
        raise ApiError(400, f"repo_id: {value!r} names a revision; the preview takes 'owner/name'", "repo_id")
    return repo


# ---------------------------------------------------------------- routes


def routes(studio: Studio) -> list:
    """POST /api/adapters/{name}/export, GET /api/jobs/{id}, POST /api/adapters/{name}/push-preview."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from qtune.studio.adapters import adapter_dir  # (lazily: adapters.py imports this module)

    staging = threading.Lock()  # one preview at a time: each stages a whole copy of an adapter

    async def export(request):
        body = await read_json(request)
        job = start_export(studio, adapter_dir(studio, request.path_params["name"]), body)
        return JSONResponse({"job": job.id}, status_code=202)

    async def job(request):
        job_id = request.path_params["id"]
        found = studio.jobs.get(job_id)
        if found is None:
            raise ApiError(404, f"no export job {job_id!r} (jobs are kept while the studio runs)")
        return JSONResponse(job_status(studio, found))

    async def preview(request):
        body = await read_json(request)
        path = adapter_dir(studio, request.path_params["name"])
        repo_id = check_repo_id(body.get("repo_id"))
        license = body.get("license")
        if license is not None and (not isinstance(license, str) or not license.strip()):
            raise ApiError(400, "license: give a license id such as 'apache-2.0', or leave it out", "license")
        if not staging.acquire(blocking=False):
            raise ApiError(409, "another push preview is being staged: try again when it is shown")
        try:
            return JSONResponse(await run_in_threadpool(push_preview, studio, path, repo_id, license))
        finally:
            staging.release()

    return [
        Route("/api/adapters/{name}/export", api(export), methods=["POST"]),
        Route("/api/adapters/{name}/push-preview", api(preview), methods=["POST"]),
        Route("/api/jobs/{id}", api(job), methods=["GET"]),
    ]
