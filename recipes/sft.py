"""Supervised fine-tuning with (Q)LoRA: a base in 4-bit/8-bit/16-bit + your data -> a PEFT adapter.

Run it:
    qtune train recipes/configs/smollm2_sentiment.yaml
    qtune train my_config.yaml train.lr=1e-4 lora.r=8      # dotted overrides
Copy it to change what it does, then point a config's `recipe:` (or `qtune train`) at your copy:
    qtune cp sft my_sft.py

Steps: resolve the base -> read and tokenize the data (every bad record is reported) -> load the
base quantized -> attach LoRA -> train with trl's SFTTrainer, checkpointing as it goes -> evaluate on
held-out data -> write adapters/<name>/ atomically (plain PEFT files + qtune.json + loss.png).
Interrupted (a crash, a kill, a full disk)? `qtune train CONFIG resume=auto` continues from the last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import set_seed

from qtune import checkpoint, data, evaluate, lora, models, report, train
from qtune.config import RunConfig


def main(cfg: RunConfig) -> Path:
    out_dir = lora.output_dir(cfg)  # fail now, not after an hour of training, if it exists
    set_seed(cfg.train.seed)

    # 1. The base's folder and tokenizer (the embedded SmolLM2 is converted once, on first use).
    base_path = models.resolve_base(cfg.model)
    tokenizer = models.load_tokenizer(base_path, cfg.model.trust_remote_code)

    # 2. Data: validated and tokenized up front, so a bad record fails the run before any training.
    if not cfg.data.train:
        raise data.DataError("data.train is not set: point it at a .jsonl/.csv/.parquet file")
    train_examples, train_report = data.load_examples(cfg.data.train, tokenizer, cfg.data)
    print(f"train data: {train_report.summary()}")
    eval_examples, eval_report = [], None
    if cfg.data.eval:
        eval_examples, eval_report = data.load_examples(cfg.data.eval, tokenizer, cfg.data)
        eval_examples = eval_examples[: cfg.eval.limit] if cfg.eval.limit else eval_examples
        print(f"eval data:  {eval_report.summary()}")
    if cfg.train.fit_to_vram:  # choose batch / accumulation / checkpointing that fit the GPU (qtune plan)
        cfg, note = train.fit_to_vram(cfg, base_path, max(len(e.input_ids) for e in train_examples))
        print(note)
    # Resume an interrupted run (resume=auto), or refuse to start over its checkpoints; before any model loads.
    fingerprint = models.fingerprint_base(base_path)
    run = checkpoint.identity(cfg, fingerprint, train_report.fingerprint)
    resume_from = checkpoint.prepare(cfg, run)

    # 3. The base, quantized and frozen; then fresh LoRA adapters on top.
    model = models.load_base(
        base_path,
        cfg.model,
        cfg.quant,
        training=True,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        checkpoint_every=cfg.train.checkpoint_every,
        fsdp=cfg.train.fsdp,
    )
    model = lora.attach_lora(model, cfg.lora)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"base: {cfg.model.name} ({cfg.quant.method}), LoRA r={cfg.lora.r}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )

    # 4. Train, writing a resumable checkpoint every train.save_every steps (a NaN/inf stops it cleanly).
    steps = train.planned_steps(cfg, len(train_examples))
    print(f"training {steps} steps of {cfg.train.batch_size}x{cfg.train.grad_accum} examples")
    start = time.perf_counter()
    trainer = train.build_sft_trainer(model, tokenizer, data.to_dataset(train_examples), cfg, checkpoint.root(cfg))
    result = train.fit(trainer, resume_from, run)
    seconds = time.perf_counter() - start
    weights = train.gathered_weights(trainer)  # under FSDP every process helps gather the sharded weights
    if not train.is_main_process():  # under torchrun / accelerate, rank 0 alone evaluates and writes
        return out_dir
    losses = report.loss_points(trainer.state.log_history)

    # 5. Held-out evaluation: loss, perplexity, and exact-match accuracy of generated answers.
    metrics, samples = {}, []
    if eval_examples and cfg.train.fsdp:  # a sharded model cannot run on rank 0 alone
        print(f"held-out evaluation skipped under FSDP: run `qtune eval {out_dir} --data {cfg.data.eval}`")
    elif eval_examples:
        metrics, samples = evaluate.evaluate(
            model, tokenizer, eval_examples, cfg.eval.batch_size, cfg.eval.max_new_tokens, label="held-out"
        )
        print("held-out:", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    # 6. The adapter folder: plain PEFT files + qtune.json + loss curve, written atomically.
    meta = report.adapter_meta(
        "causal-lm",
        cfg,
        base_path,
        fingerprint,
        train_report,
        eval_report,
        result,
        seconds,
        losses,
        metrics,
        training={
            "trained_tokens": train_report.trained_tokens,
            "resumed_from_step": checkpoint.step_of(resume_from) if resume_from else None,
            "nonfinite_skipped": trainer.qtune_guard.events,
        },
        samples=samples[:20],
        chat_template=tokenizer.chat_template,
    )
    png = report.loss_curve_png(losses, f"{out_dir.name}: {cfg.model.name}, LoRA r={cfg.lora.r}")
    lora.save_adapter(model, out_dir, meta, files={"loss.png": png}, overwrite=cfg.output.overwrite, state_dict=weights)
    checkpoint.finish(cfg)  # the adapter is safely written: the run's checkpoints go (unless output.keep_checkpoints)
    print(f"adapter written to {out_dir} ({seconds:.0f} s of training)")
    return out_dir


if __name__ == "__main__":
    import sys

    from qtune.cli import main as cli_main

    cli_main(["train", *sys.argv[1:]])
