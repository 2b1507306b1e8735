"""Finished adapters for the studio: the list and details (from qtune.json), delete, export jobs (`qtune export`
as a child process) and a push preview (`qtune push --dry-run` into a temporary folder).

An adapter is a folder directly under the output folder holding qtune.json or adapter_config.json (a plain PEFT
one). What cannot be read is listed in `skipped` with its reason, never failing the list."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtune.errors import USER_ERRORS, AdapterError
from qtune.meta import ADAPTER_CONFIG, CLASSIFIER, META_FILE, AdapterMeta, read_adapter_config
from qtune.studio.common import ApiError, Studio, api, check_name, error_line, read_json, spawn, tail

EXPORTS = "exports"  # <dir>/exports/<name>-<format>: what the export jobs write
HIDDEN_SUFFIXES = (".checkpoints", ".runs", ".hub")  # a run's checkpoints, TensorBoard logs, a push dry run
FORMATS = ("peft", "gguf", "gguf-lora")
GGUF_TYPES = ("f16", "q8_0")


def kind_of(kind: str) -> str:
    """qtune.json's kind as the page names it."""
    return "classifier" if kind == CLASSIFIER else "causal_lm"


def adapter_folders(studio: Studio) -> list[Path]:
    """Every folder directly under the output folder that holds an adapter (qtune.json or adapter_config.json)."""
    if not studio.dir.is_dir():
        return []
    found = []
    for path in sorted(studio.dir.iterdir()):
        name = path.name
        if name.startswith(".") or name == EXPORTS or name.endswith(HIDDEN_SUFFIXES) or not path.is_dir():
            continue
        if (path / META_FILE).is_file() or (path / ADAPTER_CONFIG).is_file():
            found.append(path)
    return found


def _method(lora: dict[str, Any], quant: str | None, dtype: str | None) -> str:
    name = "DoRA" if lora.get("dora") or lora.get("use_dora") else "LoRA"
    r = lora.get("r")
    rslora = " (rsLoRA)" if lora.get("rslora") or lora.get("use_rslora") else ""
    storage = quant if quant and quant != "none" else dtype
    return f"{name} r={r}{rslora}" + (f", {storage}" if storage else "")


