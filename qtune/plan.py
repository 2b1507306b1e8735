"""Will this QLoRA run fit my GPU? A VRAM plan computed from a model's config alone.

Nothing is downloaded but (at most) a `config.json`. The weight bytes are exact: they equal
what `model.get_memory_footprint()` reports for the same model loaded by transformers +
bitsandbytes (the tests load tiny models in every quantization and compare to the byte).
Everything that depends on the run (activations, logits, allocator) is a model of what
autograd keeps alive on qtune's stack (transformers + PEFT + trl, non-reentrant
checkpointing, fused attention), calibrated by counting the tensors autograd actually saves
on tiny models; see docs/plan.md for every formula and how it compares with published figures.

Units: all sizes are bytes (ints). `parse_bytes` reads "8GB" as 8 GiB, as GPU cards are sold.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from qtune.arch import (  # noqa: F401  (BUILTIN, ALIASES, load_arch, PlanError: the planner's public API)
    ALIASES,
    BUILTIN,
    DTYPE_BYTES,
    QUANTS,
    PlanError,
    _buffer_bytes,
    _linear_storage,
    _unquantized_params,
    linear_layers,
    load_arch,
    quant_constant_bytes,
    weight_bytes,
)

GIB = 1 << 30
MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# Sizes on the command line


# Binary multiples whatever the spelling ("g", "gb", "gib"); a bare number is GiB.
_UNITS = {"": GIB, "b": 1} | {p + s: 1 << 10 * k for k, p in enumerate("kmgt", 1) for s in ("", "b", "ib")}
_SIZE = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """Read a memory size such as "8GB", "8 GB", "8G", "8gb", "8GiB", "8192MiB" or "24000MB".

    Units are binary whatever their spelling: "GB" and "G" mean GiB, "MB" means MiB, because
    that is how GPU memory is sold and reported (an "8 GB" card has 8 GiB; nvidia-smi's "MiB").
    A bare number means GiB ("8" is an 8 GB card). The result is rounded down to whole bytes.

    Raises:
        PlanError: the text is not a size, or the size is zero or negative.
    """
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise PlanError(f"--vram: cannot read {text!r}; use e.g. 8GB, 8G, 8192MiB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise PlanError(f"--vram must be a positive size, got {text!r}")
    return int(value)


def _checkpointing(inp: PlanInput) -> str:
    if not inp.gradient_checkpointing:
        return "off"
    return "on" if inp.checkpoint_every == 1 else f"on every {inp.checkpoint_every} layers"


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


# --------------------------------------------------------------------------------------------
# The run


def _help(text: str, default: Any):
    return field(default=default, metadata={"help": text})


@dataclass
class PlanInput:
    seq: int = _help("Tokens per example (the longest one: memory peaks on it).", 2048)
    batch: int = _help("Examples per micro-batch.", 1)
    quant: Literal["nf4", "fp4", "int8", "none"] = _help("How the frozen base weights are stored.", "nf4")
    double_quant: bool = _help("Quantize the 4-bit block scales too.", True)
    lora_r: int = _help("LoRA rank.", 16)
    targets: str | list[str] = _help("'all-linear', or module names (a list or 'q_proj,v_proj').", "all-linear")
    gradient_checkpointing: bool = _help("Recompute activations in backward (non-reentrant).", True)
    optim: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = _help("Optimizer of the LoRA weights.", "adamw")
    dtype: Literal["bf16", "fp16", "fp32"] = _help("Compute dtype (mixed precision unless fp32).", "bf16")
    vram: int | None = _help("GPU memory in bytes to plan against (None: just report).", None)
    gpus: int = _help("Processes (one per GPU) the run is spread over; the plan is per GPU.", 1)
    sharding: Literal["ddp", "fsdp"] = _help("Data parallel: a full copy per GPU (ddp) or sharded (fsdp).", "ddp")
    checkpoint_every: int = _help(
        "With checkpointing: only every k-th decoder layer recomputes (1: all); the others keep their activations.",
        1,
    )
    upcast_kbit: bool = _help(
        "Model peft's prepare_model_for_kbit_training, which casts every non-quantized weight to fp32 (the "
        "QLoRA paper's and many scripts' setup). qtune does not call it: it keeps them in the compute dtype.",
        False,
    )

    def __post_init__(self) -> None:
        for key, flag in (
            ("seq", "--seq"),
            ("batch", "--batch"),
            ("lora_r", "--lora-r"),
            ("gpus", "--gpus"),
            ("checkpoint_every", "--checkpoint-every"),
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlanError(f"{flag} must be a positive integer, got {value!r}")
        for key, options in (
            ("quant", QUANTS),
            ("optim", ("adamw", "adamw8bit", "paged_adamw8bit")),
            ("dtype", tuple(DTYPE_BYTES)),
            ("sharding", ("ddp", "fsdp")),
        ):
            if getattr(self, key) not in options:
                raise PlanError(f"--{key} must be one of {', '.join(options)}; got {getattr(self, key)!r}")
        if self.targets == ["all-linear"]:
            self.targets = "all-linear"
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not isinstance(self.targets, (str, list)) or (isinstance(self.targets, list) and not self.targets):
            raise PlanError("--targets is empty: use 'all-linear' or name at least one module, e.g. q_proj,v_proj")
        if self.vram is not None and (not isinstance(self.vram, int) or isinstance(self.vram, bool) or self.vram <= 0):
            raise PlanError(f"--vram must be a positive number of bytes, got {self.vram!r}")
        for key in ("double_quant", "gradient_checkpointing", "upcast_kbit"):
            if not isinstance(getattr(self, key), bool):
                raise PlanError(f"--{key.replace('_', '-')} must be true or false, got {getattr(self, key)!r}")


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
MAX_SEARCH = 1 << 22  # longest sequence / largest batch the search reports


@dataclass
class Plan:
    """The memory plan of one run: a breakdown in bytes, its total, and the verdict against vram."""

    arch: str
    input: PlanInput
    breakdown: dict[str, int]
    lora_params: int
    reported_weights: int  # what get_memory_footprint() reports once loaded (before k-bit prep)
    vram: int | None = None
    max_seq: int | None = None  # longest seq that fits at this batch (None without vram)
    max_batch: int | None = None  # largest batch that fits at this seq (None without vram)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def peak_allocated(self) -> int:
        """The peak of torch.cuda.max_memory_allocated(): everything but context and headroom."""
        return self.total - self.breakdown["CUDA context and allocator headroom"]

    @property
    def peak_reserved(self) -> int:
        """The peak of torch.cuda.max_memory_reserved(): everything but the CUDA context."""
        return self.total - CUDA_CONTEXT

    @property
    def fits(self) -> bool | None:
        return None if self.vram is None else self.total <= self.vram

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `--json`."""
        return {
            "arch": self.arch,
            "input": dataclasses.asdict(self.input),
            "breakdown": dict(self.breakdown),
            "total": self.total,
            "peak_allocated": self.peak_allocated,
            "peak_reserved": self.peak_reserved,
            "reported_weights": self.reported_weights,
            "lora_params": self.lora_params,
            "vram": self.vram,
            "fits": self.fits,
            "max_seq": self.max_seq,
            "max_batch": self.max_batch,
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """A human-readable table."""
        inp = self.input
        quant = inp.quant + (" + double quant" if inp.double_quant and inp.quant in ("nf4", "fp4") else "")
        targets = inp.targets if isinstance(inp.targets, str) else ",".join(inp.targets)
        lines = [
            f"{self.arch}: {quant}, seq {inp.seq} x batch {inp.batch}, {inp.dtype}, {inp.optim}, "
            f"checkpointing {_checkpointing(inp)}"
            + (f"; per GPU of {inp.gpus} ({inp.sharding})" if inp.gpus > 1 else ""),
            f"LoRA r={inp.lora_r} on {targets}: {self.lora_params:,} trainable parameters",
            "",
        ]
        width = max(map(len, COMPONENTS))
        for name in COMPONENTS:
            lines.append(f"  {name:<{width}}  {_gib(self.breakdown[name]):>11}")
        lines.append(f"  {'total':<{width}}  {_gib(self.total):>11}")
        lines.append(
            f"  (torch peak allocated {_gib(self.peak_allocated)}; loaded weights report {_gib(self.reported_weights)})"
        )
        if self.vram is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines += [
                "",
                f"{verdict} in {_gib(self.vram)} ({_gib(abs(self.vram - self.total))} "
                f"{'to spare' if self.fits else 'short'})",
                f"longest seq at batch {inp.batch}: {_count(self.max_seq)}; "
                f"largest batch at seq {inp.seq}: {_count(self.max_batch)}",
            ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    return "none" if n == 0 else (f">= {n:,}" if n >= MAX_SEARCH else f"{n:,}")


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
    # position per vocabulary entry (FIELD.md's "s*V*4" is the first of these three).
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


def _largest(fits) -> int:
    """The largest n in [1, MAX_SEARCH] with fits(n), for a monotone fits; 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < MAX_SEARCH and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_SEARCH)
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate(arch: dict, inp: PlanInput) -> Plan:
    """The memory plan of a QLoRA (or LoRA) run of `arch` with `inp`.

    Raises:
        PlanError: a target module the architecture does not have.
    """
    parts, lora_params = _breakdown(arch, inp)
    plan = Plan(
        arch=arch["name"],
        input=inp,
        breakdown=parts,
        lora_params=lora_params,
        reported_weights=weight_bytes(arch, inp.quant, inp.double_quant, inp.dtype),
        vram=inp.vram,
    )
    if inp.vram is not None:
        plan.max_seq = _largest(lambda s: _total(arch, dataclasses.replace(inp, seq=s)) <= inp.vram)
        plan.max_batch = _largest(lambda b: _total(arch, dataclasses.replace(inp, batch=b)) <= inp.vram)
    limit = arch.get("max_position_embeddings")
    if limit and inp.seq > limit:
        plan.notes.append(f"--seq {inp.seq} is beyond {arch['name']}'s trained context of {limit} tokens")
    if not arch.get("llama_like", True):
        plan.notes.append(f"model_type {arch['model_type']!r} is treated as llama-like; its numbers are unverified")
    if arch["model_type"] == "gemma2":
        plan.notes.append("gemma2 runs eager attention (SDPA cannot soft-cap): activations grow with seq^2")
    if inp.optim == "paged_adamw8bit":
        plan.notes.append("paged optimizer states can spill to CPU memory under pressure; counted here in full")
    return plan


def fit_to_vram(arch: dict, inp: PlanInput, vram: int) -> tuple[PlanInput, int]:
    """Choose micro-batch, gradient accumulation and checkpointing so the run fits in `vram`.

    The effective batch (`micro-batch x grad_accum`) stays `inp.batch`, so the micro-batch is a
    divisor of it. Checkpointing off is preferred (it is faster) when it fits; then the largest
    micro-batch. Returns the micro-batch PlanInput (with `vram` set) and grad_accum.

    Raises:
        PlanError: not even micro-batch 1 with checkpointing fits; the message gives the
            longest sequence that would.
    """
    if not isinstance(vram, int) or isinstance(vram, bool) or vram <= 0:
        raise PlanError(f"--vram must be a positive number of bytes, got {vram!r}")
    divisors = [d for d in range(inp.batch, 0, -1) if inp.batch % d == 0]
    for checkpointing in (False, True):
        for micro in divisors:
            candidate = dataclasses.replace(
                inp, batch=micro, gradient_checkpointing=checkpointing, checkpoint_every=1, vram=vram
            )
            if _total(arch, candidate) <= vram:
                return candidate, inp.batch // micro
    one = dataclasses.replace(inp, batch=1, gradient_checkpointing=True, checkpoint_every=1, vram=vram)
    longest = _largest(lambda s: _total(arch, dataclasses.replace(one, seq=s)) <= vram)
    if longest == 0:
        need = _gib(_total(arch, dataclasses.replace(one, seq=1)))
        raise PlanError(
            f"--vram {_gib(vram)}: {arch['name']} does not fit even at seq 1 ({need}); "
            "use --quant nf4, a smaller model, or a larger GPU"
        )
    raise PlanError(
        f"--seq {inp.seq}: even micro-batch 1 with gradient checkpointing needs {_gib(_total(arch, one))} "
        f"of {_gib(vram)}; the longest sequence that fits is {longest:,} tokens"
    )
