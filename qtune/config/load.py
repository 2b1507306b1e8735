"""Read a run configuration: YAML on disk, `a.b=value` overrides on the command line, renamed keys.

Unknown keys are errors that name the nearest valid key, and every validation error names the dotted
key to change. Values are converted to each field's declared type (qtune/config/schema.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from qtune.config.schema import RunConfig
from qtune.errors import ConfigError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config of `cls` accepts, e.g. `train.lr`."""
    keys = []
    for name, tp in _field_types(cls).items():
        key = f"{prefix}{name}"
        if _is_dataclass_type(tp):
            keys.extend(valid_keys(tp, key + "."))
        else:
            keys.append(key)
    return keys


def _unknown(key: str, cls: type, prefix: str) -> ConfigError:
    sections = [f"{prefix}{n}" for n, tp in _field_types(cls).items() if _is_dataclass_type(tp)]
    candidates = sections + valid_keys(cls, prefix)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # a typo in the last part only: compare the leaf names
        leaf = key.rsplit(".", 1)[-1]
        leaves = {c.rsplit(".", 1)[-1]: c for c in candidates}
        match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.5)
        close = [leaves[match[0]]] if match else []
    hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"unknown config key `{key}`{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or explain why not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"`{key}` cannot be {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"`{key}` must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping, e.g. {{prompt: question}}; got {value!r}")
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list; got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):  # an item of a list of sections (data.train sources)
        shorthand = getattr(tp, "SHORTHAND", None)
        if isinstance(value, str) and shorthand:
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping; got {value!r}")
        try:
            return _build(tp, value, key + ".")
        except ConfigError as e:
            raise ConfigError(f"`{key}`: {e}" if not str(e).startswith("`") else str(e)) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"`{key}` must be true or false; got {value!r}")
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        accepted = (int, str) if tp is int else (int, float, str)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"`{key}` must be {what}; got {value!r}")
        try:
            number = tp(value)
        except ValueError:
            raise ConfigError(f"`{key}` must be {what}; got {value!r}") from None
        if not math.isfinite(number):  # nan / inf: every float key, here, before any section checks its range
            raise ConfigError(f"`{key}` must be a finite number; got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"`{key}` must be a string; got {value!r}")
        text = str(value)
        # "\ud800" in JSON (a qtune.json) or a non-UTF-8 byte on a command line: valid Python, but no tokenizer
        # takes it and no file can hold it.
        bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:
            raise ConfigError(f"`{key}` is not UTF-8 text: a lone surrogate {ascii(text[bad])} at position {bad}")
        return text
    raise ConfigError(f"`{key}` has an unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping; got {values!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise _unknown(key, cls, prefix)
        tp = types_[name]
        kwargs[name] = _build(tp, value or {}, key + ".") if _is_dataclass_type(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"`{key}`: `{part}` is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=1e-4", "lora.targets=[q_proj,v_proj]"]` into a nested dict.

    Values stay text (the field's type converts them), except YAML lists and mappings, so a
    prompt such as `data.system_prompt=Answer: yes or no.` is taken as typed.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override `{item}` is not of the form key=value (e.g. train.lr=1e-4)")
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ConfigError(f"override `{item}`: not a valid YAML list or mapping") from None
        _set_dotted(tree, key.strip(), value)
    return tree


# Keys that were renamed: a config file or an adapter's qtune.json written with the old name still loads.
RENAMED = {"train.keep_checkpoints": "train.save_limit"}


def _rename_old_keys(values: dict[str, Any]) -> list[str]:
    """Move values under renamed keys to their new names, in place; returns `old -> new` for each one moved."""
    moved = []
    if not isinstance(values, dict):
        return moved  # _build says what is wrong with it
    for old, new in RENAMED.items():
        (section, old_leaf), new_leaf = old.split("."), new.split(".")[1]
        part = values.get(section)
        if isinstance(part, dict) and old_leaf in part:
            if new_leaf in part:
                raise ConfigError(f"`{old}` is the old name of `{new}`: give only `{new}`")
            part[new_leaf] = part.pop(old_leaf)
            moved.append(f"{old} -> {new}")
    return moved


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply dotted overrides.

    Relative data paths stay relative to the working directory, as a user types them.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder: give the YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        values = {} if values is None else values  # an empty file: the defaults ([] or "" is not a config)
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, data, ...)")
    values = _merge(values, parse_overrides(overrides or []))
    for moved in _rename_old_keys(values):
        print(f"note: config key renamed, {moved}: update {path or 'the override'}")
    try:
        cfg = _build(RunConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    if cfg.output.name is None and path is not None:
        cfg.output.name = path.stem
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what qtune.json records)."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `to_dict` output (e.g. from an adapter's qtune.json, of this or an older qtune)."""
    values = json.loads(json.dumps(values))  # a copy: the caller's data stays as written
    _rename_old_keys(values)
    return _build(RunConfig, values)
