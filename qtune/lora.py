"""Attach LoRA adapters (peft underneath), and write and load the adapter folder.

The folder's layout and its qtune.json are described in qtune/meta.py. It is written under a hidden
temporary name and renamed into place (qtune/atomic.py), so a crash never leaves a folder that looks
complete; qtune.json is what marks a folder as a qtune adapter.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qtune import atomic
from qtune.config import LoraConfig, RunConfig
from qtune.errors import AdapterError  # noqa: F401  (re-exported)
from qtune.meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, AdapterMeta, base_identity, read_meta  # noqa: F401
from qtune.models import fingerprint_base, load_base, load_classifier, load_tokenizer, resolve_base


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
    """Wrap `model` with fresh LoRA adapters, or with lora.from_adapter's trained ones (checked beforehand by
    `check_from_adapter`); only adapter weights (and modules_to_save) train."""
    import peft

    if cfg.from_adapter:
        model = peft.PeftModel.from_pretrained(model, cfg.from_adapter, is_trainable=True)
        print(f"LoRA weights from {cfg.from_adapter} (r={model.peft_config['default'].r})")
        return model
    try:
        return peft.get_peft_model(model, peft_config(cfg, task_type))
    except ValueError as e:  # e.g. a target module name that does not exist in this model
        raise AdapterError(f"lora.targets: {e}") from None


def check_from_adapter(cfg: RunConfig, base_fingerprint: str) -> None:
    """lora.from_adapter, before any model loads: a complete causal-LM adapter folder trained on this very base."""
    path = cfg.lora.from_adapter
    if not path:
        return
    if cfg.recipe == "classify":
        raise AdapterError("lora.from_adapter: the classify recipe starts from fresh LoRA weights and a new head")
    if not (Path(path) / META_FILE).is_file():
        raise AdapterError(f"lora.from_adapter: {path} is not a qtune adapter folder (no {META_FILE} in it)")
    meta = AdapterMeta.read(path)
    check_weights(path)
    if meta.is_classifier:
        raise AdapterError(f"lora.from_adapter: {path} is a classifier adapter; start from a causal-LM one")
    if meta.base_fingerprint != base_fingerprint:
        raise AdapterError(
            f"lora.from_adapter: {path} was trained on another base ({meta.config.model.name}, fingerprint "
            f"{meta.base_fingerprint[:19]}...) than this run's {cfg.model.name} ({base_fingerprint[:19]}...)"
        )


def output_dir(cfg: RunConfig) -> Path:
    """Where this run's adapter goes; fails before any work if it exists and overwrite is off."""
    if not cfg.output.name:
        raise AdapterError("output.name is not set (it defaults to the config file's name): pass output.name=NAME")
    name = cfg.output.name
    if Path(name).name != name or name in (".", ".."):
        raise AdapterError(f"output.name must be a plain folder name, got {name!r}")
    out = Path(cfg.output.dir) / name
    if out.exists() and not out.is_dir():  # (overwrite replaces an adapter folder, never a file)
        raise AdapterError(f"{out} is a file, not an adapter folder: pick another output.name or output.dir")
    if out.exists() and not cfg.output.overwrite:
        raise AdapterError(f"{out} already exists: pick another output.name, or set output.overwrite=true")
    problem = atomic.unwritable(out)
    if problem:
        raise AdapterError(f"cannot write {out}: {problem}; set output.dir to a folder you can write")
    return out


