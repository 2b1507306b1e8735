"""`qtune plan` against torch.cuda.max_memory_allocated on a real GPU (issue: plan within 10% of measured).

Run on a CUDA machine (about 5 minutes on one H200, most of it writing a random 7B checkpoint):
    HF_HUB_OFFLINE=1 python benchmarks/plan_vs_measured.py            # Llama-2-7B shape, nf4
    HF_HUB_OFFLINE=1 python benchmarks/plan_vs_measured.py --tiny     # the same code on a tiny model, CPU ok

A random-initialised model of the Llama-2-7B shape is saved once as safetensors, then each
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


def make_base(folder: Path, tiny: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = plan.BUILTIN["smollm2-135m" if tiny else "llama-2-7b"]
    config = LlamaConfig(
        vocab_size=arch["vocab_size"],
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=2 if tiny else arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"],
        tie_word_embeddings=arch["tie_word_embeddings"],
        max_position_embeddings=8192,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
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
    parser.add_argument("--tiny", action="store_true", help="a 2-layer SmolLM2-shape model (checks the script)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp) / "base", args.tiny)
        arch = plan.load_arch(str(base))
        configs = [(64, 1, False), (64, 2, True)] if args.tiny else CONFIGS
        print("| seq | batch | checkpointing | planned peak allocated | measured | measured / planned |")
        print("|---:|---:|---|---:|---:|---:|")
        for seq, batch, ckpt in configs:
            predicted = plan.estimate(arch, plan.PlanInput(seq=seq, batch=batch, gradient_checkpointing=ckpt))
            measured = measure(base, seq, batch, ckpt)
            ratio = f"{measured / predicted.peak_allocated:.3f}" if measured else "(no GPU)"
            shown = f"{measured / 2**30:.2f} GiB" if measured else "-"
            print(
                f"| {seq} | {batch} | {'on' if ckpt else 'off'} | {predicted.peak_allocated / 2**30:.2f} GiB "
                f"| {shown} | {ratio} |",
                flush=True,
            )
            rows.append(
                {
                    "seq": seq,
                    "batch": batch,
                    "checkpointing": ckpt,
                    "planned": predicted.peak_allocated,
                    "measured": measured,
                }
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