def _data_name(report: dict[str, Any] | None, config_train: Any) -> str | None:
    """The training data's file name(s), without the folders (a hub dataset id as it is)."""
    from qtune.data.read import is_hub_dataset

    spec = (report or {}).get("file") or (config_train if isinstance(config_train, str) else None)
    if not spec:
        return None
    return " + ".join(p if is_hub_dataset(p) else Path(p).name for p in str(spec).split(" + "))


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (a classifier's per-class table and confusion matrix are shown apart)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the list entry, qtune.json as written or None for a plain PEFT folder); a qtune error when unreadable."""
    created = max(p.stat().st_mtime for p in (path / META_FILE, path / ADAPTER_CONFIG) if p.is_file())
    if not (path / META_FILE).is_file():
        peft = read_adapter_config(path)
        entry = {
            "name": path.name,
            "kind": "causal_lm",
            "base": peft.get("base_model_name_or_path"),
            "method": _method(peft, None, None),
            "data": None,
            "examples": None,
            "steps": None,
            "metrics": {},
            "created": created,
        }
        return entry, None
    meta = AdapterMeta.read(path)  # checks the PEFT files are there and qtune.json parses
    raw, cfg = meta.raw, meta.config
    train_report = (raw.get("data") or {}).get("train") or {}
    entry = {
        "name": path.name,
        "kind": kind_of(meta.kind),
        "base": meta.base.get("name") or cfg.model.name,
        "method": _method(vars(cfg.lora), cfg.quant.method, cfg.model.dtype),
        "data": _data_name(train_report, cfg.data.train),
        "examples": train_report.get("examples"),
        "steps": (raw.get("training") or {}).get("steps"),
        "metrics": _numbers(meta.metrics),
        "created": created,
    }
    return entry, raw


def list_adapters(studio: Studio) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(entries newest first, skipped folders with their reasons)."""
    entries, skipped = [], []
    for path in adapter_folders(studio):
        try:
            entries.append(read_adapter(path)[0])
        except (*USER_ERRORS, OSError, ValueError, TypeError) as e:
            skipped.append({"name": path.name, "reason": str(e) if isinstance(e, USER_ERRORS) else repr(e)})
    entries.sort(key=lambda e: e["created"], reverse=True)
    return entries, skipped


def adapter_dir(studio: Studio, name: Any) -> Path:
    """The folder of the adapter `name`, or a 404 (or 400 for a name that is no plain name)."""
    name = check_name(name, "adapter name")
    path = studio.dir / name
    if path not in adapter_folders(studio):
        raise ApiError(404, f"no adapter named {name!r} in {studio.relative(studio.dir)}")
    return path


def _points(curve: Any) -> list[list[float]]:
    return [[p[0], p[1]] for p in curve or [] if isinstance(p, (list, tuple)) and len(p) == 2]


def _confusion(metrics: dict[str, Any]) -> dict[str, Any] | None:
    matrix, labels = metrics.get("confusion"), metrics.get("labels")
    if isinstance(matrix, list) and isinstance(labels, list):
        return {"labels": labels, "matrix": matrix}
    return None


def _sample(s: dict[str, Any]) -> dict[str, Any]:
    """A held-out sample as the page shows it. qtune's evaluation stores {row, prompt (as the model saw it: an
    adapter trained before qtune recorded it has none), answer (the reference), output (the model's), correct}."""
    if "output" in s:
        reference, answer = s.get("answer"), s.get("output")
    else:
        reference, answer = s.get("reference"), s.get("answer")
    return {
        "prompt": s.get("prompt"),
        "reference": reference,
        "answer": answer,
        "row": s.get("row"),
        "correct": s.get("correct"),
    }


def adapter_details(studio: Studio, path: Path) -> dict[str, Any]:
    """The list entry plus curves, confusion matrix, samples, the recorded config and the folder's files."""
    entry, raw = read_adapter(path)
    raw = raw or {}
    training = raw.get("training") or {}
    files = [{"name": p.name, "size": p.stat().st_size} for p in sorted(path.iterdir()) if p.is_file()]
    return {
        **entry,
        "loss": _points(training.get("loss_curve")),
        "eval_loss": _points(training.get("eval_loss_curve")),
        "confusion": _confusion(raw.get("metrics") or {}),
        "samples": [_sample(s) for s in raw.get("samples") or [] if isinstance(s, dict)],
        "config": raw.get("config") or {},
        "files": files,
    }


def delete_adapter(studio: Studio, name: str) -> None:
    """Remove the adapter folder `name` (a real folder under the output folder; never a link's target)."""
    path = studio.dir / check_name(name, "adapter name")
    if path.is_symlink():
        raise ApiError(
            400, f"{studio.relative(path)} is a link: the studio deletes only real folders; remove it yourself"
        )
    path = adapter_dir(studio, name)
    resolved, root = path.resolve(), studio.dir.resolve()
    if not resolved.is_relative_to(root) or resolved.parent != root or not resolved.is_dir():
        raise ApiError(400, f"{studio.relative(path)} is not a folder directly under {studio.relative(studio.dir)}")
    # Moved aside first, then removed: an interrupted delete never leaves half an adapter under its name.
    studio.state_dir.mkdir(parents=True, exist_ok=True)
    trash = studio.state_dir / f"deleting-{name}-{secrets.token_hex(4)}"
    resolved.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- export jobs


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


def export_path(studio: Studio, name: str, fmt: str) -> Path:
    """Where an export goes: a folder for peft and gguf, a .gguf file for gguf-lora (as `qtune export` wants OUT)."""
    return studio.dir / EXPORTS / (f"{name}-{fmt}" + (".gguf" if fmt == "gguf-lora" else ""))


def start_export(studio: Studio, name: str, body: dict[str, Any]) -> Job:
    """Check the request, then start `qtune export` into <dir>/exports/ (a 400 names the field; a 409: the output
    exists)."""
    path = adapter_dir(studio, name)
    fmt, qtype = body.get("format"), body.get("type", "f16")
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", "format")
    if qtype not in GGUF_TYPES:
        raise ApiError(400, f"type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}", "type")
    out = export_path(studio, name, fmt)
    if out.exists() or out.is_symlink():
        raise ApiError(409, f"{studio.relative(out)} exists: delete it first to export again", "format")
    if any(j.out == out and j.state() == "running" for j in studio.jobs.values()):
        raise ApiError(409, f"an export into {studio.relative(out)} is already running", "format")
    out.parent.mkdir(parents=True, exist_ok=True)
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
    """What `qtune push --dry-run` stages (card and files), staged in a temporary folder that is removed after."""
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
    """The adapter routes of docs/studio.md."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Route

    async def index(request):
        entries, skipped = await run_in_threadpool(list_adapters, studio)
        return JSONResponse({"adapters": entries, "skipped": skipped})

    async def detail(request):
        path = adapter_dir(studio, request.path_params["name"])
        return JSONResponse(await run_in_threadpool(adapter_details, studio, path))

    async def loss_png(request):
        path = adapter_dir(studio, request.path_params["name"]) / "loss.png"
        if not path.is_file() or not path.resolve().is_relative_to(studio.project):
            raise ApiError(404, f"{studio.relative(path)}: no loss curve")
        return FileResponse(path, media_type="image/png")

    async def delete(request):
        name = request.path_params["name"]
        path = adapter_dir(studio, name)
        from qtune.studio.runs import active  # lazily: runs.py imports this module's neighbours

        if active(studio, name):
            raise ApiError(409, f"a run is training into {studio.relative(path)}: stop it before deleting")
        playground = studio.playground
        if playground is not None:
            try:
                await playground.forget(name)
            except AdapterError as e:  # a running generation uses it
                raise ApiError(409, str(e)) from None
        await run_in_threadpool(delete_adapter, studio, name)
        return JSONResponse({"deleted": True})

    async def export(request):
        body = await read_json(request)
        job = start_export(studio, request.path_params["name"], body)
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
        return JSONResponse(await run_in_threadpool(push_preview, studio, path, repo_id, license))

    return [
        Route("/api/adapters", api(index), methods=["GET"]),
        Route("/api/adapters/{name}", api(detail), methods=["GET"]),
        Route("/api/adapters/{name}", api(delete), methods=["DELETE"]),
        Route("/api/adapters/{name}/loss.png", api(loss_png), methods=["GET"]),
        Route("/api/adapters/{name}/export", api(export), methods=["POST"]),
        Route("/api/adapters/{name}/push-preview", api(preview), methods=["POST"]),
        Route("/api/jobs/{id}", api(job), methods=["GET"]),
    ]
