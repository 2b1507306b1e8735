"""Attach LoRA adapters (peft underneath), and write and read the adapter folder.

The adapter folder is a contract every other verb reads:
  adapter_model.safetensors, adapter_config.json   plain PEFT; `PeftModel.from_pretrained` loads them
  qtune.json                                        base id + fingerprint, resolved config, data, metrics, versions
  loss.png                                          the training loss curve
It is written under a hidden temporary name and renamed into place, so a crash never leaves
a folder that looks complete; qtune.json is what marks a folder as a qtune adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qtune.config import LoraConfig, RunConfig, from_dict
from qtune.errors import AdapterError  # noqa: F401  (re-exported)
from qtune.models import fingerprint_base, load_base, load_classifier, load_tokenizer, resolve_base

META_FILE = "qtune.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """The peft.LoraConfig for a qtune LoraConfig."""
    import peft

    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets,
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        modules_to_save=cfg.modules_to_save or None,
        bias="none",
        task_type=task_type,
    )


def attach_lora(model, cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with fresh LoRA adapters; only adapter weights (and modules_to_save) train."""
    import peft

    try:
        return peft.get_peft_model(model, peft_config(cfg, task_type))
    except ValueError as e:  # e.g. a target module name that does not exist in this model
        raise AdapterError(f"lora.targets: {e}") from None


def output_dir(cfg: RunConfig) -> Path:
    """Where this run's adapter goes; fails before any work if it exists and overwrite is off."""
    if not cfg.output.name:
        raise AdapterError("output.name is not set (it defaults to the config file's name): pass output.name=NAME")
    name = cfg.output.name
    if Path(name).name != name or name in (".", ".."):
        raise AdapterError(f"output.name must be a plain folder name, got {name!r}")
    out = Path(cfg.output.dir) / name
    if out.exists() and not cfg.output.overwrite:
        raise AdapterError(f"{out} already exists: pick another output.name, or set output.overwrite=true")
    return out


def default_mode(directory: bool) -> int:
    """The permissions a plain mkdir / open would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def staging_dir(out: Path) -> Path:
    """A hidden temporary folder beside `out`, with the permissions a plain mkdir would give.

    (mkdtemp makes it private, 0700; renamed into place, that would hide outputs from other users.)
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(default_mode(directory=True))
    return tmp


def save_adapter(
    model,
    out_dir: Path,
    meta: dict[str, Any],
    files: dict[str, bytes] | None = None,
    overwrite: bool = False,
    state_dict: dict | None = None,
) -> Path:
    """Write the adapter folder atomically: all files under a temporary name, then one rename.

    An existing folder is replaced only with `overwrite`, and only after the new one is complete.
    `state_dict`: the model's full weights when they are sharded (FSDP; train.gathered_weights).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not overwrite:
        raise AdapterError(f"{out_dir} already exists: set output.overwrite=true to replace it")
    tmp = staging_dir(out_dir)
    old = None
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        check_head_saved(tmp, meta.get("labels", {}).get("head_modules", []))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n")
        for file in tmp.iterdir():
            with file.open("rb") as f:
                os.fsync(f.fileno())
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # put the previous adapter back
        if isinstance(e, OSError):
            kept = " (the previous adapter there is kept)" if out_dir.exists() else ""
            raise AdapterError(f"writing {out_dir} failed, nothing was written{kept}: {e}") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def check_head_saved(adapter_dir: Path, head_modules: list[str]) -> None:
    """Refuse an adapter whose newly initialised modules (a classification head) have no saved weights.

    Without them a reload would re-initialise the head at random: the silent failure users of other
    tools report. peft stores modules_to_save as `...<module>.modules_to_save.default...` or `...<module>.weight`.
    """
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    for module in head_modules:
        if not any(f".{module}." in f".{k}" for k in keys):
            raise AdapterError(
                f"{adapter_dir}: no saved weights for `{module}`, a module the base does not have; "
                "loading would re-initialise it at random"
            )


def read_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """Read qtune.json of an adapter folder, checking the PEFT files are there."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: no such adapter folder")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"{adapter_dir}: {name} is missing; this is not a complete qtune adapter folder")
    try:
        return json.loads((adapter_dir / META_FILE).read_text())
    except ValueError as e:
        raise AdapterError(f"{adapter_dir / META_FILE}: not valid JSON ({e})") from None


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


