"""`qtune plan` against torch.cuda.max_memory_allocated on a real GPU (issue: plan within 10% of measured).

Run on a CUDA machine (about 5 minutes per family on one H200, most of it writing a random checkpoint):
    HF_HUB_OFFLINE=1 python benchmarks/plan_vs_measured.py                                # Llama-2-7B shape, nf4
    HF_HUB_OFFLINE=1 python benchmarks/plan_vs_measured.py --arch llama-3.1-8b qwen2.5-7b  # two families
    HF_HUB_OFFLINE=1 python benchmarks/plan_vs_measured.py --tiny     # the same code on a tiny model, CPU ok

A random-initialised model of each built-in shape (`qtune ls` lists them) is saved once as safetensors, then each
configuration loads it through qtune (nf4 + double quant, prepare_model_for_kbit_training, LoRA
all-linear) and trains 3 steps with qtune's SFTTrainer on random tokens, every token trained,
exactly at the planned sequence length. The peak of torch.cuda.max_memory_allocated (reset
after loading, so it includes the weights already resident) is compared with Plan.peak_allocated.
Results are printed as a markdown table, not asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
from pathlib import Path

import torch

from qtune import data, lora, plan, train
from qtune import models as qmodels
from qtune.config import load_config

CONFIGS = [  # (seq, batch, gradient checkpointing)
    (512, 1, False),
    (2048, 1, True),
    (2048, 1, False),
    (2048, 2, True),
    (4096, 1, True),
]


def make_base(folder: Path, name: str, tiny: bool) -> Path:
    """A random model of the built-in shape `name` (its model_type's own transformers class), saved to `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(plan.BUILTIN[name])
    fields = {k: v for k, v in arch.items() if k != "model_type"}
    fields["max_position_embeddings"] = 8192
    if tiny:  # the family's own class and config, at a size a CPU trains in seconds
        fields.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=512)
        fields.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = AutoConfig.for_model(arch["model_type"], **fields)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    _placeholder_tokenizer().save_pretrained(folder)  # the data are token ids; the trainer only needs pad/eos
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def _placeholder_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def measure(base: Path, seq: int, batch: int, checkpointing: bool) -> int | None:
    cfg = load_config(
        None,
        [
            f"model.name={base}",
            f"train.batch_size={batch}",
            "train.max_steps=3",
            f"train.gradient_checkpointing={checkpointing}",
            "train.group_by_length=false",
            "output.name=unused",
        ],
    )
    model = qmodels.load_base(
        base, cfg.model, cfg.quant, dataclasses.replace(cfg.train, gradient_checkpointing=checkpointing)
    )
    model = lora.attach_lora(model, cfg.lora)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = [
        data.Example(input_ids=ids, labels=ids, row=i)
        for i, ids in enumerate(torch.randint(3, vocab, (batch * 3, seq), generator=g).tolist())
    ]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as work:
        tokenizer = qmodels.load_tokenizer(base)
        trainer = train.build_sft_trainer(model, tokenizer, data.to_dataset(examples), cfg, Path(work))
        trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["llama-2-7b"], help="built-in shapes to measure")
    parser.add_argument("--tiny", action="store_true", help="2-layer models of those shapes (checks the script)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    print("| model | seq | batch | checkpointing | planned peak allocated | measured | measured / planned |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure_family(name, Path(tmp) / "base", args.tiny)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def measure_family(name: str, folder: Path, tiny: bool) -> list[dict]:
    """Plan and measure each configuration on a random model of the built-in shape `name`."""
    base = make_base(folder, name, tiny)
    arch = plan.load_arch(str(base))
    rows = []
    for seq, batch, ckpt in [(64, 1, False), (64, 2, True)] if tiny else CONFIGS:
        predicted = plan.estimate(arch, plan.PlanInput(seq=seq, batch=batch, gradient_checkpointing=ckpt))
        measured = measure(base, seq, batch, ckpt)
        ratio = f"{measured / predicted.peak_allocated:.3f}" if measured else "(no GPU)"
        shown = f"{measured / 2**30:.2f} GiB" if measured else "-"
        print(
            f"| {name} | {seq} | {batch} | {'on' if ckpt else 'off'} | {predicted.peak_allocated / 2**30:.2f} GiB "
            f"| {shown} | {ratio} |",
            flush=True,
        )
        row = {"model": name, "seq": seq, "batch": batch, "checkpointing": ckpt}
        rows.append({**row, "planned": predicted.peak_allocated, "measured": measured})
    return rows


if __name__ == "__main__":
    main()
