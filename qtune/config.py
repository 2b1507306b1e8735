"""Typed run configuration: one dataclass per concern, YAML on disk, dotted overrides.

A config file is a YAML mapping whose top-level keys are the fields of `RunConfig`
(`model`, `quant`, `lora`, `data`, `train`, `output`, `eval`). On the command line,
`train.lr=1e-4 lora.r=8` overrides single fields. Unknown keys are errors that name
the nearest valid key, and every validation error names the dotted key to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qtune.errors import ConfigError  # noqa: F401  (re-exported)


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = _help("Base model: 'smollm2-135m' (embedded), a local HF folder, or a hub id.", "smollm2-135m")
    revision: str | None = _help("Hub revision (branch, tag or commit) when `name` is a hub id.", None)
    dtype: Literal["bf16", "fp16", "fp32"] = _help("Compute dtype of the base and the LoRA matmuls.", "bf16")
    trust_remote_code: bool = _help("Run model code shipped with a hub repo. Off unless you trust it.", False)


@dataclass
class QuantConfig:
    method: Literal["nf4", "fp4", "int8", "none"] = _help("How the frozen base weights are stored.", "nf4")
    double_quant: bool = _help("Quantize the 4-bit block scales too (saves ~0.37 bit/weight).", True)


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank.", 16)
    alpha: float = _help("LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).", 32.0)
    dropout: float = _help("Dropout on the LoRA input; 0 skips it (it cost 13% of a CPU step when on).", 0.0)
    targets: str | list[str] = _help("'all-linear' or a list of module names to adapt.", "all-linear")
    rslora: bool = _help("Rank-stabilised scaling alpha / sqrt(r).", False)
    dora: bool = _help("Weight-decomposed LoRA (DoRA); slower per step.", False)
    modules_to_save: list[str] = _help("Modules trained in full and saved with the adapter.", factory=list)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            # `lora.targets=q_proj,v_proj` on the command line: module names, not one regex for peft
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("lora.targets is empty: use 'all-linear' or name at least one module")


@dataclass
class DataConfig:
    train: str = _help("Training file: .jsonl, .json, .csv, .parquet, or a saved `datasets` folder.", "")
    eval: str | None = _help("Held-out file in the same format (optional).", None)
    format: Literal["auto", "chat", "alpaca", "prompt_completion", "text"] = _help(
        "Record format; 'auto' detects it from the fields of the first record.", "auto"
    )
    system_prompt: str | None = _help("System message prepended to chat/alpaca records that have none.", None)
    max_length: int = _help("Longest tokenized example, in tokens.", 1024)
    overlong: Literal["truncate", "reject"] = _help("What to do with examples over max_length.", "truncate")
    text_field: str = _help("Classification: the field holding the text.", "text")
    label_field: str = _help("Classification: the field holding the label (text or integer).", "label")
    loss_on: Literal["assistant", "all"] = _help(
        "Train on assistant/completion tokens only, or on every token.", "assistant"
    )

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ConfigError(f"data.max_length must be positive, got {self.max_length}")


@dataclass
class TrainConfig:
    max_steps: int = _help("Optimizer steps; 0 means run `epochs` instead.", 0)
    epochs: float = _help("Passes over the training data when max_steps is 0.", 1.0)
    batch_size: int = _help("Examples per device per micro-batch.", 8)
    grad_accum: int = _help("Micro-batches per optimizer step.", 1)
    lr: float = _help("Peak learning rate.", 2e-4)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _help("LR schedule.", "cosine")
    warmup: float = _help("Warm-up: a fraction of all steps if < 1, else a step count.", 0.05)
    weight_decay: float = _help("AdamW weight decay on LoRA weights.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm.", 1.0)
    optim: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = _help("Optimizer.", "adamw")
    gradient_checkpointing: bool = _help("Recompute activations in backward (non-reentrant).", False)
    checkpoint_every: int = _help(
        "With gradient_checkpointing: recompute only every k-th decoder layer (1: all; 2: half), keeping the "
        "others' activations -- less recomputation for more memory (selective checkpointing, as in torchtune). "
        "train.fit_to_vram checkpoints all layers or none.",
        1,
    )
    pad_to_multiple_of: int = _help(
        "Pad each micro-batch's length up to a multiple of this (0: to its longest example only). Fewer distinct "
        "shapes: on a CPU each new one grows the memory oneDNN and the allocator keep (docs/performance.md).",
        8,
    )
    group_by_length: bool = _help("Batch examples of similar length together (less padding).", True)
    padding_free: bool = _help(
        "Causal LM: concatenate each micro-batch into one row without padding; position_ids keep the examples from "
        "attending to each other. Pays with flash attention (varlen kernels); on a CPU, sdpa's block-diagonal mask "
        "over the whole row cost 22% of the speed on the demo (docs/performance.md).",
        False,
    )
    chunked_loss: bool = _help(
        "Causal LM: logits only at trained positions, cross-entropy in fp32 chunks. Off: trl's fused LM-head loss, "
        "which scores every position on a CPU.",
        True,
    )
    fit_to_vram: str | None = _help(
        "GPU memory to fit (e.g. 8GB): choose micro-batch, grad_accum and checkpointing from `qtune plan`.", None
    )
    fsdp: bool = _help(
        "Shard the base, adapters and optimizer over the processes of a torchrun / accelerate launch (FSDP); "
        "4-bit weights are then stored in the compute dtype so they shard. Off: each process holds a copy (DDP).",
        False,
    )
    seed: int = _help("Seed for data order, dropout and LoRA init.", 42)
    logging_steps: int = _help("Log the loss every N steps.", 5)
    save_every: int = _help(
        "Write a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps; 0: never.",
        50,
    )
    save_limit: int = _help("Complete checkpoints kept while training (older ones are deleted).", 2)
    on_nonfinite: Literal["stop", "skip"] = _help(
        "A NaN/inf loss or gradient: stop with the last good weights saved, or skip that optimizer step.", "stop"
    )

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "logging_steps", "save_limit", "checkpoint_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.pad_to_multiple_of < 0:
            raise ConfigError(
                f"train.pad_to_multiple_of must be >= 0 (0: no extra padding), got {self.pad_to_multiple_of}"
            )
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.max_steps}")
        if self.save_every < 0:
            raise ConfigError(f"train.save_every must be >= 0 (0: no checkpoints), got {self.save_every}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("train.max_steps is 0 and train.epochs is not positive: set one of them")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ConfigError(f"train.warmup must be >= 0, got {self.warmup}")
        if self.fit_to_vram is not None:
            from qtune.plan import PlanError, parse_bytes

            try:
                parse_bytes(self.fit_to_vram)
            except PlanError as e:
                raise ConfigError(f"train.fit_to_vram: {e}") from None


@dataclass
class EvalConfig:
    batch_size: int = _help("Examples per batch when evaluating and generating.", 16)
    max_new_tokens: int = _help("Generation budget for answer accuracy.", 16)
    limit: int | None = _help("Evaluate on at most this many records (None: all).", None)

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"eval.{key} must be positive, got {getattr(self, key)}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit must be positive or null, got {self.limit}")


@dataclass
class OutputConfig:
    dir: str = _help("Parent folder of trained adapters.", "adapters")
    name: str | None = _help("Adapter folder name; default: the config file's stem.", None)
    overwrite: bool = _help("Replace an existing adapter folder of the same name.", False)
    keep_checkpoints: bool = _help("Keep <dir>/<name>.checkpoints/ after the adapter is written.", False)


@dataclass
class RunConfig:
    recipe: str = _help("Recipe that runs this config: 'sft', 'classify', or a path to your own recipe .py.", "sft")
    resume: str | None = _help(
        "'auto': continue from the newest complete checkpoint of this run (or start if there is none); "
        "or a checkpoint folder. Unset: refuse to start over an interrupted run's checkpoints.",
        None,
    )
    model: ModelConfig = _help("Base model.", factory=ModelConfig)
    quant: QuantConfig = _help("Quantization of the base.", factory=QuantConfig)
    lora: LoraConfig = _help("LoRA adapter.", factory=LoraConfig)
    data: DataConfig = _help("Training and evaluation data.", factory=DataConfig)
    train: TrainConfig = _help("Optimisation.", factory=TrainConfig)
    eval: EvalConfig = _help("Evaluation.", factory=EvalConfig)
    output: OutputConfig = _help("Where the adapter is written.", factory=OutputConfig)


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
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list; got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
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
            return tp(value)
        except ValueError:
            raise ConfigError(f"`{key}` must be {what}; got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"`{key}` must be a string; got {value!r}")
        return str(value)
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
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
