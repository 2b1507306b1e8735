"""What the adapter pool knows of an adapter folder: where it lies, what it holds, whether it fits the base.

A folder is a qtune adapter (PEFT files plus qtune.json: causal-LM or sequence-classification) or a plain
PEFT causal-LM adapter. A qtune causal-LM adapter must come from the served base (same fingerprint); a
plain PEFT one must adapt modules the served base has, with the same shapes (`check_fits`, run before
peft touches the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qtune.config import RunConfig
from qtune.errors import AdapterError
from qtune.lora import check_head_saved, check_weights, checked_base
from qtune.meta import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CAUSAL_LM,
    CLASSIFIER,
    META_FILE,
    AdapterMeta,
    read_adapter_config,
)


@dataclass
class AdapterInfo:
    """One registered adapter: its folder, kind and size, and what serving it needs."""

    name: str
    path: Path
    kind: Literal["causal-lm", "sequence-classification"]  # qtune.meta.CAUSAL_LM, CLASSIFIER
    source: Literal["qtune", "peft"]
    bytes: int
    system_prompt: str | None = None
    chat_template: str | None = None  # the template a qtune adapter was trained with (qtune.json)
    id2label: dict[int, str] | None = None
    group: tuple | None = None  # classification: which classifier base it sits on
    config: RunConfig | None = None  # classification: the run config, to load its own base
    base_path: Path | None = None  # classification: its own base folder (checked against its fingerprint)
    loads: int = 0  # how many times its weights were read (reloads after eviction count)


def adapter_folder(spec: str | Path) -> Path:
    """Where an adapter spec (a folder, or a hub id owner/name[@revision]) lies on disk."""
    from qtune.hub import resolve_adapter

    path = resolve_adapter(spec, require_meta=False)
    if not path.is_dir():
        raise AdapterError(f"{spec}: no such adapter folder")
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT adapter folder)")
    return path


def inspect_adapter(name: str, path: Path, base_path: Path, base_fingerprint: Callable[[], str]) -> AdapterInfo:
    """Read what kind of adapter a folder holds, and refuse one made for another base than `base_path`.

    `base_fingerprint()` is asked only for qtune causal-LM adapters: it hashes the base's weights once.
    """
    size = (path / ADAPTER_WEIGHTS).stat().st_size
    check_weights(path)  # a truncated or corrupt weights file, named before anything loads
    if not (path / META_FILE).is_file():  # plain PEFT: the base is checked when peft loads it
        config = read_adapter_config(path)
        if config.get("task_type") not in (None, "CAUSAL_LM"):
            raise AdapterError(
                f"{path}: a plain PEFT adapter for {config['task_type']}; only CAUSAL_LM ones can be served "
                "without a qtune.json (classification adapters need qtune's label map and base)"
            )
        return AdapterInfo(name, path, CAUSAL_LM, "peft", size)
    meta = AdapterMeta.read(path)
    cfg, own_base = checked_base(path, meta, check=meta.is_classifier)
    if meta.is_classifier:
        check_head_saved(path, meta.labels.head_modules)
        id2label = meta.labels.id2label
        group = (str(own_base), cfg.quant.method, cfg.model.dtype, len(id2label))
        return AdapterInfo(
            name, path, CLASSIFIER, "qtune", size, id2label=id2label, group=group, config=cfg, base_path=own_base
        )
    recorded = meta.base_fingerprint
    fingerprint = base_fingerprint()
    if recorded != fingerprint:
        raise AdapterError(
            f"{path} was trained on a base with fingerprint {recorded[:19]}..., but the served base "
            f"{base_path} has {fingerprint[:19]}...: serve it with its own base ({cfg.model.name})"
        )
    return AdapterInfo(
        name, path, CAUSAL_LM, "qtune", size, system_prompt=cfg.data.system_prompt, chat_template=meta.chat_template
    )


def check_fits(model, folder: Path) -> None:
    """Refuse an adapter whose LoRA matrices name modules the model lacks, or have other shapes than its layers."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():
            for part, dim, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
                if part not in key:
                    continue
                path = key.split(part)[0].removeprefix("base_model.model.")
                if path not in modules:
                    raise AdapterError(f"{folder}: the adapter adapts `{path}`, which the served base does not have")
                expected = getattr(modules[path], attr, None)
                got = f.get_slice(key).get_shape()[dim]
                if expected is not None and expected != got:
                    raise AdapterError(
                        f"{folder}: `{path}` has {attr}={expected} in the served base but {got} in the adapter: "
                        "it was made for another base"
                    )
