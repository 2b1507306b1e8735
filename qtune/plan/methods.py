"""What preference (DPO, KTO) and reward (GRPO) training add to a run's memory, as trl 1.16 runs them.

Each method's forward and backward with grad is an SFT micro-batch of another shape (`training_input`): DPO
concatenates the chosen and the rejected answer of each pair into one batch of 2 x batch rows, KTO trains its batch
of completions as they are, GRPO trains `batch` sampled completions (trl's per-device batch counts completions,
group_size of them per prompt). All three score with trl's fused LM head (no logits kept), and all three compute
the reference with the same model under no_grad: no second base and no saved activations, only transient ones.
What they add is booked here: the reference adapter trl keeps beside the trained one, and GRPO's generation phase
(`generation_bytes`), which never coexists with the training phase's activations. docs/plan.md has the formulas.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from qtune.plan.arch import DTYPE_BYTES, linear_layers

if TYPE_CHECKING:
    from qtune.plan.planner import PlanInput

METHODS = ("sft", "dpo", "kto", "grpo")


def completion_tokens(inp: PlanInput) -> int:
    """GRPO: sampled tokens per row; the row (seq) is the prompt plus these."""
    return min(inp.gen_tokens, inp.seq)


def training_input(inp: PlanInput) -> PlanInput:
    """The micro-batch the method runs forward and backward with grad, as the SFT micro-batch of that shape."""
    if inp.method == "dpo":  # [chosen..., rejected...], padded to the longest of the 2 x batch rows
        return dataclasses.replace(inp, method="sft", batch=2 * inp.batch)
    if inp.method == "grpo":  # prompt + completion rows; logits only at the sampled positions
        return dataclasses.replace(inp, method="sft", trained_tokens=completion_tokens(inp))
    return dataclasses.replace(inp, method="sft")


def reference_adapter(inp: PlanInput) -> bool:
    """Whether trl keeps a frozen "ref" copy of the adapter. Given a PeftModel (what qtune passes), DPO and KTO
    always add one (a copy of the starting LoRA weights, fresh or lora.from_adapter's), GRPO only with beta > 0."""
    return inp.method in ("dpo", "kto") or (inp.method == "grpo" and inp.beta > 0)


def _mlp_adapted(arch: dict, inp: PlanInput) -> bool:
    up = "gate_up_proj" if arch["model_type"] == "phi3" else "up_proj"
    return inp.targets == "all-linear" or up in inp.targets


def _forward_working_set(arch: dict, inp: PlanInput, tokens: int, length: int, rows: int, lora_bytes: int) -> int:
    """Peak bytes of a forward without grad over `rows` x `length` = `tokens` positions (the KV cache aside). It
    peaks in a decoder layer's MLP: the embeddings (which the model's forward keeps), the layer's input (which the
    loop keeps), the residual stream and the normed input (h each), rotary cos and sin (2 x head_dim), the
    activation's output (i) and, in a LoRA-adapted up projection, the base output, the LoRA output and its scaled
    copy (i each; fp32 when the LoRA weights are fp32 and there is no autocast); unadapted: gate, up, product (3i).
    A padded batch adds the (rows, 1, length, length) boolean mask, and a 4-bit base dequantizes its largest
    weight to 16-bit for the matmul."""
    h, c = arch["hidden_size"], DTYPE_BYTES[inp.dtype]
    up = 2 * arch["intermediate_size"] if arch["model_type"] == "phi3" else arch["intermediate_size"]
    per_token = (4 * h + 2 * arch["head_dim"]) * c
    per_token += (max(4 * c, 2 * c + 2 * lora_bytes) if _mlp_adapted(arch, inp) else 3 * c) * up
    mask = rows * length * length if rows > 1 else 0
    dequantized = max(i * o for _, i, o, _ in linear_layers(arch)) * c if inp.quant in ("nf4", "fp4") else 0
    return tokens * per_token + mask + dequantized


def kv_cache_bytes(arch: dict, inp: PlanInput, rows: int, tokens: int) -> int:
    """transformers' DynamicCache: a key and a value per layer, (rows, kv_heads, tokens, head_dim) in the model's
    dtype."""
    kv_width = arch["num_key_value_heads"] * arch["head_dim"]
    return 2 * arch["num_hidden_layers"] * rows * tokens * kv_width * DTYPE_BYTES[inp.dtype]


def generation_bytes(arch: dict, inp: PlanInput, lora_bytes: int) -> dict[str, int]:
    """GRPO's generation phase at its peak: {"activations", "logits and loss", "KV cache"}.

    trl samples the completions of a whole optimizer step at once (steps_per_generation = grad_accum): R = batch x
    grad_accum rows of P prompt tokens, left-padded, then gen_tokens sampled ones, with model.generate under no_grad
    and no autocast. Two moments compete: the end of the prefill (the cache of P tokens, the prefill's working set
    of R x P positions) and the last decoding step (the cache of P + gen - 1 tokens, and the step's R x V logits:
    16-bit, their fp32 copy, the tempered scores and the probabilities). With beta > 0 trl then scores the rows
    under the reference, `batch` rows at a time, without grad (the cache is freed by then): a forward's working set
    over batch x seq positions and the fused LM head's tile.
    """
    from qtune.plan.memory import FUSED_TOKENS, FUSED_VOCAB

    c, v = DTYPE_BYTES[inp.dtype], arch["vocab_size"]
    rows, gen = inp.batch * inp.grad_accum, completion_tokens(inp)
    prompt = inp.seq - gen
    prefill = {
        "activations": _forward_working_set(arch, inp, rows * prompt, prompt, rows, lora_bytes),
        "logits and loss": 0,
        "KV cache": kv_cache_bytes(arch, inp, rows, prompt),
    }
    decode = {
        "activations": 0,
        "logits and loss": rows * v * (c + 12),
        "KV cache": kv_cache_bytes(arch, inp, rows, max(inp.seq - 1, prompt)),
    }
    moments = [prefill, decode]
    if inp.beta > 0:
        n = inp.batch * gen  # the fused LM head scores the sampled positions: their hidden states and one tile
        head = n * arch["hidden_size"] * c + min(n, FUSED_TOKENS) * min(v, FUSED_VOCAB) * c
        tokens = inp.batch * inp.seq
        scoring = _forward_working_set(arch, inp, tokens, inp.seq, inp.batch, DTYPE_BYTES[inp.dtype])
        moments.append({"activations": scoring, "logits and loss": head, "KV cache": 0})
    return max(moments, key=lambda m: sum(m.values()))


def method_line(inp: PlanInput, plan_phases: dict[str, int], reference: int) -> str | None:
    """What the method adds, in a sentence for `Plan.format` (None for SFT)."""

    def gib(n: int) -> str:
        return f"{n / (1 << 30):.2f} GiB"

    ref = f"a frozen fp32 copy of the adapter, {gib(reference)}; no second base" if reference else "adapter off"
    lora = f"; LoRA weights {inp.lora_dtype}" + (" (trl casts them on a quantized base)" if inp.quant != "none" else "")
    if inp.method == "dpo":
        return (
            f"dpo: chosen and rejected in one batch, 2 x {inp.batch} = {2 * inp.batch} rows with grad; the reference "
            f"({ref}) scores the same rows without grad: nothing saved for backward{lora}"
        )
    if inp.method == "kto":
        return (
            f"kto: {inp.batch} completions with grad; their KL batch (each completion after a neighbour's prompt) "
            f"and the reference ({ref}) without grad: nothing saved for backward{lora}"
        )
    if inp.method == "grpo":
        gen = completion_tokens(inp)
        rows = inp.batch * inp.grad_accum
        phase = max(plan_phases, key=plan_phases.get)
        other = "training" if phase == "generation" else "generation"
        reference_part = f"; reference ({ref}) scores without grad" if inp.beta > 0 else ""
        return (
            f"grpo: --batch counts completions ({inp.group_size} per prompt); generation: {inp.batch} x "
            f"{inp.grad_accum} = {rows} rows of {inp.seq - gen} prompt + {gen} sampled tokens with a KV cache, no grad"
            f"{reference_part}; training: {inp.batch} rows with grad, logits at the {gen} sampled positions; "
            f"peak in the {phase} phase ({other} phase: {gib(plan_phases[other])}){lora}"
        )
    return None
