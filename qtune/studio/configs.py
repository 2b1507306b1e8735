"""The configs a run can start from (the shipped ones and the project's), the form keys the page edits, and the checks
on what the form sends: only form keys, every path inside the project."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from qtune.studio.common import ApiError, Studio, api, inside

# The keys the page's form edits (docs/studio.md); a run started from the page may set only these.
FORM_KEYS = (
    "output.name",
    "model.name",
    "model.dtype",
    "quant.method",
    "data.train",
    "data.max_length",
    "lora.r",
    "train.max_steps",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.eval_every",
    "train.save_every",
)
SUFFIXES = (".yaml", ".yml")


def shipped_folder() -> Path:
    """Where the package's configs are: recipes/configs (`qtune ls` lists the same)."""
    from qtune import recipes_folder

    return recipes_folder() / "configs"


def _title(path: Path) -> str:
    """A config's first line when it is a comment (what it is and how to run it), else ''."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            first = next((line.strip() for line in f if line.strip()), "")
    except OSError:
        return ""
    return first.lstrip("#").strip() if first.startswith("#") else ""


def _project_configs(studio: Studio) -> list[Path]:
    found = []
    for folder in (studio.project, studio.project / "configs"):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())
    return found


def list_configs(studio: Studio) -> list[dict[str, str]]:
    """Every config a run can start from: shipped first, then the project's (`*.yaml`/`*.yml` in it and configs/)."""
    entries = []
    for path in sorted(shipped_folder().glob("*.yaml")):
        entries.append({"id": f"shipped:{path.name}", "name": path.name, "source": "shipped", "title": _title(path)})
    for path in _project_configs(studio):
        rel = path.relative_to(studio.project).as_posix()
        entries.append({"id": f"project:{rel}", "name": path.name, "source": "project", "title": _title(path)})
    return entries


def resolve_config(studio: Studio, config_id: Any) -> Path:
    """The file a config id names: a 400 (field `config`) for a path outside the project, a 404 for no such config."""
    if not isinstance(config_id, str) or ":" not in config_id:
        raise ApiError(
            400,
            f"config: give a config id such as 'shipped:NAME.yaml' or 'project:FILE.yaml', got {config_id!r}",
            "config",
        )
    source, _, rest = config_id.partition(":")
    if source == "shipped":
        folder = shipped_folder()
        path = folder / rest
        if "/" in rest or "\\" in rest or path.suffix != ".yaml" or not path.is_file():
            raise ApiError(404, f"config {config_id}: no shipped config of that name (`qtune ls` lists them)", "config")
        return path
    if source == "project":
        path = inside(studio, rest, "config", "config")
        if path not in _project_configs(studio):
            raise ApiError(
                404, f"config {config_id}: not a .yaml/.yml file in the project folder or its configs/ folder", "config"
            )
        return path
    raise ApiError(404, f"config {config_id}: the source must be 'shipped' or 'project', got {source!r}", "config")


def _form_type(tp: Any) -> tuple[str, list | None]:
    """A field's type as the form shows it: str, int, float, bool, or choice (with its choices)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = options[0] if len(options) == 1 else str  # data.train: a path, or a list only YAML can write
    if typing.get_origin(tp) is Literal:
        return "choice", list(typing.get_args(tp))
    if tp in (bool, int, float):
        return tp.__name__, None
    return "str", None


def form_keys() -> list[dict[str, Any]]:
    """The form keys with their help, type, choices and default, read from the config schema."""
    from qtune.config import RunConfig

    out = []
    for key in FORM_KEYS:
        section, name = key.split(".")
        cls = typing.get_type_hints(RunConfig)[section]
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        kind, choices = _form_type(typing.get_type_hints(cls)[name])
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        out.append(
            {"key": key, "help": field.metadata.get("help", ""), "type": kind, "choices": choices, "default": default}
        )
    return out


def form_values(cfg: Any) -> dict[str, Any]:
    """The form keys' values in a resolved RunConfig (a data.train list stays a list of sources)."""
    from qtune.config import to_dict

    tree = to_dict(cfg)
    return {key: tree[key.split(".")[0]][key.split(".")[1]] for key in FORM_KEYS}


def load(path: Path, overrides: list[str] | None = None):
    """load_config on a studio config file (the same validation as `qtune train`)."""
    from qtune.config import load_config

    return load_config(path, overrides)


def field_of(message: str, keys: list[str]) -> str | None:
    """The key a config error names (the longest match, so `train.eval_every` wins over a shorter key)."""
    for key in sorted(keys, key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message):
            return key
    return None


def overrides(values: Any) -> list[str]:
    """The form's values as `key=value` overrides; an empty value keeps the config's."""
    if not isinstance(values, dict):
        raise ApiError(400, f"values: give an object of form keys, got {type(values).__name__}", "values")
    out = []
    for key, value in values.items():
        if key not in FORM_KEYS:
            raise ApiError(400, f"{key!r} is not a form key; the form sets {', '.join(FORM_KEYS)}", str(key))
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif not isinstance(value, (int, float, str)):
            raise ApiError(400, f"`{key}`: give one value, got {type(value).__name__}", key)
        out.append(f"{key}={value}")
    return out


def check_paths(studio: Studio, cfg: Any) -> None:
    """Every file the run would read is inside the project: data, a local base, a chat template file, a recipe."""
    from qtune import BUILTIN_RECIPES
    from qtune.data.templates import BASE, TEMPLATES
    from qtune.models import EMBEDDED_ALIAS, ENCODER_ALIAS, is_hub_id

    for source in cfg.data.sources():
        inside(studio, source.path, "data.train", "data.train")
    if cfg.data.eval:
        inside(studio, cfg.data.eval, "data.eval", "data.eval")
    if cfg.data.chat_template not in (None, "", BASE, *TEMPLATES):  # a file (.jinja, .j2, .txt or any other)
        inside(studio, cfg.data.chat_template, "data.chat_template", "data.chat_template")
    if cfg.recipe not in BUILTIN_RECIPES:
        inside(studio, cfg.recipe, "recipe", "recipe")
    name = cfg.model.name
    if name in (EMBEDDED_ALIAS, ENCODER_ALIAS):
        return
    if is_hub_id(name) and not os.path.lexists(studio.project / name):
        return  # a hub id (qtune train's rule): downloaded by `qtune train`
    if not inside(studio, name, "model.name", "model.name").is_dir():
        raise ApiError(
            400,
            f"model.name: {name!r} is neither {EMBEDDED_ALIAS}, {ENCODER_ALIAS}, a model folder inside the project, "
            "nor a hub id like owner/name",
            "model.name",
        )


def routes(studio: Studio) -> list:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def config(config_id: str) -> dict[str, Any]:
        cfg = load(resolve_config(studio, config_id))
        return {"id": config_id, "values": form_values(cfg), "keys": form_keys()}

    # (reading folders and parsing YAML: on the thread pool, never on the event loop)
    async def index(request):
        return JSONResponse({"configs": await run_in_threadpool(list_configs, studio)})

    async def one(request):
        return JSONResponse(await run_in_threadpool(config, request.path_params["id"]))

    return [
        Route("/api/configs", api(index), methods=["GET"]),
        Route("/api/configs/{id:path}", api(one), methods=["GET"]),
    ]
