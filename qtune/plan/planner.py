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
from typing import TYPE_CHECKING, Any, Literal

from qtune.plan.arch import DTYPE_BYTES, QUANTS, PlanError, weight_bytes
from qtune.plan.memory import COMPONENTS, CUDA_CONTEXT, _breakdown, _total, trained_positions
from qtune.plan.methods import METHODS, method_line, reference_adapter, training_input

if TYPE_CHECKING:
    from qtune.config import RunConfig

GIB = 1 << 30


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
    gradient_checkpointing: bool = _help("Recompute activations in backward (non-reentrant).", False)
    optim: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = _help("Optimizer of the LoRA weights.", "adamw")
    dtype: Literal["bf16", "fp16", "fp32"] = _help("Compute dtype (mixed precision unless fp32).", "bf16")
    vram: int | None = _help("GPU memory in bytes to plan against (None: just report).", None)
    gpus: int = _help("Processes (one per GPU) the run is spread over; the plan is per GPU.", 1)
    sharding: Literal["ddp", "fsdp"] = _help("Data parallel: a full copy per GPU (ddp) or sharded (fsdp).", "ddp")
    checkpoint_every: int = _help(
        "With checkpointing: only every k-th decoder layer recomputes (1: all); the others keep their activations.",
        1,
    )
    loss: Literal["chunked", "fused", "full"] | None = _help(
        "The LM head and loss: 'chunked' (qtune's train.chunked_loss: logits at trained positions only, fp32 "
        "cross-entropy in chunks), 'fused' (train.chunked_loss false: trl's fused LM head, no logits kept) or "
        "'full' (transformers' own loss: every position's logits upcast to fp32; plain HF / trl scripts). "
        "None: the method's own (sft: chunked; dpo, kto and grpo always run trl's fused LM head).",
        None,
    )
    trained_tokens: int | None = _help(
        "Trained (label) positions per example, where the chunked and fused losses keep logits (None: all seq).",
        None,
    )
    upcast_kbit: bool = _help(
        "Model peft's prepare_model_for_kbit_training, which casts every non-quantized weight to fp32 (the "
        "QLoRA paper's and many scripts' setup). qtune does not call it: it keeps them in the compute dtype.",
        False,
    )
    method: Literal["sft", "dpo", "kto", "grpo"] = _help(
        "What trains: sft; dpo (a batch of pairs: chosen and rejected rows together); kto (a batch of judged "
        "completions); grpo (a batch of sampled completions, group_size per prompt).",
        "sft",
    )
    group_size: int = _help("GRPO: completions sampled per prompt (grpo.group_size).", 4)
    gen_tokens: int = _help("GRPO: the longest sampled completion, part of seq (grpo.max_new_tokens).", 32)
    grad_accum: int = _help(
        "Micro-batches per optimizer step. GRPO samples the completions of all of them at once (trl's "
        "steps_per_generation), so its generation phase holds batch x grad_accum rows.",
        1,
    )
    beta: float = _help(
        "GRPO's KL coefficient (grpo.beta): above 0, trl keeps a frozen copy of the adapter and scores each "
        "completion under it without grad. (DPO's and KTO's beta change no memory.)",
        0.0,
    )
    lora_dtype: Literal["fp32", "bf16"] | None = _help(
        "The trained LoRA weights' dtype (their gradients' and AdamW states' too). None: bf16 for dpo, kto and "
        "grpo on a 4- or 8-bit base, as trl 1.16's trainers cast them; otherwise PEFT's fp32.",
        None,
    )

    @classmethod
    def from_config(cls, cfg: RunConfig, *, seq: int, batch: int, **overrides: Any) -> PlanInput:
        """The plan of a training config's run at `seq` tokens and micro-batch `batch` (the planner's own
        inputs: the run's quantization, LoRA, optimizer, dtype, checkpointing, and the launch's process count)."""
        import os

        method = {"dpo": "kto" if cfg.dpo.loss == "kto" else "dpo", "grpo": "grpo"}.get(cfg.recipe, "sft")
        values = dict(
            seq=seq,
            batch=batch,
            quant=cfg.quant.method,
            double_quant=cfg.quant.double_quant,
            lora_r=cfg.lora.r,
            targets=cfg.lora.targets,
            optim=cfg.train.optim,
            dtype=cfg.model.dtype,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            checkpoint_every=cfg.train.checkpoint_every,
            loss="chunked" if cfg.train.chunked_loss and method == "sft" else "fused",
            gpus=int(os.environ.get("WORLD_SIZE", "1")),  # under torchrun / accelerate: plan per GPU
            sharding="fsdp" if cfg.train.fsdp else "ddp",
            method=method,
            grad_accum=cfg.train.grad_accum,
        )
        if method == "grpo":
            values.update(group_size=cfg.grpo.group_size, gen_tokens=cfg.grpo.max_new_tokens, beta=cfg.grpo.beta)
        return cls(**{**values, **overrides})

    def __post_init__(self) -> None:
        for key, flag in (
            ("seq", "--seq"),
            ("batch", "--batch"),
            ("lora_r", "--lora-r"),
            ("gpus", "--gpus"),
            ("checkpoint_every", "--checkpoint-every"),
            ("group_size", "--group-size"),
            ("gen_tokens", "--gen-tokens"),
            ("grad_accum", "--grad-accum"),
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlanError(f"{flag} must be a positive integer, got {value!r}")
        for key, options in (
            ("quant", QUANTS),
            ("optim", ("adamw", "adamw8bit", "paged_adamw8bit")),
            ("dtype", tuple(DTYPE_BYTES)),
            ("sharding", ("ddp", "fsdp")),
            ("loss", ("chunked", "fused", "full", None)),
            ("method", METHODS),
            ("lora_dtype", ("fp32", "bf16", None)),
        ):
            if getattr(self, key) not in options:
                shown = ", ".join(o for o in options if o is not None)
                raise PlanError(f"--{key.replace('_', '-')} must be one of {shown}; got {getattr(self, key)!r}")
        if self.loss is None:
            self.loss = "chunked" if self.method == "sft" else "fused"
        elif self.method != "sft" and self.loss != "fused":
            raise PlanError(
                f"--method {self.method} runs trl's fused LM head, not the {self.loss} loss "
                "(--chunked-loss applies to --method sft)"
            )
        if self.lora_dtype is None:  # trl 1.16's DPO/KTO/GRPO trainers: bf16 LoRA weights on a quantized base
            self.lora_dtype = "bf16" if self.method != "sft" and self.quant != "none" else "fp32"
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 0:
            raise PlanError(f"--beta must be a number >= 0, got {self.beta!r}")
        if self.method == "grpo" and self.group_size < 2:
            raise PlanError(
                f"--group-size must be at least 2 (GRPO compares completions of a prompt), got {self.group_size}"
            )
        tt = self.trained_tokens
        if tt is not None and (not isinstance(tt, int) or isinstance(tt, bool) or tt <= 0):
            raise PlanError(f"--trained-tokens must be a positive integer, got {tt!r}")
        if tt is not None and self.method == "grpo":
            raise PlanError("--trained-tokens: GRPO trains the sampled completions; set --gen-tokens instead")
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


MAX_SEARCH = 1 << 22  # longest sequence / largest batch the search reports


@dataclass
class Plan:
    """The memory plan of one run: a breakdown in bytes, its total, and the verdict against vram."""

    arch: str
    input: PlanInput
    breakdown: dict[str, int]
    lora_params: int
    reported_weights: int  # what get_memory_footprint() reports once loaded (before k-bit prep)
    paged: int = 0  # optimizer states a paged optimizer keeps in CUDA unified memory (in "optimizer states")
    vram: int | None = None
    max_seq: int | None = None  # longest seq that fits at this batch (None without vram)
    max_batch: int | None = None  # largest batch that fits at this seq (None without vram)
    notes: list[str] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)  # GRPO: {"generation": total, "training": total}

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def peak_allocated(self) -> int:
        """The peak of torch.cuda.max_memory_allocated(): everything but context, headroom and paged states
        (bitsandbytes allocates those with cudaMallocManaged, outside torch's allocator)."""
        return self.total - self.breakdown["CUDA context and allocator headroom"] - self.paged

    @property
    def peak_reserved(self) -> int:
        """The peak of torch.cuda.max_memory_reserved(): everything but the CUDA context and paged states."""
        return self.total - CUDA_CONTEXT - self.paged

    @property
    def reference(self) -> int:
        """Bytes of trl's frozen fp32 copy of the adapter (DPO, KTO; GRPO with beta > 0), in "LoRA parameters"."""
        return 4 * self.lora_params if reference_adapter(self.input) else 0

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
            "paged_optimizer_states": self.paged,
            "trained_positions": trained_positions(training_input(self.input)),
            "lora_params": self.lora_params,
            "vram": self.vram,
            "fits": self.fits,
            "max_seq": self.max_seq,
            "max_batch": self.max_batch,
            "phases": dict(self.phases),
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
            f"loss: {_loss_line(inp)}",
        ]
        method = method_line(inp, self.phases, self.reference)
        if method:
            lines.append(f"method: {method}")
        lines.append("")
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


