"""Model architectures from config alone, and the exact bytes their weights take under bitsandbytes.

`load_arch` reads a built-in table, a local config.json or (where reachable) a hub config.json;
`weight_bytes` equals `model.get_memory_footprint()` of the loaded model to the byte, and
`quant_constant_bytes` is the quantization state bitsandbytes keeps beside it. qtune.plan
builds the whole-run memory plan on these.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qtune.errors import PlanError  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------------------------
# Architectures

# The fields that size memory, from each model's config.json on the Hugging Face hub:
# model_type, hidden, intermediate, layers, heads, kv heads, head_dim (None: hidden / heads),
# vocab, tied embeddings, trained context.
_TABLE = {
    "llama-2-7b": ("llama", 4096, 11008, 32, 32, 32, None, 32000, False, 4096),
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, None, 128256, False, 131072),
    "mistral-7b": ("mistral", 4096, 14336, 32, 32, 8, None, 32000, False, 32768),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, None, 152064, False, 131072),  # q, k, v biases
    "gemma-2-9b": ("gemma2", 3584, 14336, 42, 16, 8, 256, 256000, True, 8192),  # 4 norms, soft-capped logits
    "phi-3-mini": ("phi3", 3072, 8192, 32, 32, 32, None, 32064, False, 4096),  # fused qkv and gate_up
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 64, 49152, True, 8192),
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json
    "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128, 128256, True, 131072),
    # https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json (q/k norms: planned as llama-like)
    "qwen3-8b": ("qwen3", 4096, 12288, 36, 32, 8, 128, 151936, False, 40960),
    # https://huggingface.co/google/gemma-3-1b-pt/blob/main/config.json (text-only; the 4B+ are multimodal)
    "gemma-3-1b": ("gemma3_text", 1152, 6912, 26, 4, 1, 256, 262144, True, 32768),
    "smollm2-1.7b": ("llama", 2048, 8192, 24, 32, 32, None, 49152, True, 8192),
}
_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
)
BUILTIN: dict[str, dict] = {name: {k: v for k, v in zip(_FIELDS, row) if v is not None} for name, row in _TABLE.items()}

# Hub ids (any case) that name a built-in architecture; instruct/chat variants share the shapes.
ALIASES: dict[str, str] = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-2-7b": "llama-2-7b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistralai/mistral-7b-v0.1": "mistral-7b",
    "mistralai/mistral-7b-instruct-v0.1": "mistral-7b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "google/gemma-2-9b": "gemma-2-9b",
    "google/gemma-2-9b-it": "gemma-2-9b",
    "microsoft/phi-3-mini-4k-instruct": "phi-3-mini",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-1.7b": "smollm2-1.7b",
    "huggingfacetb/smollm2-1.7b-instruct": "smollm2-1.7b",
    "meta-llama/llama-3.2-3b": "llama-3.2-3b",
    "meta-llama/llama-3.2-3b-instruct": "llama-3.2-3b",
    "mistralai/mistral-7b-instruct-v0.2": "mistral-7b",
    "qwen/qwen3-8b": "qwen3-8b",
    "qwen/qwen3-8b-base": "qwen3-8b",
    "google/gemma-3-1b-pt": "gemma-3-1b",
    "google/gemma-3-1b-it": "gemma-3-1b",
}

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "gemma2", "phi3")
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _normalize(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The fields the planner needs, with each model type's defaults filled in, or a PlanError."""
    if "text_config" in config and "hidden_size" not in config:
        raise PlanError(f"--model {name}: a multimodal config (text_config); point --model at a text-only model")
    moe = [k for k in _MOE_KEYS if config.get(k)]
    if moe:
        raise PlanError(f"--model {name}: mixture-of-experts models ({moe[0]}) are not supported by the planner")
    model_type = str(config.get("model_type", ""))
    missing = [k for k in _REQUIRED if not isinstance(config.get(k), int) or isinstance(config.get(k), bool)]
    if missing:
        raise PlanError(
            f"--model {name}: config of model_type {model_type!r} has no integer {', '.join(missing)}; "
            f"the planner supports {', '.join(SUPPORTED_TYPES)} and llama-like decoders with those fields"
        )
    for key in _REQUIRED:
        if config[key] <= 0:
            raise PlanError(f"--model {name}: {key} must be positive, got {config[key]}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise PlanError(
            f"--model {name}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    gemma = model_type.startswith("gemma")
    return {
        "name": name,
        "model_type": model_type,
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab_size": config["vocab_size"],
        # transformers' per-type defaults when the file leaves it out: Gemma ties, the others do not.
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", gemma)),
        "qkv_bias": model_type == "qwen2" or bool(config.get("attention_bias", False)),
        "o_bias": model_type != "qwen2" and bool(config.get("attention_bias", False)),
        "mlp_bias": bool(config.get("mlp_bias", False)),
        "partial_rotary_factor": float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0),
        "final_logit_softcapping": config.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "llama_like": model_type in SUPPORTED_TYPES,
    }


