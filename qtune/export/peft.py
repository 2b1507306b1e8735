"""The adapter alone, cleaned for serving engines that load LoRA adapters (vLLM, TGI): `qtune export --format peft`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from qtune.errors import ExportError
from qtune.export.merge import Source, read_source, refuse_existing, staged
from qtune.meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qtune.models import HUB_IDS

# Serving engines that refuse an adapter carrying full embedding / lm_head weights (vllm-project/vllm#9280).
ENGINES_REJECTING_FULL_MODULES = "vLLM (only LoRA weights; a new vocabulary through lora_extra_vocab_size), TGI"

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
    source = read_source(adapter_dir)
    config, tensors = source.config, source.tensors
    refuse_existing(out_dir)
    if config.get("use_dora"):
        raise ExportError(f"{adapter_dir} is a DoRA adapter, which vLLM and TGI do not serve: use `qtune merge`")
    if config.get("bias", "none") != "none":
        raise ExportError(f"{adapter_dir}: bias={config['bias']!r} adapters are not served by vLLM: use `qtune merge`")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError(f"{adapter_dir}: per-module rank_pattern/alpha_pattern is not served by vLLM")
    _ = source.base_path  # refuse an adapter of another base before anything is written
    keep = {k: v for k, v in tensors.items() if ".lora_" in k}
    modules_to_save = []
    for module in config.get("modules_to_save") or []:
        full = {k: v for k, v in tensors.items() if f".{module}." in k and ".lora_" not in k}
        if full and _keep_full_module(source, module, full):
            keep.update(full)
            modules_to_save.append(module)
    clean = {k: config.get(k) for k in _PEFT_KEYS if k in config}
    clean.update(
        base_model_name_or_path=HUB_IDS.get(source.meta.base.get("name"), source.meta.base.get("name")),
        target_modules=sorted(_lora_modules(keep)),
        modules_to_save=modules_to_save or None,
        lora_dropout=0.0,
        inference_mode=True,
    )
    from safetensors.torch import save_file

    with staged(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in keep.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(clean, indent=2) + "\n")
    return out_dir


def _lora_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The short names (q_proj, ...) of the modules that carry LoRA tensors."""
    return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k}


def _keep_full_module(source: Source, module: str, full: dict[str, torch.Tensor]) -> bool:
    """Whether a modules_to_save entry must stay in a serving export (see export_peft)."""
    if module.rsplit(".", 1)[-1] not in _VOCAB_MODULES:
        raise ExportError(
            f"{source.dir}: `{module}` is trained in full (modules_to_save); serving engines load LoRA "
            "weights only: use `qtune merge` and serve the merged model"
        )
    vocab = source.base_config.vocab_size
    rows = {v.shape[0] for v in full.values()}
    if rows != {vocab}:
        warnings.warn(
            f"{source.dir}: `{module}` has {sorted(rows)} rows but the base vocabulary has {vocab}: the vocabulary "
            f"changed, so its full weights stay in the export; {ENGINES_REJECTING_FULL_MODULES} reject such "
            "adapters: serve a `qtune merge` output there",
            UserWarning,
            stacklevel=3,
        )
        return True
    base = _base_tensors(source.base_path)
    short = module.rsplit(".", 1)[-1]
    matches = [v for k, v in base.items() if k.endswith(f"{short}.weight")]
    tied = [v for k, v in base.items() if k.endswith("embed_tokens.weight")]  # a tied lm_head is the embedding
    base_weight = (matches or tied or [None])[0]
    if all(base_weight is not None and torch.equal(v.to(base_weight.dtype), base_weight) for v in full.values()):
        return False  # an untouched copy of the base's: dropping it changes nothing
    raise ExportError(
        f"{source.dir}: `{module}` was trained in full with the base's vocabulary; "
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
