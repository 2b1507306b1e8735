"""Every config key with its type, default and help, read from the dataclasses of schema.py: `qtune config`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from qtune.config.schema import RunConfig
from qtune.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """One config key: `train.lr`; a field of a `data.train` list item is `data.train[].weight`."""

    key: str
    type: str
    default: Any
    help: str
    section: str  # "" for the top-level keys (recipe, resume)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return "list of {...}" if _is_section(args[0]) else f"list[{_type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_keys(cls: type = RunConfig, prefix: str = "", section: str = "") -> list[Key]:
    """Every key of `cls` in declaration order; sections (model, train, ...) expand into their keys."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if _is_section(tp):
            keys.extend(config_keys(tp, key + ".", section or key))
            continue
        keys.append(Key(key, _type_name(tp), _default(f), f.metadata.get("help", ""), section))
        # A list of sections (data.train sources): its items' fields, which only YAML can set.
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is list and _is_section(typing.get_args(arg)[0]):
                keys.extend(config_keys(typing.get_args(arg)[0], key + "[].", section))
    return keys


def section_help(cls: type = RunConfig) -> dict[str, str]:
    """Each top-level section's one-line help: {'model': 'Base model.', ...}."""
    hints = typing.get_type_hints(cls)
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if _is_section(hints[f.name])}


def find_keys(query: str | None) -> list[Key]:
    """The keys `query` names: one key (train.lr), a section (train), or all of them (None).

    Raises:
        ConfigError: no key or section is called `query`; the message suggests the nearest ones.
    """
    keys = config_keys()
    query = (query or "").strip()
    if not query:
        return keys
    chosen = [k for k in keys if k.key == query or k.key.startswith(f"{query}[].") or k.section == query.rstrip(".")]
    if chosen:
        return chosen
    names = [k.key for k in keys] + list(section_help())
    close = difflib.get_close_matches(query, names, n=3, cutoff=0.75)
    if not close:  # a typo in the last part only: compare the leaf names
        leaves = {}
        for name in names:
            leaves.setdefault(name.rsplit(".", 1)[-1], name)
        close = [leaves[m] for m in difflib.get_close_matches(query.rsplit(".", 1)[-1], list(leaves), n=3)]
    if close:
        raise ConfigError(f"unknown config key `{query}`; did you mean {' or '.join(f'`{c}`' for c in close)}?")
    raise ConfigError(f"unknown config key `{query}`; `qtune config` lists every key")


def yaml_value(value: Any) -> str:
    """A default as a YAML file or a `key=value` override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value and ":" not in value else json.dumps(value)
    return json.dumps(value)


def format_keys(keys: list[Key], width: int = 100) -> str:
    """`key: type = default` lines, each followed by its help, under a header per section."""
    headers = section_help()
    lines, section = [], None
    for k in keys:
        if len(keys) > 1 and k.section != section:
            section = k.section
            if lines:
                lines.append("")
            lines.append(f"# {section}: {headers[section]}" if section else "# top level")
        lines.append(f"{k.key}: {k.type} = {yaml_value(k.default)}")
        lines += textwrap.wrap(k.help, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)
