"""Merge an adapter into its base, and export it for serving engines: peft, GGUF, GGUF LoRA.

  merge        base (16/32-bit, on the CPU) + adapter -> a standalone HF model folder (qtune_merge.json records it)
  export_peft  the adapter alone, cleaned for vLLM / TGI (only LoRA tensors, a plain adapter_config.json)
  (GGUF for llama.cpp / Ollama, the merged model and the adapter alone: qtune/gguf_export.py)

Every output is written under a hidden temporary name beside its destination and renamed into
place at the end, so a failure (bad adapter, full disk, interrupt) never leaves a half-written one.
Supported architectures for GGUF: llama (SmolLM2, Llama 2/3 without rope scaling, Mistral) and qwen2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qtune.errors import AdapterError, ExportError
from qtune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, checked_base, default_mode, read_meta, staging_dir
from qtune.models import DTYPES, EMBEDDED_ALIAS, load_base, load_tokenizer

MERGE_FILE = "qtune_merge.json"
# Serving engines that refuse an adapter carrying full embedding / lm_head weights (FIELD.md #9).
ENGINES_REJECTING_FULL_MODULES = "vLLM (only LoRA weights; a new vocabulary through lora_extra_vocab_size), TGI"
_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------- atomic outputs


def _refuse_existing(out: Path, adapter_fp: str | None = None) -> None:
    """Refuse an output path that exists and is not an empty folder; name a repeated merge as such."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())) or (out.is_file() and not out.stat().st_size):
        return
    record = out / MERGE_FILE
    if adapter_fp and record.is_file():
        try:
            merges = json.loads(record.read_text()).get("merges", [])
        except (OSError, ValueError):
            merges = []
        if any(m.get("adapter_fingerprint") == adapter_fp for m in merges):
            raise ExportError(f"{out} already holds a merge of this adapter ({out / MERGE_FILE}): nothing to do")
    raise ExportError(f"{out} already exists and is not empty: choose a new output path or remove it first")


def _write_failed(out: Path, error: OSError) -> ExportError:
    return ExportError(f"writing {out} failed, nothing was written: {error}; free disk space or pick another path")


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


@contextmanager
def _staged_folder(out: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `out`; rename it to `out` when the block succeeds."""
    _refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        os.replace(tmp, out)  # replaces an empty folder at `out`, as rename(2) allows
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(out, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _staged_file(out: Path) -> Iterator[Path]:
    """Yield a hidden temporary file path beside `out`; rename it to `out` when the block succeeds."""
    _refuse_existing(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name ending in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(default_mode(directory=False))  # mkstemp's 0600 would stay after the rename
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(out, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- reading the adapter


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """A stable identity of an adapter: the bytes of its PEFT config and weights."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with (Path(adapter_dir) / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter folder for export; returns (qtune meta, adapter_config, adapter tensors).

    Refuses a merge output (it is a model, not an adapter), a non-causal-LM adapter, and an
    unreadable or corrupt adapter_model.safetensors.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / MERGE_FILE).is_file():
        raise ExportError(
            f"{adapter_dir} is a merged model written by `qtune merge` ({MERGE_FILE}), not an adapter: "
            "it has nothing left to merge; point at the adapter folder it came from"
        )
    meta = read_meta(adapter_dir)
    if meta.get("kind", "causal-lm") != "causal-lm":
        raise ExportError(f"{adapter_dir} is a {meta.get('kind')} adapter; merge and export handle causal-LM ones")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except Exception as e:  # a truncated or overwritten file: safetensors / json say why
        raise AdapterError(
            f"{adapter_dir}: cannot read the adapter files ({type(e).__name__}: {e}); "
            "they are corrupt or incomplete: restore them or train again"
        ) from None
    if not tensors:
        raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS} holds no tensors: restore it or train again")
    return meta, config, tensors


def _checked_base(adapter_dir: Path, meta: dict[str, Any]) -> Path:
    """The base folder recorded in qtune.json, refused if its fingerprint differs (as `load_adapter` does)."""
    return checked_base(adapter_dir, meta)[1]


def _previous_merges(base_path: Path) -> list[dict[str, Any]]:
    """The merges already inside a base that is itself a `qtune merge` output (empty for an original base)."""
    record = base_path / MERGE_FILE
    return json.loads(record.read_text()).get("merges", []) if record.is_file() else []


def _base_config(base_path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(base_path))


# ---------------------------------------------------------------- merge


