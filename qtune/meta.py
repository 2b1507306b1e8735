"""qtune.json, the metadata of an adapter folder: written once by a recipe, read once by every verb.

The adapter folder is a contract every verb reads:
  adapter_model.safetensors, adapter_config.json   plain PEFT; `PeftModel.from_pretrained` loads them
  qtune.json                                        kind, base id + fingerprint, resolved config, data,
                                                    training, metrics, hardware, versions (and labels)
  loss.png (confusion.png)                          the training (and held-out) loss curves (a classifier's
                                                    confusion matrix)

`AdapterMeta` is the typed view of qtune.json: the fields the verbs act on are parsed and checked
once (the run config, the base's fingerprint, a classifier's label map); the rest is kept as written
(`raw`), for reports and model cards. This module is light (no torch): the command line and the hub
read it without loading the training stack.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from qtune import DISTRIBUTION
from qtune.config import RunConfig, from_dict, to_dict
from qtune.errors import AdapterError, ConfigError

META_FILE = "qtune.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# What an adapter does (qtune.json `kind`).
CAUSAL_LM = "causal-lm"
CLASSIFIER = "sequence-classification"

LIBRARIES = ("qtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "safetensors", "accelerate")


@dataclass
class Labels:
    """A classifier's label map and the modules trained in full (its new head), as qtune.json records them."""

    id2label: dict[int, str]
    head_modules: list[str] = field(default_factory=list)

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "id2label": {str(k): v for k, v in self.id2label.items()},  # JSON keys are strings
            "label2id": self.label2id,
            "head_modules": list(self.head_modules),
        }

    @classmethod
    def from_json(cls, values: Any, where: str) -> Labels:
        try:
            return cls({int(k): v for k, v in values["id2label"].items()}, list(values["head_modules"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AdapterError(f"{where}: `labels` is not a label map ({type(e).__name__}: {e})") from None


@dataclass
class AdapterMeta:
    """The typed view of one adapter's qtune.json."""

    kind: str
    config: RunConfig
    base_fingerprint: str
    labels: Labels | None = None  # classifiers only
    chat_template: str | None = None  # the template the adapter was trained with (causal LMs)
    raw: dict[str, Any] = field(default_factory=dict)  # qtune.json as written

    @property
    def is_classifier(self) -> bool:
        return self.kind == CLASSIFIER

    @property
    def base(self) -> dict[str, Any]:
        """What qtune.json records of the base: name, path, fingerprint, architecture, vocab_size."""
        return self.raw.get("base") or {}

    @property
    def metrics(self) -> dict[str, Any]:
        return self.raw.get("metrics") or {}

    def name(self, folder: str | Path) -> str:
        """The adapter's name: the run's output.name (a hub download's folder is a commit hash), else the folder's."""
        return self.config.output.name or Path(folder).name

    def to_json(self) -> dict[str, Any]:
        return self.raw

    @classmethod
    def from_json(cls, values: dict[str, Any], where: str = META_FILE) -> AdapterMeta:
        """Parse qtune.json's content; an AdapterError names the file and the key that is missing or wrong."""
        if not isinstance(values, dict):
            raise AdapterError(f"{where}: not a JSON object")
        try:
            config, fingerprint = values["config"], values["base"]["fingerprint"]
        except (KeyError, TypeError) as e:
            raise AdapterError(f"{where} lacks {e}: not written by this qtune, or edited") from None
        try:
            cfg = from_dict(config)
        except ConfigError as e:
            raise AdapterError(f"{where}: its recorded config is invalid: {e}") from None
        kind = values.get("kind", CAUSAL_LM)
        if kind not in (CAUSAL_LM, CLASSIFIER):
            raise AdapterError(f"{where}: unknown adapter kind {kind!r} (expected {CAUSAL_LM} or {CLASSIFIER})")
        labels = Labels.from_json(values.get("labels"), where) if kind == CLASSIFIER else None
        return cls(kind, cfg, fingerprint, labels, values.get("chat_template"), values)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> AdapterMeta:
        """Read and parse the qtune.json of a complete adapter folder."""
        return cls.from_json(read_meta(adapter_dir), f"{Path(adapter_dir) / META_FILE}")


def read_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """qtune.json of an adapter folder as written (plain data), after checking the PEFT files are there."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: no such adapter folder")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"{adapter_dir}: {name} is missing; this is not a complete qtune adapter folder")
    try:
        meta = json.loads((adapter_dir / META_FILE).read_text())
    except ValueError as e:  # (a UnicodeDecodeError too)
        raise AdapterError(f"{adapter_dir / META_FILE}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{adapter_dir / META_FILE}: must hold a JSON object, got a {type(meta).__name__}")
    read_adapter_config(adapter_dir)  # peft's own file: every verb that loads the folder reads it
    return meta


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json (peft's) of an adapter folder, refused by name unless it is a JSON object."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # (a UnicodeDecodeError too)
        raise AdapterError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: must hold a JSON object, got a {type(config).__name__}")
    return config


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(DISTRIBUTION if name == "qtune" else name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def hardware() -> dict[str, Any]:
    """Where the run trained: the GPU(s) or the CPU, and the number of processes."""
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def base_identity(base_path: Path) -> dict[str, Any]:
    """What an adapter records of its base besides the weights' fingerprint: architecture and vocabulary."""
    try:
        config = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    text = config.get("text_config") or config
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "vocab_size": text.get("vocab_size", config.get("vocab_size")),
    }


def new_meta(
    *,
    kind: str,
    cfg: RunConfig,
    base_path: Path,
    fingerprint: str,
    train_report: Any,
    eval_report: Any | None,
    steps: int,
    train_loss: float,
    seconds: float,
    losses: list[tuple[int, float]],
    metrics: dict[str, Any],
    eval_losses: list[tuple[int, float]] | None = None,
    training: dict[str, Any] | None = None,
    labels: Labels | None = None,
    samples: list[dict] | None = None,
    chat_template: str | None = None,
) -> AdapterMeta:
    """The qtune.json of a freshly trained adapter: what every recipe records, plus the recipe's own parts.

    `training` adds recipe-specific entries to the training section (trained tokens, resumed step, ...).
    `losses` and `eval_losses` are (step, loss) points: the training loss, and the held-out loss while training.
    """
    versions = library_versions()
    raw: dict[str, Any] = {
        "qtune_version": versions["qtune"],
        "kind": kind,
        "base": {
            "name": cfg.model.name,
            "path": str(base_path),
            "fingerprint": fingerprint,
            **base_identity(base_path),
        },
        "config": to_dict(cfg),
        "data": {"train": vars(train_report), "eval": vars(eval_report) if eval_report else None},
        "training": {
            "steps": steps,
            "seconds": round(seconds, 1),
            "train_loss": train_loss,
            **(training or {}),
            "loss_curve": losses,
            "eval_loss_curve": eval_losses or [],
        },
        "metrics": metrics,
        "hardware": hardware(),
    }
    if labels is not None:
        raw["labels"] = labels.to_json()
    if samples is not None:
        raw["samples"] = samples
    if chat_template is not None:
        raw["chat_template"] = chat_template
    raw["versions"] = versions
    return AdapterMeta(kind, cfg, fingerprint, labels, chat_template, raw)
