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
from qtune.plan.methods import generation_bytes, reference_adapter, training_input

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
    "KV cache",
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


# bitsandbytes 8-bit optimizers (bitsandbytes/optim/optimizer.py, 0.50): tensors of fewer than min_8bit_size values
# keep fp32 states; the others two uint8 states, each with one fp32 absmax per 256 values, and the optimizer moves
# its two 256-entry fp32 quantization maps to the GPU once. A paged optimizer allocates a state of >= 1e5 values in
# CUDA unified memory (cudaMallocManaged), outside torch's allocator; smaller ones and the absmax are ordinary tensors.
MIN_8BIT_SIZE = 4096
OPTIM_BLOCK = 256
QMAPS = 2 * 256 * 4
PAGED_MIN = 100_000


def _optimizer_bytes(sizes: list[int], optim: str, param_bytes: int = 4) -> tuple[int, int]:
    """(all optimizer-state bytes, the part a paged optimizer puts in unified memory)."""
    if optim == "adamw":
        return 2 * param_bytes * sum(sizes), 0  # exp_avg and exp_avg_sq in the weights' dtype (torch's AdamW)
    paged = optim.startswith("paged")
    total = managed = 0
    for n in sizes:
        if n < MIN_8BIT_SIZE:
            total += 8 * n
            managed += 8 * n if paged and n >= PAGED_MIN else 0
        else:
            total += 2 * n + 8 * -(-n // OPTIM_BLOCK)
            managed += 2 * n if paged and n >= PAGED_MIN else 0
    if any(n >= MIN_8BIT_SIZE for n in sizes):
        total += QMAPS
    return total, managed


def lora_bytes(inp: PlanInput) -> int:
    """Bytes per trained LoRA weight: PEFT makes them fp32; trl's trainers cast them to bf16 on a quantized base."""
    return DTYPE_BYTES[inp.lora_dtype]


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

    With 16-bit LoRA weights (trl casts them to bf16 on a quantized base) under autocast nothing is cast: the
    adapted linears keep their distinct 16-bit inputs, as without autocast. Without autocast and with 16-bit LoRA
    weights on fp32 activations, PEFT casts each adapted linear's input to 16-bit (2*in each).
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
    w = lora_bytes(inp)
    lora = len(adapted) * (cb if autocast else w) * inp.lora_r
    if autocast and w == 4:
        lora += cb * sum(fan_in for _, fan_in, _, _ in adapted)
    elif autocast or w == cb:  # no casts: lora_A keeps its input tensor itself, which q, k and v share
        lora += cb * sum(_distinct_inputs(adapted))
    else:  # fp32 activations, 16-bit LoRA weights: PEFT casts each adapted linear's input
        lora += w * sum(fan_in for _, fan_in, _, _ in adapted)
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


def _breakdown(arch: dict, inp: PlanInput) -> tuple[dict[str, int], int, int, dict[str, int]]:
    """(bytes per component at the run's peak, LoRA parameters, optimizer-state bytes a paged optimizer keeps in
    unified memory, {phase: total} when the run has phases that never coexist: GRPO's generation and training).

    The training phase is the method's micro-batch with grad (qtune.plan.methods.training_input). GRPO's
    generation phase holds no gradients (the trainer sets them to None after each optimizer step) and no autocast
    copies of the LoRA weights, but a KV cache (qtune.plan.methods.generation_bytes); the plan is the larger phase.
    """
    parts, lora_params, managed, persistent = _training_parts(arch, training_input(inp), reference_adapter(inp))
    if inp.method != "grpo":
        return _with_headroom(parts, managed), lora_params, managed, {}
    generation = dict(parts, **{"LoRA parameters": persistent, "LoRA gradients": 0})
    generation.update(generation_bytes(arch, inp, lora_bytes(inp)))
    parts, generation = _with_headroom(parts, managed), _with_headroom(generation, managed)
    phases = {"generation": sum(generation.values()), "training": sum(parts.values())}
    return (generation if phases["generation"] > phases["training"] else parts), lora_params, managed, phases


def _with_headroom(parts: dict[str, int], managed: int) -> dict[str, int]:
    # Paged states live in unified memory, outside torch's caching allocator: no allocator headroom on them.
    held = sum(v for k, v in parts.items() if k != "CUDA context and allocator headroom") - managed
    return {**parts, "CUDA context and allocator headroom": CUDA_CONTEXT + int(ALLOCATOR_HEADROOM * held)}


def _training_parts(arch: dict, inp: PlanInput, reference: bool) -> tuple[dict[str, int], int, int, int]:
    """(bytes per component of a micro-batch's forward and backward, before headroom; LoRA parameters; paged
    optimizer-state bytes; the LoRA weights' bytes without autocast copies). `reference`: trl's frozen fp32 copy
    of the adapter sits beside the trained one."""
    h, layers = arch["hidden_size"], arch["num_hidden_layers"]
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
    w = lora_bytes(inp)
    optimizer, managed = _optimizer_bytes(sizes, inp.optim, w)
    # PEFT keeps adapters in fp32 even on a 16-bit base (autocast_adapter_dtype). Under autocast
    # each forward makes a 16-bit copy of every LoRA weight and autograd keeps it until backward;
    # with checkpointing only the layers that are not checkpointed and the one being recomputed hold theirs.
    # (trl's bf16 cast on a quantized base leaves nothing to copy under bf16 autocast.)
    lora_copies = 0
    if autocast and w != cb:
        lora_copies = cb * (lora_params if not checkpointed else lora_params // layers * kept)
    # trl adds the reference adapter with PEFT's add_adapter (fp32), after its bf16 cast of the trained one.
    lora_weights = w * lora_params + (4 * lora_params if reference else 0)

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

    logits = _loss_bytes(arch, inp, upcast)

    parts = {
        "quantized weights": linear_q,
        "16-bit weights": unquantized + linear_16,
        "quantization constants": quant_constant_bytes(arch, inp.quant, inp.double_quant),
        "LoRA parameters": lora_weights + lora_copies,
        "LoRA gradients": w * lora_params,
        "optimizer states": optimizer,
        "activations": activations,
        "logits and loss": logits,
        "KV cache": 0,
    }
    parts["data-parallel buffers"] = 0
    if inp.gpus > 1 and inp.sharding == "ddp":
        parts["data-parallel buffers"] = w * lora_params  # DDP's gradient buckets: a second copy of the gradients
    elif inp.gpus > 1:
        # FSDP: weights, gradients and optimizer states are split over the GPUs; in forward and backward
        # the root unit (embeddings, lm_head, final norm: unquantized) and up to two decoder layers
        # (the one computing, the one prefetched) are all-gathered in full.
        layer_unit = (linear_q + linear_16 + parts["quantization constants"] + lora_weights) // layers
        for key in COMPONENTS[:6]:
            parts[key] = -(-parts[key] // inp.gpus)
        lora_weights = -(-lora_weights // inp.gpus)
        parts["data-parallel buffers"] = unquantized + 2 * layer_unit
    if inp.gpus > 1 and inp.sharding == "fsdp":
        managed = -(-managed // inp.gpus)
    return parts, lora_params, managed, lora_weights


def _total(arch: dict, inp: PlanInput) -> int:
    return sum(_breakdown(arch, inp)[0].values())


# qtune's chunked loss (qtune/train/hooks.py, trained_positions_loss): rows per fp32 chunk, ~64 MiB of fp32 each.
LOSS_CHUNK_ELEMENTS = 1 << 24
# trl's fused LM head (trl/kernels/chunked_logprob.py): tiles of 4096 tokens x 32768 vocabulary entries.
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768


def trained_positions(inp: PlanInput) -> int:
    """Positions of one micro-batch whose logits the loss keeps: every position unless `trained_tokens` says fewer."""
    per_example = inp.seq if inp.trained_tokens is None else min(inp.trained_tokens, inp.seq)
    return inp.batch * per_example


def _loss_bytes(arch: dict, inp: PlanInput, upcast: bool) -> int:
    """Peak bytes of the LM head and the loss, on top of the activations (reached in the loss's backward, while
    every activation is still held). c = compute-dtype bytes, V = vocabulary, n = trained positions.

    - "chunked" (qtune's `train.chunked_loss`, the default): transformers' `logits_to_keep` projects only the n
      trained positions, so the logits are n x V in 16-bit; the cross-entropy runs in fp32 on chunks of
      r = 2**24 / V rows, each inside a non-reentrant checkpoint whose closure keeps the logits alive until the
      last chunk's backward. Each chunk's backward recomputes log_softmax (4 r V), the nll and log_softmax
      gradients (4 r V each), casts them to 16-bit, and slicing's backward returns a full n x V zero-filled
      gradient that autograd adds into the one accumulated so far: 3 n V c at the peak (kept logits,
      accumulated gradient, the chunk's new one), or 2 n V c + 12 r V before it. With one chunk (n <= r) there
      is no checkpoint, and the forward peaks: the logits, log_softmax's kept fp32 output, and the three fp32
      temporaries of the logged entropy (log-probabilities, their exp, the product): (c + 16) n V.
    - "fused" (`train.chunked_loss: false`: trl's fused LM head): the logits never exist; it keeps the trained
      positions' hidden states (n h c), accumulates their gradient in fp32 (4 n h) and works in one tile of
      4096 tokens x 32768 vocabulary entries (c each).
    - "full" (transformers' own loss, what plain HF / trl scripts of 2023-24 run): every position is projected
      and upcast to fp32; log_softmax keeps its fp32 output and backward holds two fp32 gradients: 12 b s V.
    Soft-capped logits (Gemma-2) keep their 16-bit tanh output too; after k-bit preparation the fp32 lm_head's
    16-bit autocast copy (V h c) is kept for backward.
    """
    h, v = arch["hidden_size"], arch["vocab_size"]
    c = DTYPE_BYTES[inp.dtype]
    autocast = inp.dtype != "fp32"
    softcap = bool(arch.get("final_logit_softcapping"))
    if inp.loss == "fused":
        n = trained_positions(inp)
        tile = min(n, FUSED_TOKENS) * min(v, FUSED_VOCAB) * c
        weight_chunk = min(v, FUSED_VOCAB) * h * c if upcast and autocast else 0  # each vocabulary chunk cast
        return n * h * (2 * c + 4) + 16 * n + tile + weight_chunk
    if inp.loss == "full":
        n = inp.batch * inp.seq
        peak = 12 * n * v
    else:
        n = trained_positions(inp)
        rows = min(n, max(1, LOSS_CHUNK_ELEMENTS // v))
        if n <= rows:  # no checkpoint: log_softmax keeps its output; the logged entropy's fp32 temporaries
            peak = (c + 4 + 12) * n * v
        else:
            peak = max(2 * n * v * c + 12 * rows * v, 3 * n * v * c + rows * v * c)
    if softcap:
        peak += n * v * c  # tanh(logits / cap) keeps its 16-bit output for backward
    if upcast and autocast:
        peak += v * h * c  # the fp32 lm_head weight's 16-bit autocast copy, kept for backward
    return peak