def merged_model(adapter_dir: str | Path, *, dtype: str | None = None, into_quantized: bool = False):
    """Load base + adapter and merge them (peft `merge_and_unload`); returns (model, tokenizer, meta, base_path).

    The base is loaded unquantized in `dtype` (default: the adapter's `model.dtype`) on the CPU, so a
    7B merge needs RAM, not VRAM. `into_quantized` merges into the base as it was trained
    (nf4/fp4/int8): the merged weights are rounded back to 4/8 bits, which degrades the model.
    """
    adapter_dir = Path(adapter_dir)
    meta, _, _ = read_adapter(adapter_dir)
    cfg, _ = checked_base(adapter_dir, meta, check=False)  # (checked below) model code stays off
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype or cfg.model.dtype)
    base_path = _checked_base(adapter_dir, meta)
    adapter_fp = adapter_fingerprint(adapter_dir)
    if any(m.get("adapter_fingerprint") == adapter_fp for m in _previous_merges(base_path)):
        raise ExportError(
            f"{base_path} already has {adapter_dir} merged into it ({MERGE_FILE}): refusing to merge twice"
        )
    tokenizer = load_tokenizer(base_path, model_cfg.trust_remote_code)
    if meta.get("chat_template"):
        tokenizer.chat_template = meta["chat_template"]  # the template the adapter was trained with

    if into_quantized:
        if cfg.quant.method == "none":
            raise ExportError(f"{adapter_dir} was trained on an unquantized base: --into-quantized does not apply")
        warnings.warn(
            f"merging into the {cfg.quant.method} base: the merged weights are rounded back to "
            f"{cfg.quant.method}, which loses most of what the adapter learned on small updates; "
            "merge into the 16-bit base (without --into-quantized) unless you need a quantized file",
            UserWarning,
            stacklevel=2,
        )
        base = load_base(base_path, model_cfg, cfg.quant)
    else:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            str(base_path),
            dtype=DTYPES[model_cfg.dtype],
            device_map={"": "cpu"},
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=True,
        )
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as e:  # e.g. an adapter for another architecture: shape or module-name mismatch
        raise AdapterError(f"{adapter_dir}: the adapter does not load onto {base_path}: {e}") from None
    # safe_merge checks every merged weight for NaN/inf before keeping it.
    merged = model.merge_and_unload(safe_merge=True)
    merged.eval()
    if merged.generation_config is not None and merged.generation_config.eos_token_id is None:
        merged.generation_config.eos_token_id = tokenizer.eos_token_id  # FIELD.md #6: the model must stop
    return merged, tokenizer, meta, base_path


def merge(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    into_quantized: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Merge an adapter into its base and write a standalone HF model folder, atomically.

    The folder holds sharded safetensors, config + generation config, the tokenizer with its chat
    template, README.md (a model card naming base and adapter) and qtune_merge.json (what was merged).

    Refuses: an existing non-empty `out_dir` (and says so when it already holds this merge), an
    adapter folder that is itself a merge output, a base that already contains this adapter, and a
    base whose fingerprint differs from the adapter's qtune.json.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    read_adapter(adapter_dir)  # fail on a bad adapter before the slow part
    adapter_fp = adapter_fingerprint(adapter_dir)
    _refuse_existing(out_dir, adapter_fp)
    model, tokenizer, meta, base_path = merged_model(adapter_dir, dtype=dtype, into_quantized=into_quantized)
    record = {
        "kind": "merged-model",
        "base": meta["base"],
        "adapter": str(adapter_dir.resolve()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "into_quantized": into_quantized,
        "merges": [
            *_previous_merges(base_path),
            {"adapter": str(adapter_dir.resolve()), "adapter_fingerprint": adapter_fp, "base": meta["base"]},
        ],
        "versions": meta.get("versions", {}),
    }
    with _staged_folder(out_dir) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_model_card(adapter_dir, meta, record))
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def adapter_name(adapter_dir: Path, meta: dict[str, Any]) -> str:
    """The adapter's name: the run's output.name (a hub download's folder is a commit hash), else the folder's."""
    return (meta.get("config") or {}).get("output", {}).get("name") or Path(adapter_dir).name


def _model_card(adapter_dir: Path, meta: dict[str, Any], record: dict[str, Any]) -> str:
    cfg = meta["config"]
    name = adapter_name(adapter_dir, meta)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in (meta.get("metrics") or {}).items() if isinstance(v, int | float))
    return (
        f"---\nbase_model: {meta['base']['name']}\nlibrary_name: transformers\ntags: [qtune, lora, merged]\n---\n\n"
        f"# {name} (merged)\n\n"
        f"A LoRA adapter merged into its base by `qtune merge`; loads with plain transformers.\n\n"
        f"- base: `{meta['base']['name']}` (fingerprint `{meta['base']['fingerprint']}`)\n"
        f"- adapter: `{name}` (fingerprint `{record['merges'][-1]['adapter_fingerprint']}`), "
        f"LoRA r={cfg['lora']['r']}, alpha={cfg['lora']['alpha']}, trained on a {cfg['quant']['method']} base\n"
        f"- merged in {record['dtype']}{' into the quantized base' if record['into_quantized'] else ''}\n"
        + (f"- held-out metrics of the adapter: {metrics}\n" if metrics else "")
        + f"\nWhat was merged, in order: `{MERGE_FILE}`.\n"
    )


