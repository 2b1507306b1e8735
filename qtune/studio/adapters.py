"""Finished adapters for the studio: the list and details (from qtune.json), and delete. Export jobs and the push
preview are in qtune/studio/jobs.py.

An adapter is a folder directly under the output folder holding qtune.json or adapter_config.json (a plain PEFT
one). What cannot be read is listed in `skipped` with its reason, never failing the list. A qtune.json edited by
hand (a section of the wrong type, NaN metrics) still shows: what is malformed shows as empty, NaN as null."""

from __future__ import annotations

import math
import secrets
import shutil
from pathlib import Path
from typing import Any

from qtune.errors import USER_ERRORS, AdapterError
from qtune.meta import ADAPTER_CONFIG, CLASSIFIER, META_FILE, AdapterMeta, read_adapter_config
from qtune.studio import jobs
from qtune.studio.common import RESERVED_NAMES, RESERVED_SUFFIXES, ApiError, Studio, api, check_name, inside

UNREADABLE = (*USER_ERRORS, OSError, ValueError, TypeError, AttributeError)  # an adapter the list skips


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
        if name.startswith(".") or name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES) or not path.is_dir():
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


def _data_name(report: dict[str, Any], config_train: Any) -> str | None:
    """The training data's file name(s) as the published model card shows them: each local path cut to its last
    part, a hub dataset id as it is (qtune.hub.card.public_meta does the cutting). `report` is qtune.json's
    data.train report, `config_train` its recorded config's data.train (a path, or a list of sources)."""
    from qtune.hub.card import public_meta

    if isinstance(config_train, list):  # (a source written as plain text is its path)
        config_train = [{"path": s} if isinstance(s, str) else s for s in config_train]
    cut = public_meta({"data": {"train": {"file": report.get("file")}}, "config": {"data": {"train": config_train}}})
    spec = cut["data"]["train"]["file"] or cut["config"]["data"]["train"]
    if isinstance(spec, list):
        spec = " + ".join(s["path"] for s in spec if isinstance(s, dict) and isinstance(s.get("path"), str))
    return spec if isinstance(spec, str) and spec else None


def _dict(value: Any) -> dict[str, Any]:
    """A qtune.json section that should be an object: anything else (hand-edited) reads as empty."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (a classifier's per-class table and confusion matrix are shown apart)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None: JSON has no such numbers (a diverged run logs NaN
    losses; Python's json reads them from qtune.json, the response must not write them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def read_adapter(path: Path) -> tuple[dict[str, Any], AdapterMeta | None]:
    """(the list entry, the parsed qtune.json or None for a plain PEFT folder); a qtune error when unreadable."""
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
    train_report = _dict(_dict(raw.get("data")).get("train"))
    base = meta.base.get("name")
    entry = {
        "name": path.name,
        "kind": kind_of(meta.kind),
        "base": base if isinstance(base, str) and base else cfg.model.name,
        "method": _method(vars(cfg.lora), cfg.quant.method, cfg.model.dtype),
        "data": _data_name(train_report, _dict(_dict(raw.get("config")).get("data")).get("train")),
        "examples": train_report.get("examples", train_report.get("records")),  # (a classifier reports records)
        "steps": _dict(raw.get("training")).get("steps"),
        "metrics": _numbers(_dict(meta.metrics)),
        "created": created,
    }
    return entry, meta


def read_adapters(studio: Studio) -> tuple[list[tuple[dict[str, Any], AdapterMeta | None]], list[dict[str, str]]]:
    """(each adapter's list entry with its parsed qtune.json (None: a plain PEFT folder), newest first; the folders
    that cannot be read, with their reasons)."""
    read, skipped = [], []
    for path in adapter_folders(studio):
        try:
            read.append(read_adapter(path))
        except UNREADABLE as e:
            skipped.append({"name": path.name, "reason": str(e) if isinstance(e, USER_ERRORS) else repr(e)})
    read.sort(key=lambda r: r[0]["created"], reverse=True)
    return read, skipped


def list_adapters(studio: Studio) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(entries newest first, skipped folders with their reasons)."""
    read, skipped = read_adapters(studio)
    return [entry for entry, _ in read], skipped


def adapter_dir(studio: Studio, name: Any) -> Path:
    """The folder of the adapter `name`, or a 404 (or 400 for a name that is no plain name)."""
    name = check_name(name, "adapter name")
    path = studio.dir / name
    if path not in adapter_folders(studio):
        raise ApiError(404, f"no adapter named {name!r} in {studio.relative(studio.dir)}")
    return path


def within(studio: Studio, path: Path) -> Path | None:
    """`path` resolved, links followed, if it lies inside the project folder (common.inside's rule), else None."""
    try:
        return inside(studio, str(path), str(path))
    except ApiError:
        return None


def _points(curve: Any) -> list[list[float]]:
    return [[p[0], p[1]] for p in _list(curve) if isinstance(p, list) and len(p) == 2]


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
    entry, meta = read_adapter(path)
    raw = meta.raw if meta else {}
    training = _dict(raw.get("training"))
    files = [{"name": p.name, "size": p.stat().st_size} for p in sorted(path.iterdir()) if p.is_file()]
    return {
        **entry,
        "loss": _points(training.get("loss_curve")),
        "eval_loss": _points(training.get("eval_loss_curve")),
        "confusion": _confusion(_dict(raw.get("metrics"))),
        "samples": [_sample(s) for s in _list(raw.get("samples")) if isinstance(s, dict)],
        "config": _dict(raw.get("config")),
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
    resolved = within(studio, path)
    if resolved is None or resolved.parent != studio.dir.resolve() or not resolved.is_dir():
        raise ApiError(400, f"{studio.relative(path)} is not a folder directly under {studio.relative(studio.dir)}")
    # Moved aside first, then removed: an interrupted delete never leaves half an adapter under its name.
    studio.state_dir.mkdir(parents=True, exist_ok=True)
    trash = studio.state_dir / f"deleting-{name}-{secrets.token_hex(4)}"
    resolved.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def forget_run(studio: Studio, name: str) -> None:
    """After its adapter is deleted, the run of that name goes too (else the runs list shows it as failed): the
    studio's records of it and its checkpoint folder."""
    from qtune.studio.runs import forget  # lazily: runs.py imports this module's neighbours

    forget(studio, name)


# ---------------------------------------------------------------- routes


def routes(studio: Studio) -> list:
    """The adapter routes of docs/studio.md."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Route

    async def index(request):
        entries, skipped = await run_in_threadpool(list_adapters, studio)
        return JSONResponse(finite({"adapters": entries, "skipped": skipped}))

    async def detail(request):
        path = adapter_dir(studio, request.path_params["name"])
        return JSONResponse(finite(await run_in_threadpool(adapter_details, studio, path)))

    async def loss_png(request):
        path = adapter_dir(studio, request.path_params["name"]) / "loss.png"
        png = within(studio, path)
        if png is None or not png.is_file():
            raise ApiError(404, f"{studio.relative(path)}: no loss curve")
        return FileResponse(png, media_type="image/png")

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
        await run_in_threadpool(forget_run, studio, name)
        return JSONResponse({"deleted": True})

    return [
        Route("/api/adapters", api(index), methods=["GET"]),
        Route("/api/adapters/{name}", api(detail), methods=["GET"]),
        Route("/api/adapters/{name}", api(delete), methods=["DELETE"]),
        Route("/api/adapters/{name}/loss.png", api(loss_png), methods=["GET"]),
        *jobs.routes(studio),
    ]
