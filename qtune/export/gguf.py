"""GGUF exports for llama.cpp and Ollama: the merged model (f16 / q8_0) and the adapter alone (LoRA GGUF).

Written with the `gguf` package's GGUFWriter and tensor-name map. Supported architectures:
llama (SmolLM2, Llama 2/3 without rope scaling, Mistral) and qwen2; others are refused by name.
Outputs are staged and renamed into place like every export (qtune.atomic).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from qtune.errors import ExportError
from qtune.export.merge import merged_model, read_source, refuse_existing, staged

GGUF_TYPES = ("f16", "q8_0")
_PEFT_PREFIX = "base_model.model."  # where peft puts the base model's module names
# HF model_type -> the gguf package's architecture name. Others are refused with their model_type named.
GGUF_ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}


# ---------------------------------------------------------------- GGUF: shared parts


def _gguf_arch(config) -> Any:
    """The gguf MODEL_ARCH for a transformers config, or a clear refusal naming its model_type."""
    import gguf

    model_type = config.model_type
    if model_type not in GGUF_ARCHS:
        raise ExportError(
            f"GGUF export supports model_type {', '.join(GGUF_ARCHS)}; this base is {model_type!r}: "
            "use `qtune merge` and llama.cpp's convert_hf_to_gguf.py"
        )
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ExportError("GGUF export of llama models with attention_bias/mlp_bias is not supported")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(
            f"GGUF export does not write rope scaling ({rope.get('rope_type')!r}) yet: "
            "use `qtune merge` and llama.cpp's convert_hf_to_gguf.py"
        )
    return getattr(gguf.MODEL_ARCH, GGUF_ARCHS[model_type])


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for llama's Q/K projections (rotary halves interleaved per head).

    The inverse of transformers' `LlamaTensorProcessor._reverse_permute_weights`; for k_proj pass
    the number of key/value heads. Applies to any matrix whose rows are Q/K outputs (weights, lora_B).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _permute_for(config, hf_name: str, weight: torch.Tensor) -> torch.Tensor:
    if config.model_type != "llama":
        return weight  # qwen2 uses the rotary layout llama.cpp expects
    if ".q_proj." in hf_name:
        return permute_qk(weight, config.num_attention_heads)
    if ".k_proj." in hf_name:
        return permute_qk(weight, config.num_key_value_heads)
    return weight


def _gguf_name(tensor_map, hf_name: str) -> str:
    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"no GGUF name for tensor {hf_name!r}: this model layout is not supported")
    return name


# ---------------------------------------------------------------- GGUF: the merged model


def export_gguf(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    qtype: Literal["f16", "q8_0"] = "f16",
    dtype: str | None = None,
) -> Path:
    """Merge base + adapter and write `out_dir/<name>-<qtype>.gguf` and an Ollama `Modelfile`, atomically.

    Tensors are converted and written one at a time (the file's header is planned from shapes first),
    so the peak is the merged model plus one tensor. 1-D tensors (norms, biases) stay f32, as
    llama.cpp's converter keeps them; q8_0 falls back to f16 for a matrix whose rows are not a
    multiple of 32.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if qtype not in GGUF_TYPES:
        raise ExportError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    source = read_source(adapter_dir)
    refuse_existing(out_dir)
    _gguf_arch(source.base_config)  # refuse early, before the merge
    model, tokenizer, meta, _ = merged_model(source, dtype=dtype)
    name = source.name
    file_name = f"{name}-{qtype}.gguf"
    with staged(out_dir) as tmp:
        write_gguf(model, tokenizer, tmp / file_name, qtype=qtype, name=name)
        (tmp / "Modelfile").write_text(ollama_modelfile(file_name, tokenizer, meta.config.data.system_prompt))
    return out_dir


def write_gguf(model, tokenizer, path: Path, *, qtype: str = "f16", name: str = "model") -> Path:
    """Write a transformers llama/qwen2 causal LM and its tokenizer as one GGUF file."""
    import gguf

    config = model.config
    arch = _gguf_arch(config)
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when `output` is absent
    plan = [(hf, _gguf_name(tensor_map, hf), _storage(t.shape, qtype)) for hf, t in state.items()]

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    _add_model_metadata(writer, config, qtype, name)
    _add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
    for _, gguf_name, (shape, np_dtype, nbytes, raw) in plan:
        writer.add_tensor_info(gguf_name, shape, np_dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Converting and writing a 7B takes minutes (q8_0 quantizes on the CPU): a bar in bytes written, with an ETA.
    total = sum(nbytes for _, _, (_, _, nbytes, _) in plan)
    try:
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", leave=False, disable=None
        ) as bar:
            for hf, _, (_, np_dtype, nbytes, raw) in plan:
                weight = _permute_for(config, hf, state[hf].detach().to(torch.float32)).numpy()
                if raw is not None:
                    writer.write_tensor_data(gguf.quants.quantize(weight, raw))
                else:
                    writer.write_tensor_data(weight.astype(np_dtype))
                bar.update(nbytes)
    finally:
        writer.close()
    return path


def _storage(shape: torch.Size, qtype: str):
    """(numpy shape, numpy dtype, bytes, raw GGML type or None) of one tensor in the file."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    count = math.prod(shape)
    if len(shape) < 2:
        return tuple(shape), np.float32, 4 * count, None
    if qtype == "q8_0" and shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
        byte_shape = (*shape[:-1], shape[-1] // block * block_bytes)
        return byte_shape, np.uint8, math.prod(byte_shape), GGMLQuantizationType.Q8_0
    return tuple(shape), np.float16, 2 * count, None


def _add_model_metadata(writer, config, qtype: str, name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if qtype == "q8_0":
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    else:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _pre_tokenizer_name(backend: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE, read off its pre-tokenizer.

    llama.cpp's converter identifies it by hashing a probe text's token ids against a list it keeps;
    this reads the same families from the pre-tokenizer's parts instead.
    """
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    if any(p.get("type") == "Digits" for p in parts):
        return "smollm"  # SmolLM / SmolLM2: single digits, then byte-level
    patterns = [p.get("pattern", {}).get("Regex") or "" for p in parts if p.get("type") == "Split"]
    if any("\\p{N}{1,3}" in p for p in patterns):
        return "llama-bpe"  # Llama 3
    if any("\\p{N}" in p for p in patterns):
        return "qwen2"
    return "gpt-2"


def _add_tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp reads it: a byte-level BPE ("gpt2"), tokens, types, merges, special ids."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {backend['model']['type']} "
            f"({type(tokenizer).__name__}): use llama.cpp's convert_hf_to_gguf.py"
        )
    added = tokenizer.added_tokens_decoder
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer: llama.cpp's converter names them [PADi]
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.NORMAL
                if i not in added
                else (gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token is not None:
            add(token)
    sample = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and sample[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and sample[-1:] == [tokenizer.eos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


_OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def ollama_modelfile(gguf_name: str, tokenizer, system_prompt: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF: ChatML templates converted to Ollama's Go template, others noted."""
    lines = ["# ollama create NAME -f Modelfile   (written by qtune export)", f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{_OLLAMA_CHATML}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    else:
        lines.append("# The chat template is not ChatML, so it is not converted to Ollama's Go template here;")
        lines.append("# Ollama reads tokenizer.chat_template from the GGUF for the templates it knows. The jinja:")
        lines.extend(f"#   {line}" for line in template.splitlines() or ["(none)"])
        if tokenizer.eos_token:
            lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')  # the system prompt the adapter was trained with
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- GGUF: the adapter alone


def export_gguf_lora(adapter_dir: str | Path, out_file: str | Path) -> Path:
    """Write the adapter as a llama.cpp LoRA-adapter GGUF, atomically (llama.cpp's convert_lora_to_gguf layout).

    general.type "adapter", adapter.type "lora", adapter.lora.alpha; per adapted matrix
    `<gguf name>.weight.lora_a` (r x in) and `.lora_b` (out x r), f32. llama's Q/K rows are permuted
    in lora_b exactly as in the base weights, so `lora_b @ lora_a * alpha / r` is the delta of the
    GGUF base tensor. rsLoRA is written as alpha * sqrt(r), since llama.cpp scales by alpha / r.
    """
    import gguf

    adapter_dir, out_file = Path(adapter_dir), Path(out_file)
    source = read_source(adapter_dir)
    config, tensors = source.config, source.tensors
    refuse_existing(out_file, folder=False)
    base_config = source.base_config
    arch = _gguf_arch(base_config)
    for problem, flag in (
        (config.get("use_dora"), "DoRA"),
        (config.get("modules_to_save"), "modules_to_save (full weights)"),
        (config.get("rank_pattern") or config.get("alpha_pattern"), "rank_pattern/alpha_pattern"),
        (any("lora_embedding" in k for k in tensors), "LoRA on embeddings"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r}"),
    ):
        if problem:
            raise ExportError(f"{adapter_dir}: llama.cpp LoRA adapters cannot carry {flag}: use `qtune merge`")
    alpha = float(config["lora_alpha"]) * (math.sqrt(config["r"]) if config.get("use_rslora") else 1.0)
    tensor_map = gguf.get_tensor_name_map(arch, base_config.num_hidden_layers)
    pairs = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
        if module == "lm_head" and base_config.tie_word_embeddings:
            raise ExportError(f"{adapter_dir}: LoRA on a tied lm_head cannot be applied by llama.cpp")
        lora_a = tensors[key].to(torch.float32)
        lora_b = tensors[key.replace(".lora_A.", ".lora_B.")].to(torch.float32)
        name = _gguf_name(tensor_map, module + ".weight")
        pairs.append((name, lora_a, _permute_for(base_config, f".{module}.", lora_b)))

    with staged(out_file, folder=False) as tmp:
        writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(source.name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, lora_a, lora_b in pairs:
            writer.add_tensor(f"{name}.lora_a", lora_a.contiguous().numpy())
            writer.add_tensor(f"{name}.lora_b", lora_b.contiguous().numpy())
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_file