def load_arch(model: str) -> dict:
    """The architecture of `model`: a built-in name or alias, a local folder, or a hub id.

    Only `config.json` is read (from the folder, or fetched from the hub when online or cached).

    Raises:
        PlanError: the model is unknown, or its config is not a supported decoder.
    """
    key = str(model).strip()
    builtin = key.lower() if key.lower() in BUILTIN else ALIASES.get(key.lower())
    if builtin:
        return _normalize(dict(BUILTIN[builtin]), builtin)
    path = Path(key).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise PlanError(f"--model {key}: the folder has no config.json; point it at a Hugging Face model folder")
        return _normalize(_read_json(file, key), key)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", key):
        try:
            from huggingface_hub import hf_hub_download

            return _normalize(_read_json(Path(hf_hub_download(key, "config.json")), key), key)
        except PlanError:
            raise
        except Exception as e:  # offline, gated, missing: the user's fix is the same
            why = f"the hub is not reachable ({type(e).__name__})"
    else:
        why = "and not a hub id like org/name"
    raise PlanError(
        f"--model: unknown architecture {key!r}: not built in ({', '.join(BUILTIN)}), "
        f"not a folder with config.json, {why}"
    )


def _read_json(file: Path, name: str) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError(f"--model {name}: cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise PlanError(f"--model {name}: {file} is not a JSON object")
    return data


def linear_layers(arch: dict) -> list[tuple[str, int, int, bool]]:
    """The linear layers of one decoder layer as (name, in_features, out_features, has_bias)."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    q = arch["num_attention_heads"] * arch["head_dim"]
    kv = arch["num_key_value_heads"] * arch["head_dim"]
    qkv_b, o_b, mlp_b = arch["qkv_bias"], arch["o_bias"], arch["mlp_bias"]
    if arch["model_type"] == "phi3":  # q, k, v in one matrix; gate and up in one matrix
        return [
            ("qkv_proj", h, q + 2 * kv, qkv_b),
            ("o_proj", q, h, o_b),
            ("gate_up_proj", h, 2 * i, mlp_b),
            ("down_proj", i, h, mlp_b),
        ]
    return [
        ("q_proj", h, q, qkv_b),
        ("k_proj", h, kv, qkv_b),
        ("v_proj", h, kv, qkv_b),
        ("o_proj", q, h, o_b),
        ("gate_proj", h, i, mlp_b),
        ("up_proj", h, i, mlp_b),
        ("down_proj", i, h, mlp_b),
    ]


# --------------------------------------------------------------------------------------------
# Weights: exact bytes

QUANTS = ("nf4", "fp4", "int8", "none")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
BLOCKSIZE = 64  # bitsandbytes' 4-bit block; transformers' BitsAndBytesConfig does not expose it
NESTED_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 8-bit absmax values


def _check_weights_args(quant: str, dtype: str) -> None:
    if quant not in QUANTS:
        raise PlanError(f"--quant must be one of {', '.join(QUANTS)}; got {quant!r}")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}; got {dtype!r}")


def _unquantized_params(arch: dict) -> int:
    """Parameters bitsandbytes leaves alone: embeddings, lm_head (unless tied), norms, biases."""
    h, v, layers = arch["hidden_size"], arch["vocab_size"], arch["num_hidden_layers"]
    norms_per_layer = 4 if arch["model_type"] == "gemma2" else 2  # gemma2: pre/post attention and MLP
    biases = sum(out for _, _, out, bias in linear_layers(arch) if bias)
    lm_head = 0 if arch["tie_word_embeddings"] else v * h
    return v * h + lm_head + (norms_per_layer * layers + 1) * h + layers * biases


def _buffer_bytes(arch: dict, dtype: str) -> int:
    """Buffers get_memory_footprint counts: the rotary inv_freq and original_inv_freq (fp32, kept
    fp32 whatever the load dtype) and Gemma's embedding scale (a scalar in the load dtype)."""
    rotary_dim = int(arch["head_dim"] * arch["partial_rotary_factor"])
    inv_freq = (rotary_dim + 1) // 2  # torch.arange(0, dim, 2)
    scale = DTYPE_BYTES[dtype] if arch["model_type"].startswith("gemma") else 0
    return 2 * inv_freq * 4 + scale


def _linear_storage(arch: dict, quant: str, dtype: str) -> int:
    """Bytes of the linear weights as stored: packed 4-bit (two per uint8), int8, or the dtype."""
    sizes = [i * o for _, i, o, _ in linear_layers(arch)]
    if quant in ("nf4", "fp4"):
        per_layer = sum((n + 1) // 2 for n in sizes)
    elif quant == "int8":
        per_layer = sum(sizes)
    else:
        per_layer = sum(sizes) * DTYPE_BYTES[dtype]
    return arch["num_hidden_layers"] * per_layer


def weight_bytes(arch: dict, quant: str, double_quant: bool, dtype: str) -> int:
    """Exactly what `model.get_memory_footprint()` reports once transformers + bitsandbytes load it.

    get_memory_footprint sums `parameters()` and `buffers()`. For a 4-bit model a linear weight
    is a uint8 tensor of ceil(n/2) bytes, and its block constants live in a `quant_state`
    attribute, not a parameter or buffer, so they are NOT counted (and `double_quant` changes
    nothing here). For int8 the per-row scales (`SCB`) are attributes too. The true storage
    adds `quant_constant_bytes`. Tied embeddings are counted once.

    Raises:
        PlanError: an unknown quant or dtype.
    """
    _check_weights_args(quant, dtype)
    del double_quant  # not visible to get_memory_footprint; see quant_constant_bytes
    ds = DTYPE_BYTES[dtype]
    return _linear_storage(arch, quant, dtype) + _unquantized_params(arch) * ds + _buffer_bytes(arch, dtype)


def quant_constant_bytes(arch: dict, quant: str, double_quant: bool) -> int:
    """Bytes of the quantization constants get_memory_footprint leaves out (measured layout of
    bitsandbytes 0.50, per linear weight of n values):

    - 4-bit: one fp32 absmax per 64 values, plus the 16-entry fp32 code table (64 B);
    - 4-bit with double quantization: the absmax as uint8 (1 B per block), the code table,
      a fp32 offset (4 B), one fp32 scale per 256 blocks, and the 256-entry fp32 code of the
      nested 8-bit quantization (1024 B);
    - int8: one fp32 scale per output row (SCB);
    - none: nothing.
    """
    _check_weights_args(quant, "bf16")
    total = 0
    for _, fan_in, fan_out, _ in linear_layers(arch):
        n = fan_in * fan_out
        blocks = -(-n // BLOCKSIZE)
        if quant in ("nf4", "fp4"):
            if double_quant:
                total += blocks + 64 + 4 + 4 * -(-blocks // NESTED_BLOCKSIZE) + 1024
            else:
                total += 4 * blocks + 64
        elif quant == "int8":
            total += 4 * fan_out
    return arch["num_hidden_layers"] * total