def save_adapter(
    model,
    out_dir: Path,
    meta: AdapterMeta,
    files: dict[str, bytes] | None = None,
    overwrite: bool = False,
    state_dict: dict | None = None,
) -> Path:
    """Write the adapter folder atomically: all files under a temporary name, then one rename.

    An existing folder is replaced only with `overwrite`, and only after the new one is complete.
    `state_dict`: the model's full weights when they are sharded (FSDP; train.gathered_weights).
    """
    import json

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise AdapterError(f"{out_dir} already exists: set output.overwrite=true to replace it")
    try:
        with atomic.staged_folder(out_dir, replace=True) as tmp:
            # Only the trained adapter: trl's DPO/KTO/GRPO add a frozen "ref" copy beside it (lora.from_adapter).
            only = {"selected_adapters": ["default"]} if len(getattr(model, "peft_config", {})) > 1 else {}
            model.save_pretrained(
                str(tmp), safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}), **only
            )
            check_head_saved(tmp, meta.labels.head_modules if meta.labels else [])
            for name, data in (files or {}).items():
                (tmp / name).write_bytes(data)
            (tmp / META_FILE).write_text(json.dumps(meta.to_json(), indent=2, default=str) + "\n")
    except OSError as e:
        kept = " (the previous adapter there is kept)" if out_dir.exists() else ""
        raise AdapterError(f"writing {out_dir} failed, nothing was written{kept}: {e}") from e
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
    adapter_dir: str | Path, meta: AdapterMeta, check: bool = True, trust_remote_code: bool = False
) -> tuple[RunConfig, Path]:
    """The adapter's resolved config and its base folder, refused if the base differs from the one it was
    trained on: other weights (fingerprint), another architecture or another vocabulary size.

    `check=False` (`--ignore-base-mismatch` on the command line) is for deliberate cases, e.g. a
    re-saved copy of the same base. An adapter's own qtune.json never switches on model code: its
    `model.trust_remote_code` is replaced by the caller's `trust_remote_code` (`--trust-remote-code`).
    """
    cfg = replace(meta.config, model=replace(meta.config.model, trust_remote_code=trust_remote_code))
    base_path = resolve_base(cfg.model)
    if not check:
        return cfg, base_path
    override = "; pass --ignore-base-mismatch (check_base=False) if this is deliberate"
    recorded, now = meta.base, base_identity(base_path)
    for key, what in (("architecture", "architecture"), ("vocab_size", "vocabulary size")):
        if recorded.get(key) is not None and now.get(key) is not None and recorded[key] != now[key]:
            raise AdapterError(
                f"{adapter_dir} was trained on a base with {what} {recorded[key]}, but {base_path} has "
                f"{now[key]}: refusing to load it{override}"
            )
    fingerprint, actual = meta.base_fingerprint, fingerprint_base(base_path)
    if actual != fingerprint:
        raise AdapterError(
            f"{adapter_dir} was trained on a base with fingerprint {fingerprint[:19]}..., "
            f"but {base_path} has {actual[:19]}...: refusing to use it with a different "
            f"base{override}"
        )
    return cfg, base_path


def adapter_tokenizer(base_path: Path, meta: AdapterMeta, trust_remote_code: bool = False):
    """The base's tokenizer, prompting as the adapter was trained: with the chat template stored in qtune.json."""
    tokenizer = load_tokenizer(base_path, trust_remote_code)
    if meta.chat_template:
        tokenizer.chat_template = meta.chat_template
    return tokenizer


def load_adapter(
    adapter_dir: str | Path,
    *,
    meta: AdapterMeta | None = None,
    base_only: bool = False,
    check_base: bool = True,
    trust_remote_code: bool = False,
):
    """Load base + adapter as recorded in the adapter's qtune.json (`meta`, if the caller has read it already).

    Returns (model, tokenizer, config, meta). With `base_only`, the adapter is not applied (for a
    before/after comparison). The base is refused if its fingerprint differs from the recorded one.
    """
    meta = meta or AdapterMeta.read(adapter_dir)
    check_weights(adapter_dir)
    cfg, base_path = checked_base(adapter_dir, meta, check_base, trust_remote_code)
    tokenizer = adapter_tokenizer(base_path, meta, cfg.model.trust_remote_code)
    if meta.is_classifier:
        model, _ = load_classifier(base_path, cfg.model, cfg.quant, meta.labels.id2label, tokenizer.pad_token_id)
        if not base_only:
            check_head_saved(Path(adapter_dir), meta.labels.head_modules)
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
