"""The VRAM planner against every published single-GPU peak figure we know of, one row per figure, with the
setup each source states (or, where it does not, the assumption written in the row).

Run:  HF_HUB_OFFLINE=1 python benchmarks/plan_vs_published.py [--json benchmarks/results/plan_vs_published.json]

No GPU is used: the "planner" side comes from `qtune.plan` alone. Each row plans the peer's stack as far as
`PlanInput` can say it: transformers' own loss (`loss="full"`: fp32 logits at every position) for HF-based runs,
`upcast_kbit` where the run calls peft's prepare_model_for_kbit_training. The output is the markdown pasted into
docs/plan.md; rows outside +-15% are flagged and the doc says why. Nothing is asserted: the published runs used
other stacks and versions.

Sources (public):
- QLoRA paper, Dettmers et al. 2023: https://arxiv.org/abs/2305.14314 (Figure 6)
- LitGPT resource tables: https://github.com/Lightning-AI/litgpt/blob/main/tutorials/resource-tables.md
- torchtune README, March 2024:
  https://github.com/pytorch/torchtune/blob/412a4ecd782b1c2859e16fe259fb71dc5758f996/README.md
  and September 2024: https://github.com/pytorch/torchtune/blob/30b8519e86d2094879576e16ab1f8d21a6f6f9f7/README.md
- LLaMA-Factory's performance comparison: https://github.com/hiyouga/LLaMA-Factory/wiki/Performance-Comparison
  (also in Unsloth's README of January 2025), and its hardware table: https://github.com/hiyouga/LLaMA-Factory
- Unsloth README, December 2023:
  https://github.com/unslothai/unsloth/blob/d6fdf151a5f54dc77a6167136120b593242f9f1e/README.md
- Unsloth benchmarks (context lengths): https://docs.unsloth.ai/basics/unsloth-benchmarks and
  https://unsloth.ai/blog/llama3-3; minimum VRAM: https://unsloth.ai/docs/get-started/fine-tuning-for-beginners/unsloth-requirements
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qtune.plan import GIB, PlanInput, estimate, load_arch, quant_constant_bytes, weight_bytes

GB = 10**9
MB = 10**6
MIB = 1 << 20
TOLERANCE = 0.15

# Architectures the planner does not build in, from their config.json on the hub.
EXTRA_ARCHS = {
    # https://huggingface.co/Qwen/Qwen2.5-14B/blob/main/config.json
    "qwen2.5-14b": {
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
    # https://huggingface.co/meta-llama/Llama-3.3-70B-Instruct/blob/main/config.json (Llama-3.1-70B: the same shapes)
    "llama-3.3-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
}


def arch(name: str, folder: Path) -> dict:
    if name not in EXTRA_ARCHS:
        return load_arch(name)
    path = folder / name
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(EXTRA_ARCHS[name]))
    return {**load_arch(str(path)), "name": name}


@dataclass
class Row:
    source: str
    model: str
    inp: PlanInput
    measure: str  # which planner number is compared: total | reserved | allocated | weights | ...
    published: float  # bytes (or tokens for "context" rows)
    published_text: str
    planned: float = 0.0
    setup_known: bool = True  # False: the source does not state the setup in full (assumptions in `note`)
    note: str = ""
    oom: bool = False  # the source ran out of memory: the planner agrees when it books more than the card
    unit: str = "GiB"  # the unit the planner's number is shown in: the source's
    setup: str = ""  # shown instead of the planner input's settings (rows that compare weights only)

    @property
    def ratio(self) -> float:
        return self.planned / self.published

    @property
    def flag(self) -> str:
        if self.oom:
            return " (OOM: agrees)" if self.ratio > 1 else " **off: fits**"
        if abs(self.ratio - 1) <= TOLERANCE:
            return ""
        return " **off**" if self.setup_known else " (setup unpublished)"


def _planned(a: dict, inp: PlanInput, measure: str) -> float:
    plan = estimate(a, inp)
    if measure == "total":
        return plan.total
    if measure == "reserved":
        return plan.peak_reserved
    if measure == "allocated":
        return plan.peak_allocated
    raise ValueError(measure)


def peak_rows(folder: Path) -> list[Row]:
    rows: list[Row] = []

    # LitGPT resource tables (10/2023): finetune/lora.py on Alpaca, micro-batch 1, bf16-true, no checkpointing,
    # LoRA r=8 on query and value, AdamW; the longest Alpaca example (1304 tokens) sets the peak;
    # torch.cuda.max_memory_allocated / 1e9. LitGPT's own model code and loss (chunked lm_head, bf16 logits).
    for quant, dq, published in (("none", False, 21.30), ("nf4", False, 14.14), ("nf4", True, 13.84)):
        inp = PlanInput(
            seq=1304, batch=1, quant=quant, double_quant=dq, lora_r=8, targets=["q_proj", "v_proj"], loss="full"
        )
        name = {"none": "bf16", "nf4": "nf4-dq" if dq else "nf4"}[quant]
        rows.append(
            Row("LitGPT, A100 40GB", f"Llama-2-7B {name}", inp, "allocated", published * GB, f"{published} GB",
                unit="GB")
        )  # fmt: skip

    # torchtune README (March 2024): max_memory_reserved, "estimated" on an A100 capped with
    # torch.cuda.set_per_process_memory_fraction (the cap excludes the CUDA context: compared with peak_reserved).
    # Alpaca padded per batch of 2; the longest padded batch is not published: 1304 tokens assumed (LitGPT's
    # longest Alpaca example with the Llama-2 tokenizer). torchtune's own model code: LoRA weights and AdamW
    # states in bf16, its own NF4, the output upcast to fp32 before nn.CrossEntropyLoss.
    for quant, targets, published, what in (
        ("nf4", "all-linear", 9.29, "QLoRA (qlora_finetune_single_device)"),
        ("none", ["q_proj", "v_proj"], 17.18, "LoRA (lora_finetune_single_device)"),
    ):
        inp = PlanInput(
            seq=1304, batch=2, quant=quant, double_quant=quant != "none", lora_r=8, targets=targets,
            gradient_checkpointing=True, loss="full",
        )  # fmt: skip
        rows.append(
            Row(f"torchtune {what}, 1x RTX 4090", "Llama-2-7B", inp, "reserved", published * GIB,
                f"{published} GB (GiB assumed)", setup_known=False, note="seq 1304 assumed")
        )  # fmt: skip

    # torchtune README (September 2024): Llama-3.1-8B, batch 2, packed to 2048, torch.compile, activation
    # checkpointing, LoRA r=8 on q, k, v, o and the MLP, fused AdamW, CEWithChunkedOutputLoss (8 chunks): 16-bit
    # logits at every position, fp32 per chunk; the closest planner loss is qtune's chunked one (every position).
    for quant, published, what in (("nf4", 7.4, "QLoRA"), ("none", 16.2, "LoRA")):
        inp = PlanInput(
            seq=2048, batch=2, quant=quant, double_quant=quant != "none", lora_r=8, gradient_checkpointing=True,
            loss="chunked",
        )  # fmt: skip
        rows.append(
            Row(f"torchtune {what}, 1x RTX 4090", "Llama-3.1-8B", inp, "allocated", published * GIB,
                f"{published} GiB", note="which torch counter is not stated: allocated assumed")
        )  # fmt: skip

    # LLaMA-Factory's comparison (A100, LLaMA2-7B, batch 4, gradient accumulation 2, LoRA rank 8, max length
    # 1024), "GRAM" in whole GB. LLaMA-Factory's defaults of the time: LoRA on q_proj and v_proj, gradient
    # checkpointing on, AdamW (torch), transformers' loss, no k-bit upcast. Every batch assumed at 1024 tokens.
    for quant, published, what in (("none", 18, "HF 16-bit"), ("nf4", 9, "HF 4-bit")):
        inp = PlanInput(
            seq=1024, batch=4, quant=quant, double_quant=quant != "none", lora_r=8, targets=["q_proj", "v_proj"],
            gradient_checkpointing=True, loss="full",
        )  # fmt: skip
        rows.append(
            Row(f"LLaMA-Factory {what}, A100", "Llama-2-7B", inp, "total", published * GB, f"{published} GB",
                setup_known=False, note="targets q,v, checkpointing and 1024-token batches assumed", unit="GB")
        )  # fmt: skip

    # Unsloth README (December 2023), 1x A100 40GB, "Flash Attention 2" column (the "Hugging Face" column ran eager
    # attention, which keeps heads x seq^2 scores per layer and is not modelled here). Stated: batch 2, gradient
    # accumulation 4, adamw_8bit, max_seq_length 2048, LoRA r=16 on all linear layers (the README's example),
    # QLoRA via peft. Not stated: checkpointing (peft's prepare_model_for_kbit_training turns it on by default) and
    # the longest padded batch: planned at the two bounds below.
    for model, seq, published, data in (("Llama-2-7B", 1304, 15365, "Alpaca"), ("Mistral-7B", 2048, 19385, "SlimOrca")):
        for ckpt in (True, False):
            inp = PlanInput(
                seq=seq, batch=2, lora_r=16, optim="adamw8bit", gradient_checkpointing=ckpt, upcast_kbit=True,
                loss="full",
            )  # fmt: skip
            rows.append(
                Row(f"Unsloth README, A100 40GB, HF + FA2 on {data}", model, inp, "total", published * MB,
                    f"{published:,} MB", setup_known=False, unit="MB",
                    note=f"seq {seq} (longest {data} batch) and checkpointing {'on' if ckpt else 'off'} assumed")
            )  # fmt: skip
    return rows


def context_rows(folder: Path) -> list[Row]:
    """Unsloth's "max context" for Hugging Face + FA2: Llama-3.1-8B and Llama-3.3-70B, QLoRA r=32 on all linear
    layers, batch 1, sequences padded to the length. Assumed for the HF run: bitsandbytes nf4 + double quant,
    prepare_model_for_kbit_training (fp32 embeddings and head, checkpointing on), 8-bit AdamW (Unsloth's
    notebooks), bf16, transformers' own loss, and a memory cap on a larger card (per-process memory fraction, as
    torchtune documents): the card size is compared with the planner's peak_reserved, which has no CUDA context.
    Two ratios: the memory the planner books at the published length over the card, and the longest sequence the
    planner finds over the published one."""
    rows = []
    for model, published in (
        ("llama-3.1-8b", {8: None, 12: 932, 16: 2551, 24: 5789, 40: 12264, 48: 15502, 80: 28454}),
        ("llama-3.3-70b", {48: None, 80: 6916}),
    ):
        a = arch(model, folder)
        for card, tokens in published.items():
            inp = PlanInput(
                seq=tokens or 1, lora_r=32, optim="adamw8bit", gradient_checkpointing=True, upcast_kbit=True,
                loss="full",
            )  # fmt: skip
            plan = estimate(a, inp)
            longest = estimate(a, replace(inp, vram=card * GIB + (plan.total - plan.peak_reserved))).max_seq or 0
            row = Row(
                "Unsloth docs, HF + FA2", model, inp, "reserved", card * GIB,
                f"{card} GB card: {f'{tokens:,} tokens' if tokens else 'OOM'}", planned=plan.peak_reserved,
                note=f"planner's longest: {longest:,}" + (f" ({longest / tokens:.2f} of published)" if tokens else ""),
                oom=tokens is None,
            )  # fmt: skip
            rows.append(row)
    return rows


def stated_rows(folder: Path) -> list[Row]:
    """Requirements stated without a setup: the QLoRA paper's 4-bit base, Unsloth's minimum VRAM, LLaMA-Factory's
    hardware table. Planned at micro-batch 1 with checkpointing, at the setting written in each row."""
    rows = []
    llama2 = arch("llama-2-7b", folder)
    # QLoRA paper, Figure 6: LLaMA-7B, batch 1: 4-bit base 5,048 MB; LoRA parameters 26 MB. The paper's stack:
    # NF4 + double quant, peft's k-bit preparation (fp32 embeddings, head, norms), LoRA r=64 on every linear.
    prepared = estimate(llama2, PlanInput(lora_r=64, upcast_kbit=True))
    weights = sum(prepared.breakdown[k] for k in ("quantized weights", "16-bit weights", "quantization constants"))
    rows.append(
        Row("QLoRA paper", "LLaMA-7B", prepared.input, "weights", 5048 * MIB, "4-bit base: 5,048 MB (MiB assumed)",
            planned=weights, setup_known=False, unit="MiB", setup="nf4-dq, k-bit upcast: the base's weights",
            note=f"get_memory_footprint() {weight_bytes(llama2, 'nf4', True, 'bf16') / MIB:,.0f} MiB, + constants "
            f"{quant_constant_bytes(llama2, 'nf4', True) / MIB:,.0f} MiB, + fp32 upcast")
    )  # fmt: skip
    rows.append(
        Row("QLoRA paper", "LLaMA-7B", prepared.input, "LoRA", 26 * MB, "LoRA parameters: 26 MB",
            planned=prepared.lora_params * 2, setup_known=False, unit="MB", setup="r=64 on every linear (the paper's)",
            note=f"{prepared.lora_params:,} parameters at r=64 on every linear, 16-bit")
    )  # fmt: skip
    # Unsloth's minimum VRAM for QLoRA (its own kernels, offloaded checkpoints, fused loss); planned for qtune's
    # most frugal run at Unsloth's default max_seq_length 2048: r=16, paged 8-bit AdamW, checkpointing, chunked loss.
    for model, name, published in (("mistral-7b", "7B", 5), ("llama-3.1-8b", "8B", 6), ("qwen2.5-14b", "14B", 8.5)):
        inp = PlanInput(seq=2048, optim="paged_adamw8bit", gradient_checkpointing=True)
        rows.append(
            Row("Unsloth minimum VRAM", f"{name} ({model})", inp, "total", published * GIB, f"{published} GB",
                setup_known=False, note="Unsloth's own stack; seq 2048 assumed")
        )  # fmt: skip
    # LLaMA-Factory's hardware table, QLoRA 4-bit ("estimated"): planned at its default cutoff_len 1024, LoRA r=8.
    for model, name, published in (("llama-2-7b", "7B", 6), ("qwen2.5-14b", "14B", 12), ("llama-3.3-70b", "70B", 48)):
        inp = PlanInput(seq=1024, lora_r=8, gradient_checkpointing=True, loss="full")
        rows.append(
            Row("LLaMA-Factory estimate", f"{name} ({model})", inp, "total", published * GIB, f"{published} GB",
                setup_known=False, note="an estimate without a setup; seq 1024, batch 1 assumed")
        )  # fmt: skip
    for row in rows[2:]:
        row.planned = _planned(arch(row.model.split("(")[-1].rstrip(")"), folder), row.inp, row.measure)
    return rows


def _setup(inp: PlanInput) -> str:
    quant = "bf16" if inp.quant == "none" else inp.quant + ("-dq" if inp.double_quant else "")
    targets = "all-linear" if inp.targets == "all-linear" else ",".join(t.removesuffix("_proj") for t in inp.targets)
    ckpt = "on" if inp.gradient_checkpointing else "off"
    upcast = ", k-bit upcast" if inp.upcast_kbit else ""
    shape = f"{inp.seq} x {inp.batch}"
    return f"{quant}{upcast}; {shape}; r={inp.lora_r} {targets}; ckpt {ckpt}; {inp.optim}; {inp.loss} loss"


UNITS = {"GB": GB, "GiB": GIB, "MB": MB, "MiB": MIB}


def _size(n: float, unit: str = "GiB") -> str:
    return f"{n / UNITS[unit]:,.2f} {unit}" if unit in ("GB", "GiB") else f"{n / UNITS[unit]:,.0f} {unit}"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| source | model | setup (quant; seq x batch; LoRA; checkpointing; optimizer; loss) | compared | published "
        "| planner | planner / published |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = f" ({r.note})" if r.note else ""
        lines.append(
            f"| {r.source} | {r.model} | {r.setup or _setup(r.inp)} | {r.measure} | {r.published_text} "
            f"| {_size(r.planned, r.unit)}{note} "
            f"| {r.ratio:.2f}{r.flag} |"
        )
    return "\n".join(lines)


def arithmetic_rows() -> list[str]:
    """Hand arithmetic for a 7B (the QLoRA paper's 4.5 / ~4.127 bits per NF4 weight, PEFT's trainable-parameter
    count, the models' configs), recomputed exactly."""
    llama2, llama3 = load_arch("llama-2-7b"), load_arch("llama-3.1-8b")
    bf16 = weight_bytes(llama2, "none", False, "bf16")
    nf4 = weight_bytes(llama2, "nf4", True, "bf16") + quant_constant_bytes(llama2, "nf4", True)
    lora = estimate(llama2, PlanInput(lora_r=16))
    logits = 2048 * llama3["vocab_size"] * 4

    def loss(**kw) -> str:
        return _size(estimate(llama3, PlanInput(seq=2048, **kw)).breakdown["logits and loss"])

    return [
        "| hand arithmetic (QLoRA paper's bits per weight, PEFT's LoRA count, model configs) | by hand | planner |",
        "|---|---|---|",
        f"| Llama-2-7B weights, bf16 | 13.48 GB | {bf16 / GB:.2f} GB |",
        f"| Llama-2-7B weights, NF4 + double quant (with constants) | ~3.87 GB | {nf4 / GB:.2f} GB |",
        f"| LoRA r=16 all-linear, Llama-2-7B | 39,976,960 params | {lora.lora_params:,} params |",
        f"| AdamW states for it (fp32) | 320 MB | {lora.breakdown['optimizer states'] / GB * 1000:.0f} MB |",
        f"| fp32 logits, 2k tokens, 128K vocabulary (s*V*4) | 0.98 GiB | {logits / GIB:.2f} GiB; the planner's loss "
        f"peak: {loss(loss='full')} full, {loss(loss='chunked')} chunked (every position trained), "
        f"{loss(loss='chunked', trained_tokens=256)} chunked at 256 trained positions, {loss(loss='fused')} fused |",
    ]


def diagnostics() -> list[str]:
    """Numbers docs/plan.md uses to explain the rows that are off."""
    llama2, llama3 = load_arch("llama-2-7b"), load_arch("llama-3.1-8b")
    h, i, layers = llama2["hidden_size"], llama2["intermediate_size"], llama2["num_hidden_layers"]
    out = []
    # torchtune (March 2024): the planner reaches 9.29 GiB reserved at batch 2 x this many tokens.
    torchtune = PlanInput(seq=1304, batch=2, lora_r=8, gradient_checkpointing=True, loss="full")
    seq = next(
        s for s in range(1304, 16384, 8) if estimate(llama2, replace(torchtune, seq=s)).peak_reserved >= 9.29 * GIB
    )
    out.append(f"- torchtune Llama-2-7B QLoRA: the planner reaches 9.29 GiB reserved at batch 2 x seq {seq}.")
    # torchtune (September 2024): its compiled chunked cross-entropy keeps the 16-bit logits only (2 bytes an entry).
    for quant, published in (("nf4", 7.4), ("none", 16.2)):
        inp = PlanInput(
            seq=2048, batch=2, quant=quant, double_quant=quant != "none", lora_r=8, gradient_checkpointing=True
        )
        plan = estimate(llama3, inp)
        loss = plan.breakdown["logits and loss"]
        two = 2 * 2 * 2048 * llama3["vocab_size"]
        allocated = plan.peak_allocated - (loss - two)
        out.append(
            f"- torchtune Llama-3.1-8B {'QLoRA' if quant == 'nf4' else 'LoRA'}: the planner's loss is "
            f"{_size(loss)} (qtune's chunked loss: 6 bytes per logit); with torchtune's 2 bytes per logit "
            f"({_size(two)}) the plan is {_size(allocated)} allocated, {allocated / (published * GIB):.2f} of the "
            f"published {published} GiB."
        )
    # LitGPT's table used bitsandbytes 0.41, whose 4-bit matmul saved its input for backward; 0.50 does not.
    # LitGPT's q,k,v (one fused matrix) and gate, up share an input: 3h + i values per token per layer.
    kept = 2 * (3 * h + i) * layers * 1304
    nf4 = estimate(llama2, PlanInput(seq=1304, lora_r=8, targets=["q_proj", "v_proj"], double_quant=False, loss="full"))
    out.append(
        f"- LitGPT nf4: bitsandbytes 0.41 kept each 4-bit matmul's input, {kept / GB:.2f} GB at seq 1304; with it the "
        f"nf4 plan is {(nf4.peak_allocated + kept) / GB:.2f} GB, {(nf4.peak_allocated + kept) / (14.14 * GB):.2f} of "
        "the published."
    )
    # Unsloth's minimum for an 8B: what the planner books, part by part, for qtune's most frugal run at seq 2048.
    plan = estimate(llama3, PlanInput(seq=2048, optim="paged_adamw8bit", gradient_checkpointing=True))
    parts = plan.breakdown
    weights = sum(parts[k] for k in ("quantized weights", "16-bit weights", "quantization constants"))
    out.append(
        f"- Unsloth's 6 GB for an 8B: qtune's frugal plan at seq 2048 is weights {_size(weights)}, activations "
        f"{_size(parts['activations'])}, loss {_size(parts['logits and loss'])}, LoRA with gradients and states "
        f"{_size(sum(parts[k] for k in ('LoRA parameters', 'LoRA gradients', 'optimizer states')))}, context and "
        f"headroom {_size(parts['CUDA context and allocator headroom'])}."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = peak_rows(folder)
        for row in rows:
            row.planned = _planned(arch(_arch_name(row.model), folder), row.inp, row.measure)
        context = context_rows(folder)
        stated = stated_rows(folder)
    print("Peak memory, published against planned:\n")
    print(markdown(rows))
    print("\nLongest context on a card (Unsloth's Hugging Face + FA2 column):\n")
    print(markdown(context))
    print("\nStated requirements (no setup published):\n")
    print(markdown(stated))
    print()
    print("\n".join(arithmetic_rows()))
    print()
    print("\n".join(diagnostics()))
    if args.json:
        data = [
            {**{k: v for k, v in asdict(r).items() if k != "inp"}, "input": asdict(r.inp), "ratio": r.ratio}
            for r in rows + context + stated
        ]
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")


def _arch_name(model: str) -> str:
    return {"Llama-2-7B": "llama-2-7b", "Llama-3.1-8B": "llama-3.1-8b", "Mistral-7B": "mistral-7b"}[model.split()[0]]


if __name__ == "__main__":
    main()
