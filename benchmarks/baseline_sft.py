"""The baseline qtune is measured against: QLoRA SFT as a user writes it from the TRL and PEFT docs.

    HF_HUB_OFFLINE=1 python benchmarks/baseline_sft.py --model PATH --data data/vader_movies/train.jsonl

BitsAndBytesConfig (nf4, double quantization, bf16 compute) + LoraConfig (all-linear) + SFTTrainer
with SFTConfig's defaults for everything the docs do not set. The data are turned into TRL's
conversational prompt/completion form, so SFTTrainer takes the loss on the completion only (its
default for that form), as qtune does. Hyper-parameters are matched to qtune's demo config; LoRA
dropout is 0 as in qtune (the docs' 0.05 would only slow the baseline down).

benchmarks/train_speed.py runs this file in a subprocess and reads the JSON line it prints last.
Nothing in it is qtune's: that is the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF model folder")
    parser.add_argument("--data", required=True, help=".jsonl of {'messages': [...]} records")
    parser.add_argument("--system-prompt", default="Answer with one word: positive or negative.")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", default="/tmp/baseline_sft", help="output_dir (nothing is saved)")
    parser.add_argument("--gradient-checkpointing", choices=["default", "on", "off"], default="default")
    args = parser.parse_args()

    # 1. The model in 4-bit (the PEFT / TRL QLoRA docs).
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=bnb_config, dtype=torch.bfloat16, device_map="auto"
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    # 2. The data: chat records split into a prompt (system + user) and a completion (the reply).
    def to_prompt_completion(record):
        messages = [{"role": "system", "content": args.system_prompt}, *record["messages"]]
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    dataset = load_dataset("json", data_files=args.data, split="train")
    if "messages" in dataset.column_names:  # (records of token ids, as the GPU workload writes, go in as they are)
        dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)

    # 3. LoRA and the trainer.
    peft_config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    extra = {}
    if args.gradient_checkpointing != "default":  # SFTConfig's default is on
        extra["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    training_args = SFTConfig(
        output_dir=args.work,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=args.max_length,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),  # transformers asks for it to train in bf16 on a CPU
        **extra,
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    # Measurement only (not part of a user's script), with the harness's own helpers, as for qtune's arm:
    # non-padding tokens fed to the model, RSS after every step, wall time of train().
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.train_speed import _count_tokens, _trace_rss

    counts = _count_tokens(trainer)
    trace = _trace_rss(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    trained = sum(counts[: args.steps * args.grad_accum])  # the collator may build a batch ahead
    print(
        json.dumps(
            {"tokens": trained, "seconds": seconds, "losses": losses, "gpu_peak": gpu_peak, "rss_by_step": trace}
        )
    )


if __name__ == "__main__":
    main()
