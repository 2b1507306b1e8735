"""Merge an adapter into its base (`qtune merge`), and the reading and checks every export shares.

  merge         base (16/32-bit, on the CPU) + adapter -> a standalone HF model folder (qtune_merge.json records it)
  (peft.py: the adapter alone for vLLM / TGI; gguf.py: llama.cpp / Ollama files)

An export reads the adapter folder once (`read_source`), checks its base once (`Source.base_path`), and
writes every output through qtune.atomic, so a failure (bad adapter, full disk, interrupt) never leaves
a half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from qtune import atomic
from qtune.errors import AdapterError, ExportError
from qtune.lora import adapter_tokenizer, check_weights, checked_base
from qtune.meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CAUSAL_LM, AdapterMeta, read_adapter_config
from qtune.models import DTYPES, load_base

MERGE_FILE = "qtune_merge.json"


# ---------------------------------------------------------------- outputs


def refuse_existing(out: Path, adapter_fp: str | None = None, *, folder: bool = True) -> None:
    """Refuse an output path that exists and is not an empty folder (an empty file, for a `folder=False` output),
    or that cannot be written; name a repeated merge as such. Called before the slow work."""
    if folder and out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: give a new folder path as the output (OUT)")
    if not folder and out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name ending in .gguf as the output (OUT)")
    problem = atomic.unwritable(out)
    if problem:
        raise ExportError(f"cannot write {out}: {problem}; give an output path (OUT) in a folder you can write")
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


@contextmanager
def staged(out: Path, *, folder: bool = True) -> Iterator[Path]:
    """An export's output, written whole or not at all (qtune.atomic); a write error says nothing was written."""
    refuse_existing(out, folder=folder)
    try:
        with atomic.staged_folder(out) if folder else atomic.staged_file(out) as tmp:
            yield tmp
    except OSError as e:
        raise ExportError(
            f"writing {out} failed, nothing was written: {e}; free disk space or pick another path"
        ) from e


# ---------------------------------------------------------------- reading the adapter


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """A stable identity of an adapter: the bytes of its PEFT config and weights."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with (Path(adapter_dir) / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class Source:
    """An adapter folder read for export: its qtune.json, PEFT config and tensors; its base checked on first use."""

    dir: Path
    meta: AdapterMeta
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.meta.name(self.dir)

    @cached_property
    def base_path(self) -> Path:
        """The base folder recorded in qtune.json, refused if it is not the base the adapter was trained on."""
        return checked_base(self.dir, self.meta)[1]

    @cached_property
    def base_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.base_path))


def read_source(adapter_dir: str | Path) -> Source:
    """Read and check an adapter folder for export.

    Refuses a merge output (it is a model, not an adapter), a non-causal-LM adapter, and an
    unreadable or corrupt adapter_model.safetensors.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / MERGE_FILE).is_file():
        raise ExportError(
            f"{adapter_dir} is a merged model written by `qtune merge` ({MERGE_FILE}), not an adapter: "
            "it has nothing left to merge; point at the adapter folder it came from"
        )
    meta = AdapterMeta.read(adapter_dir)  # adapter_config.json too (read_meta)
    if meta.kind != CAUSAL_LM:
        raise ExportError(f"{adapter_dir} is a {meta.kind} adapter; merge and export handle causal-LM ones")
    from safetensors.torch import load_file

    check_weights(adapter_dir)  # a truncated or corrupt weights file, named
    try:
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
        config = read_adapter_config(adapter_dir)
    except Exception as e:  # a truncated or overwritten file: safetensors / json say why
        raise AdapterError(
            f"{adapter_dir}: cannot read the adapter files ({type(e).__name__}: {e}); "
            "they are corrupt or incomplete: restore them or train again"
        ) from None
    if not tensors:
        raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS} holds no tensors: restore it or train again")
    return Source(adapter_dir, meta, config, tensors)


