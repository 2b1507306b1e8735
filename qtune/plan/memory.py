"""The memory model of a QLoRA / LoRA run: bytes per component, from the architecture and the run's settings.

Weights are exact (qtune.plan.arch); activations, logits and LoRA copies model what autograd keeps alive
on qtune's stack (transformers + PEFT + trl, non-reentrant checkpointing, fused attention), calibrated
by counting the tensors autograd saves on tiny models (tests/test_plan.py). docs/plan.md has every formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtune.plan.arch import (
    DTYPE_BYTES,
    PlanError,
    _buffer_bytes,
    _linear_storage,
    _unquantized_params,
    linear_layers,
    quant_constant_bytes,
)

if TYPE_CHECKING:
    from qtune.plan.planner import PlanInput

MIB = 1 << 20

COMPONENTS = (
    "quantized weights",
    "16-bit weights",
    "quantization constants",
    "LoRA parameters",
    "LoRA gradients",
    "optimizer states",
    "activations",
    "logits and loss",
    "data-parallel buffers",
    "CUDA context and allocator headroom",
)
CUDA_CONTEXT = 512 * MIB  # CUDA context, cuBLAS workspace and kernels: outside torch's allocator
ALLOCATOR_HEADROOM = 0.10  # caching-allocator fragmentation: reserved over allocated


def _targets(arch: dict, targets: str | list[str]) -> list[tuple[str, int, int, bool]]:
    """The adapted linears of one decoder layer (plus lm_head as ('lm_head', h, V, False))."""
    layer = linear_layers(arch)
    if targets == "all-linear":  # PEFT's all-linear: every linear but the output layer
        return layer
    names = {name for name, *_ in layer}
    wanted = {t.rsplit(".", 1)[-1] for t in targets}
    unknown = sorted(wanted - names - {"lm_head"})
    if unknown:
        raise PlanError(
            f"--targets: no module named {', '.join(unknown)} in {arch['name']} ({arch['model_type']}); "
            f"choose from all-linear, {', '.join(sorted(names))}, lm_head"
        )
    chosen = [lin for lin in layer if lin[0] in wanted]
    if "lm_head" in wanted:
        chosen.append(("lm_head", arch["hidden_size"], arch["vocab_size"], False))
    return chosen


def _lora_tensors(arch: dict, inp: PlanInput) -> list[int]:
    """Element counts of every LoRA tensor: A is r x in, B is out x r, per adapted linear."""
    sizes = []
    for name, fan_in, fan_out, _ in _targets(arch, inp.targets):
        copies = 1 if name == "lm_head" else arch["num_hidden_layers"]
        sizes += [inp.lora_r * fan_in, fan_out * inp.lora_r] * copies
    return sizes


def _optimizer_bytes(sizes: list[int], optim: str) -> int:
    if optim == "adamw":
        return 8 * sum(sizes)  # exp_avg and exp_avg_sq, fp32
    # bitsandbytes 8-bit Adam: two uint8 states + one fp32 absmax per 256 values each, but only
    # for tensors of >= 4096 values (min_8bit_size); smaller ones keep fp32 states.
    return sum(2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n for n in sizes)


def _layer_activations(arch: dict, inp: PlanInput, upcast: bool) -> int:
    """Bytes autograd keeps for one decoder layer of one micro-batch, without checkpointing.

    The published rule of thumb (Korthikanti et al. 2022) is 34*h bytes per token per layer for
    a 16-bit GPT block with fused attention (its 4h MLP, dropout masks). QLoRA on HF+PEFT keeps
    a different set, spelled out below; it matches the tensors autograd saves on tiny models
    (tests/test_plan.py counts them):

    - each RMSNorm keeps an fp32 copy of its input (4h) and its rsqrt (4);
    - each adapted linear keeps its own 16-bit copy of its input: PEFT casts the input to the
      fp32 LoRA weight dtype and autocast casts it back, so q, k and v keep three copies (2*in
      each), plus the r-wide output of lora_A for lora_B (2r). Frozen 4-bit matmuls keep nothing;
    - fused attention (SDPA, flash) keeps q, k, v, its output (2 bytes each; k and v at the kv
      width under GQA, at full width in a padded batch, where transformers repeats them to pass a
      mask, and the kernel then also keeps a 16-bit additive copy of the b*s*s mask) and an fp32
      logsumexp per head. Gemma-2 runs eager attention (SDPA cannot soft-cap): q, k, v at full
      width plus three b*heads*s*s score tensors (16-bit scores, fp32 softmax, 16-bit probs);
    - the MLP keeps the gate and up outputs and the activation's output (3*i values). After
      prepare_model_for_kbit_training the residual stream is fp32 (embeddings were upcast) and
      the 4-bit matmul runs outside autocast, so these are fp32 (4 bytes) instead of 2.
    For Llama-2-7B this is ~66*h per token with k-bit preparation and ~50*h without, not 34*h.
    """
    h, i = arch["hidden_size"], arch["intermediate_size"]
    heads, hd = arch["num_attention_heads"], arch["head_dim"]
    seq, batch, tokens = inp.seq, inp.batch, inp.seq * inp.batch
    q_width, kv_width = heads * hd, arch["num_key_value_heads"] * hd
    cb = DTYPE_BYTES[inp.dtype]
    autocast = inp.dtype != "fp32"
    padded = batch > 1  # plan for the worst case: a micro-batch with padding needs a mask
    norms = (4 if arch["model_type"] == "gemma2" else 2) * (4 * h + 4)
    if arch["model_type"] == "gemma2":  # eager attention
        attention = tokens * cb * 3 * q_width + batch * heads * seq * seq * (4 + 2 * cb)
        attention += 4 * 4 * h  # each Gemma norm also keeps (1 + weight) in fp32
    else:
        width = q_width if padded else kv_width
        attention = tokens * (cb * (2 * q_width + 2 * width) + 4 * heads)
        attention += batch * seq * seq * cb if padded else 0
    mlp = 3 * (4 if upcast else cb) * i
    adapted = [t for t in _targets(arch, inp.targets) if t[0] != "lm_head"]
    lora = len(adapted) * cb * inp.lora_r
    if autocast:
        lora += cb * sum(fan_in for _, fan_in, _, _ in adapted)
    else:  # fp32: no casts, lora_A keeps its input tensor itself, which q, k and v share
        lora += 4 * sum(_distinct_inputs(adapted))
    return tokens * (norms + mlp + lora) + attention


def _distinct_inputs(adapted: list[tuple[str, int, int, bool]]) -> list[int]:
    """Widths of the distinct input tensors of the adapted linears, in fp32 (no autocast copies).
    o_proj's input is the attention output the kernel already keeps, so it adds nothing."""
    groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "qkv_proj": "attn"}
    groups |= {"gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp"}
    seen: dict[str, int] = {}
    for name, fan_in, _, _ in adapted:
        if name != "o_proj":
            seen.setdefault(groups.get(name, name), fan_in)
    return list(seen.values())