# ---------------------------------------------------------------- peft export (vLLM, TGI)

_PEFT_KEYS = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "r",
    "lora_alpha",
    "target_modules",
    "bias",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "modules_to_save",
)
_VOCAB_MODULES = ("embed_tokens", "lm_head")


def export_peft(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an adapter-only folder that serving engines (vLLM, TGI) accept, atomically.

    Keeps only LoRA tensors and the adapter_config.json fields those engines read. Full copies of
    embed_tokens / lm_head in modules_to_save are dropped when they equal the base's (nothing was
    learned there); trained ones with the base's vocabulary are refused (merge instead); a changed
    vocabulary keeps them, with a warning naming the engines that reject it.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    meta, config, tensors = read_adapter(adapter_dir)
    _refuse_existing(out_dir)
    if config.get("use_dora"):
        raise ExportError(f"{adapter_dir} is a DoRA adapter, which vLLM and TGI do not serve: use `qtune merge`")
    if config.get("bias", "none") != "none":
        raise ExportError(f"{adapter_dir}: bias={config['bias']!r} adapters are not served by vLLM: use `qtune merge`")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError(f"{adapter_dir}: per-module rank_pattern/alpha_pattern is not served by vLLM")
    base_path = _checked_base(adapter_dir, meta)
    keep = {k: v for k, v in tensors.items() if ".lora_" in k}
    modules_to_save = []
    for module in config.get("modules_to_save") or []:
        full = {k: v for k, v in tensors.items() if f".{module}." in k and ".lora_" not in k}
        if full and _keep_full_module(adapter_dir, base_path, module, full):
            keep.update(full)
            modules_to_save.append(module)
    clean = {k: config.get(k) for k in _PEFT_KEYS if k in config}
    clean.update(
        base_model_name_or_path=_base_name(meta),
        target_modules=sorted(_lora_modules(keep)),
        modules_to_save=modules_to_save or None,
        lora_dropout=0.0,
        inference_mode=True,
    )
    from safetensors.torch import save_file

    with _staged_folder(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in keep.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(clean, indent=2) + "\n")
    return out_dir


def _lora_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The short names (q_proj, ...) of the modules that carry LoRA tensors."""
    return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k}


def _base_name(meta: dict[str, Any]) -> str:
    name = meta["base"]["name"]
    return "HuggingFaceTB/SmolLM2-135M-Instruct" if name == EMBEDDED_ALIAS else name


def _keep_full_module(adapter_dir: Path, base_path: Path, module: str, full: dict[str, torch.Tensor]) -> bool:
    """Whether a modules_to_save entry must stay in a serving export (see export_peft)."""
    if module.rsplit(".", 1)[-1] not in _VOCAB_MODULES:
        raise ExportError(
            f"{adapter_dir}: `{module}` is trained in full (modules_to_save); serving engines load LoRA "
            "weights only: use `qtune merge` and serve the merged model"
        )
    vocab = _base_config(base_path).vocab_size
    rows = {v.shape[0] for v in full.values()}
    if rows != {vocab}:
        warnings.warn(
            f"{adapter_dir}: `{module}` has {sorted(rows)} rows but the base vocabulary has {vocab}: the vocabulary "
            f"changed, so its full weights stay in the export; {ENGINES_REJECTING_FULL_MODULES} reject such "
            "adapters: serve a `qtune merge` output there",
            UserWarning,
            stacklevel=3,
        )
        return True
    base = _base_tensors(base_path)
    short = module.rsplit(".", 1)[-1]
    matches = [v for k, v in base.items() if k.endswith(f"{short}.weight")]
    tied = [v for k, v in base.items() if k.endswith("embed_tokens.weight")]  # a tied lm_head is the embedding
    base_weight = (matches or tied or [None])[0]
    if all(base_weight is not None and torch.equal(v.to(base_weight.dtype), base_weight) for v in full.values()):
        return False  # an untouched copy of the base's: dropping it changes nothing
    raise ExportError(
        f"{adapter_dir}: `{module}` was trained in full with the base's vocabulary; "
        f"{ENGINES_REJECTING_FULL_MODULES} reject it in an adapter: use `qtune merge` and serve the merged model"
    )


def _base_tensors(base_path: Path) -> dict[str, torch.Tensor]:
    """The base's embedding and lm_head tensors (only those are read)."""
    from safetensors import safe_open

    found = {}
    for file in sorted(base_path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                    found[key] = f.get_tensor(key)
    return found