def _loss_line(inp: PlanInput) -> str:
    trained_inp = training_input(inp)  # the rows trained with grad: DPO's 2 x batch, GRPO's sampled positions
    tt = trained_inp.trained_tokens
    trained = "every position" if tt is None else f"{tt:,} trained positions"
    if inp.loss == "full":
        return f"transformers' own, fp32 logits at every position ({inp.seq * inp.batch:,})"
    what = "chunked fp32 cross-entropy" if inp.loss == "chunked" else "trl's fused LM head"
    row = "example" if inp.method == "sft" else "row"
    return f"{what}, logits at {trained} of each {row} ({trained_positions(trained_inp):,} per micro-batch)"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    return "none" if n == 0 else (f">= {n:,}" if n >= MAX_SEARCH else f"{n:,}")


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
    parts, lora_params, paged, phases = _breakdown(arch, inp)
    plan = Plan(
        arch=arch["name"],
        input=inp,
        breakdown=parts,
        lora_params=lora_params,
        reported_weights=weight_bytes(arch, inp.quant, inp.double_quant, inp.dtype),
        paged=paged,
        vram=inp.vram,
        phases=phases,
    )
    if inp.vram is not None:
        plan.max_seq = _largest(lambda s: _total(arch, dataclasses.replace(inp, seq=s)) <= inp.vram)
        plan.max_batch = _largest(lambda b: _total(arch, dataclasses.replace(inp, batch=b)) <= inp.vram)
    if plan.fits is False:  # what would: the search train.fit_to_vram runs
        try:
            micro, accum = fit_to_vram(arch, inp, inp.vram)
            ckpt = "on" if micro.gradient_checkpointing else "off"
            how = f"--batch {micro.batch} --gradient-checkpointing {ckpt}"
            if accum > 1:  # train.fit_to_vram keeps the examples per step with gradient accumulation
                how += f" (x gradient accumulation {accum}: train.fit_to_vram in a config chooses the same)"
            plan.notes.append(f"fits with {how}")
        except PlanError:
            pass  # not at this length: max_seq says how long
    limit = arch.get("max_position_embeddings")
    if limit and inp.seq > limit:
        plan.notes.append(f"--seq {inp.seq} is beyond {arch['name']}'s trained context of {limit} tokens")
    if not arch.get("llama_like", True):
        plan.notes.append(f"model_type {arch['model_type']!r} is treated as llama-like; its numbers are unverified")
    if arch["model_type"] == "gemma2":
        plan.notes.append("gemma2 runs eager attention (SDPA cannot soft-cap): activations grow with seq^2")
    if inp.method == "kto" and inp.batch < 2:
        plan.notes.append("trl's KTO needs --batch >= 2: its KL term pairs each completion with a neighbour's prompt")
    if inp.method == "grpo" and (inp.batch * inp.grad_accum) % inp.group_size:
        plan.notes.append(
            f"trl's GRPO needs --batch x --grad-accum ({inp.batch} x {inp.grad_accum}) to be a multiple of "
            f"--group-size {inp.group_size}: each prompt's completions are sampled together"
        )
    if paged:
        plan.notes.append(
            f"paged_adamw8bit: {_gib(paged)} of the optimizer states are in CUDA unified memory, counted here on "
            "the GPU (the driver moves them to CPU memory only under pressure, at a cost in speed); torch's "
            "allocator does not see them"
        )
    return plan