def _breakdown(arch: dict, inp: PlanInput) -> tuple[dict[str, int], int]:
    h, v, layers = arch["hidden_size"], arch["vocab_size"], arch["num_hidden_layers"]
    tokens = inp.seq * inp.batch
    cb = DTYPE_BYTES[inp.dtype]
    autocast = inp.dtype != "fp32"
    quantized = inp.quant != "none"
    # peft's prepare_model_for_kbit_training (not qtune's path; see PlanInput.upcast_kbit) casts a quantized
    # base's embeddings, lm_head, norms and biases to fp32 (buffers are not parameters and stay as loaded).
    upcast = quantized and inp.upcast_kbit
    # Checkpointed decoder layers (0, k, 2k, ...) keep only their input; the others keep everything. Backward runs
    # top down, freeing each layer's activations as it goes, and recomputes a checkpointed layer in full only when
    # it gets there: the peak is all non-checkpointed layers, or, if the last layer is checkpointed, those plus its
    # recomputation (with every layer checkpointed: one layer).
    checkpointed = -(-layers // inp.checkpoint_every) if inp.gradient_checkpointing else 0
    last_recomputed = checkpointed and (layers - 1) % inp.checkpoint_every == 0
    kept = layers - checkpointed + (1 if last_recomputed else 0)

    unquantized = _unquantized_params(arch) * (4 if upcast else cb) + _buffer_bytes(arch, inp.dtype)
    if quantized:
        linear_q, linear_16 = _linear_storage(arch, inp.quant, inp.dtype), 0
    else:
        linear_q, linear_16 = 0, _linear_storage(arch, "none", inp.dtype)

    sizes = _lora_tensors(arch, inp)
    lora_params = sum(sizes)
    # PEFT keeps adapters in fp32 even on a 16-bit base (autocast_adapter_dtype). Under autocast
    # each forward makes a 16-bit copy of every LoRA weight and autograd keeps it until backward;
    # with checkpointing only the layers that are not checkpointed and the one being recomputed hold theirs.
    lora_copies = 0
    if autocast:
        lora_copies = cb * (lora_params if not checkpointed else lora_params // layers * kept)

    per_layer = _layer_activations(arch, inp, upcast)
    # Non-reentrant checkpointing keeps each checkpointed layer's input (the residual stream: fp32 after
    # k-bit preparation, else 16-bit) and recomputes one layer at a time in backward.
    activations = tokens * checkpointed * (4 if upcast else cb) * h + kept * per_layer
    rope = 2 * arch["head_dim"] * (4 if upcast else cb) * inp.seq  # cos and sin, shared by layers
    final_norm = tokens * (4 * h + 4)
    if any(name == "lm_head" for name, *_ in _targets(arch, inp.targets)):
        final_norm += tokens * cb * (h + inp.lora_r)  # a LoRA on lm_head keeps its input copy too
    mask = inp.batch * inp.seq * inp.seq if inp.batch > 1 else 0  # padded batch: a bool (b,1,s,s) mask
    activations += rope + final_norm + mask

    # Logits, conservatively for every position (trl projects all of them unless a chunked or
    # fused loss is used): transformers upcasts them to fp32, log_softmax keeps its fp32 output
    # for backward, and backward holds two fp32 gradients of the same size: 12 bytes per
    # position per vocabulary entry (the common "s*V*4" estimate is the first of these three).
    logits = tokens * v * 12
    if arch.get("final_logit_softcapping"):
        logits += tokens * v * cb  # tanh(logits / cap) keeps its 16-bit output
    if upcast and autocast:
        logits += v * h * cb  # the fp32 lm_head weight's 16-bit autocast copy, kept for backward

    parts = {
        "quantized weights": linear_q,
        "16-bit weights": unquantized + linear_16,
        "quantization constants": quant_constant_bytes(arch, inp.quant, inp.double_quant),
        "LoRA parameters": 4 * lora_params + lora_copies,
        "LoRA gradients": 4 * lora_params,
        "optimizer states": _optimizer_bytes(sizes, inp.optim),
        "activations": activations,
        "logits and loss": logits,
    }
    parts["data-parallel buffers"] = 0
    if inp.gpus > 1 and inp.sharding == "ddp":
        parts["data-parallel buffers"] = 4 * lora_params  # DDP's gradient buckets: a second copy of the gradients
    elif inp.gpus > 1:
        # FSDP: weights, gradients and optimizer states are split over the GPUs; in forward and backward
        # the root unit (embeddings, lm_head, final norm: unquantized) and up to two decoder layers
        # (the one computing, the one prefetched) are all-gathered in full.
        layer_unit = (linear_q + linear_16 + parts["quantization constants"] + 4 * lora_params) // layers
        for key in COMPONENTS[:6]:
            parts[key] = -(-parts[key] // inp.gpus)
        parts["data-parallel buffers"] = unquantized + 2 * layer_unit
    parts["CUDA context and allocator headroom"] = CUDA_CONTEXT + int(ALLOCATOR_HEADROOM * sum(parts.values()))
    return parts, lora_params


def _total(arch: dict, inp: PlanInput) -> int:
    return sum(_breakdown(arch, inp)[0].values())