def _previous_merges(base_path: Path) -> list[dict[str, Any]]:
    """The merges already inside a base that is itself a `qtune merge` output (empty for an original base)."""
    record = base_path / MERGE_FILE
    return json.loads(record.read_text()).get("merges", []) if record.is_file() else []


# ---------------------------------------------------------------- merge


def merged_model(adapter: str | Path | Source, *, dtype: str | None = None, into_quantized: bool = False):
    """Load base + adapter and merge them (peft `merge_and_unload`); returns (model, tokenizer, meta, base_path).

    `adapter`: a folder, or a Source already read. The base is loaded unquantized in `dtype` (default:
    the adapter's `model.dtype`) on the CPU, so a 7B merge needs RAM, not VRAM. `into_quantized` merges
    into the base as it was trained (nf4/fp4/int8): the merged weights are rounded back to 4/8 bits,
    which degrades the model.
    """
    source = adapter if isinstance(adapter, Source) else read_source(adapter)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = source.meta.config  # its model.trust_remote_code is never switched on by a qtune.json (checked_base)
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype or cfg.model.dtype, trust_remote_code=False)
    base_path = source.base_path
    adapter_fp = adapter_fingerprint(source.dir)
    if any(m.get("adapter_fingerprint") == adapter_fp for m in _previous_merges(base_path)):
        raise ExportError(
            f"{base_path} already has {source.dir} merged into it ({MERGE_FILE}): refusing to merge twice"
        )
    tokenizer = adapter_tokenizer(base_path, source.meta, model_cfg.trust_remote_code)

    if into_quantized:
        if cfg.quant.method == "none":
            raise ExportError(f"{source.dir} was trained on an unquantized base: --into-quantized does not apply")
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
        model = PeftModel.from_pretrained(base, str(source.dir))
    except Exception as e:  # e.g. an adapter for another architecture: shape or module-name mismatch
        raise AdapterError(f"{source.dir}: the adapter does not load onto {base_path}: {e}") from None
    # safe_merge checks every merged weight for NaN/inf before keeping it. Loading and writing the weights have
    # transformers' own bars; the merge (seconds to a minute for a 7B on a CPU) has peft's, on a terminal.
    merged = model.merge_and_unload(safe_merge=True, progressbar=sys.stderr.isatty())
    merged.eval()
    if merged.generation_config is not None and merged.generation_config.eos_token_id is None:
        merged.generation_config.eos_token_id = tokenizer.eos_token_id  # the model must stop (huggingface/trl#1623)
    return merged, tokenizer, source.meta, base_path


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
    _check_shard_size(max_shard_size)
    source = read_source(adapter_dir)  # fail on a bad adapter before the slow part
    adapter_fp = adapter_fingerprint(adapter_dir)
    refuse_existing(out_dir, adapter_fp)
    model, tokenizer, meta, base_path = merged_model(source, dtype=dtype, into_quantized=into_quantized)
    record = {
        "kind": "merged-model",
        "base": meta.base,
        "adapter": str(adapter_dir.resolve()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "into_quantized": into_quantized,
        "merges": [
            *_previous_merges(base_path),
            {"adapter": str(adapter_dir.resolve()), "adapter_fingerprint": adapter_fp, "base": meta.base},
        ],
        "versions": meta.raw.get("versions", {}),
    }
    with staged(out_dir) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_model_card(source, record))
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


_SHARD_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*[KMGT]B\s*", re.IGNORECASE)  # what transformers reads


def _check_shard_size(size: str | int) -> None:
    """Refuse a --max-shard-size transformers cannot read (it would fail after the merge), or one of zero."""
    match = _SHARD_SIZE.fullmatch(str(size))
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return
    if not match or not float(match.group(1)) > 0:
        raise ExportError(f"--max-shard-size must be a positive size such as 2GB or 500MB, got {size!r}")


def _model_card(source: Source, record: dict[str, Any]) -> str:
    meta, cfg = source.meta.raw, source.meta.raw["config"]
    name = source.name
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in source.meta.metrics.items() if isinstance(v, int | float))
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