def fit_to_vram(arch: dict, inp: PlanInput, vram: int) -> tuple[PlanInput, int]:
    """Choose micro-batch, gradient accumulation and checkpointing so the run fits in `vram`.

    The effective batch (`micro-batch x grad_accum`) stays `inp.batch`, so the micro-batch is a
    divisor of it (and GRPO's generation batch stays `inp.batch` rows). Checkpointing off is preferred
    (it is faster) when it fits; then the largest micro-batch. Returns the micro-batch PlanInput (with
    `vram` and `grad_accum` set) and grad_accum.

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
                inp,
                batch=micro,
                grad_accum=inp.batch // micro,
                gradient_checkpointing=checkpointing,
                checkpoint_every=1,
                vram=vram,
            )
            if _total(arch, candidate) <= vram:
                return candidate, inp.batch // micro
    one = dataclasses.replace(frugal(inp), grad_accum=inp.batch, vram=vram)
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


def frugal(inp: PlanInput) -> PlanInput:
    """`inp` at its least memory without changing what is trained: micro-batch 1, every layer checkpointed (the
    gradient accumulation that keeps the effective batch, which GRPO samples at once)."""
    return dataclasses.replace(
        inp, batch=1, grad_accum=inp.batch * inp.grad_accum, gradient_checkpointing=True, checkpoint_every=1
    )


def refuse_too_small(arch: dict, inp: PlanInput) -> None:
    """Raise if `inp.vram` fits the run at no micro-batch, checkpointing or sequence length, naming the smallest
    VRAM that would (at seq 1, and at `inp.seq`); nothing without a vram or when something fits.

    Raises:
        PlanError: naming --vram.
    """
    if inp.vram is None:
        return
    least = frugal(dataclasses.replace(inp, seq=1, vram=None))
    need = _total(arch, least)
    if need <= inp.vram:
        return
    at_seq = _total(arch, frugal(dataclasses.replace(inp, vram=None)))
    raise PlanError(
        f"--vram {_gib(inp.vram)} is too small for {arch['name']} ({inp.quant}, LoRA r={inp.lora_r}, {inp.optim}) "
        f"at any micro-batch, checkpointing or sequence length: the smallest that fits is {_gib(need)} (seq 1, "
        f"micro-batch 1, checkpointing on), {_gib(at_seq)} at --seq {inp.seq}"
    )