def check_weights(adapter_dir: str | Path) -> None:
    """Refuse a corrupt or truncated adapter_model.safetensors before anything is loaded."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            if not list(f.keys()):
                raise AdapterError(f"{path}: holds no tensors")
    except SafetensorError as e:
        raise AdapterError(
            f"{path} is corrupt or incomplete (a corrupt or truncated safetensors file: {e}); copy it again or "
            "train it again"
        ) from None


def checked_base(
    adapter_dir: str | Path, meta: dict[str, Any], check: bool = True, trust_remote_code: bool = False
) -> tuple[RunConfig, Path]:
    """The adapter's resolved config and its base folder, refused if the base differs from the one it was
    trained on: other weights (fingerprint), another architecture or another vocabulary size.

    `check=False` (`--ignore-base-mismatch` on the command line) is for deliberate cases, e.g. a
    re-saved copy of the same base. An adapter's own qtune.json never switches on model code: its
    `model.trust_remote_code` is replaced by the caller's `trust_remote_code` (`--trust-remote-code`).
    """
    try:
        cfg, recorded = from_dict(meta["config"]), meta["base"]
        fingerprint = recorded["fingerprint"]
    except (KeyError, TypeError) as e:
        raise AdapterError(f"{adapter_dir}/{META_FILE} lacks {e}: not written by this qtune, or edited") from None
    cfg.model.trust_remote_code = trust_remote_code
    base_path = resolve_base(cfg.model)
    if not check:
        return cfg, base_path
    override = "; pass --ignore-base-mismatch (check_base=False) if this is deliberate"
    now = base_identity(base_path)
    for key, what in (("architecture", "architecture"), ("vocab_size", "vocabulary size")):
        if recorded.get(key) is not None and now.get(key) is not None and recorded[key] != now[key]:
            raise AdapterError(
                f"{adapter_dir} was trained on a base with {what} {recorded[key]}, but {base_path} has "
                f"{now[key]}: refusing to load it{override}"
            )
    actual = fingerprint_base(base_path)
    if actual != fingerprint:
        raise AdapterError(
            f"{adapter_dir} was trained on a base with fingerprint {fingerprint[:19]}..., "
            f"but {base_path} has {actual[:19]}...: refusing to use it with a different "
            f"base{override}"
        )
    return cfg, base_path


def load_adapter(
    adapter_dir: str | Path, *, base_only: bool = False, check_base: bool = True, trust_remote_code: bool = False
):
    """Load base + adapter as recorded in the adapter's qtune.json.

    Returns (model, tokenizer, config, meta). With `base_only`, the adapter is not applied (for a
    before/after comparison). The base is refused if its fingerprint differs from the recorded one.
    """
    meta = read_meta(adapter_dir)
    check_weights(adapter_dir)
    cfg, base_path = checked_base(adapter_dir, meta, check_base, trust_remote_code)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    if meta.get("kind") == "sequence-classification":
        id2label = {int(k): v for k, v in meta["labels"]["id2label"].items()}
        model, _ = load_classifier(base_path, cfg.model, cfg.quant, id2label, pad_token_id=tokenizer.pad_token_id)
        if not base_only:
            check_head_saved(Path(adapter_dir), meta["labels"]["head_modules"])
    else:
        model = load_base(base_path, cfg.model, cfg.quant)
    if not base_only:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except Exception as e:
            raise AdapterError(f"{adapter_dir}: the adapter does not load onto {base_path}: {e}") from None
    model.eval()
    return model, tokenizer, cfg, meta
