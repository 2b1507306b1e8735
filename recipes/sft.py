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

from functools import partial
from pathlib import Path

from qtune import data, evaluate, lora, models, train
from qtune.config import RunConfig
from qtune.meta import CAUSAL_LM


def main(cfg: RunConfig) -> Path:
    # 1. The run: the output folder checked (fail now, not after an hour of training), seed, base and tokenizer.
    run = train.start(cfg)
    tokenizer = run.tokenizer

    # 2. Data: validated and tokenized up front, so a bad record fails the run before any training.
    train_examples, train_report = data.load_train(cfg.data, tokenizer, cfg.train.seed)
    print(f"train data: {train_report.summary()}")
    # Held-out data: data.eval, or a seeded data.eval_fraction of the training data.
    read_eval = partial(data.load_examples, tokenizer=tokenizer, cfg=cfg.data)
    train_examples, eval_examples, eval_report = run.held_out(train_examples, read_eval)
    train_examples = data.weighted(train_examples, cfg.data, cfg.train.seed)  # each source's data.train weight
    # train.fit_to_vram; resume an interrupted run (resume=auto) or refuse to start over it; before any model loads.
    cfg = run.prepare(train_report, longest=max(train_examples.lengths()))

    # 3. The base, quantized and frozen; then fresh LoRA adapters on top.
    model = models.load_base(run.base_path, cfg.model, cfg.quant, cfg.train)
    model = lora.attach_lora(model, cfg.lora)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"base: {cfg.model.name} ({cfg.quant.method}), LoRA r={cfg.lora.r}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )

    # 4. Train with trl's SFTTrainer, checkpointing as it goes (a NaN/inf stops it cleanly); every train.eval_every
    #    steps, the loss on a sample of the held-out data is logged too (and to TensorBoard: train.report_to).
    watched = run.eval_sample(eval_examples)
    watched = data.to_dataset(watched) if watched else None
    trainer = train.build_sft_trainer(
        model, tokenizer, data.to_dataset(train_examples), cfg, run.checkpoints, eval_dataset=watched
    )
    run.train(trainer)
    if not run.writes:  # under torchrun / accelerate, rank 0 alone evaluates and writes
        return run.out_dir

    # 5. Held-out evaluation: loss, perplexity, and exact-match accuracy of generated answers.
    metrics, samples = {}, []
    if run.evaluates(eval_examples):
        metrics, samples = evaluate.evaluate(
            model, tokenizer, eval_examples, cfg.eval.batch_size, cfg.eval.max_new_tokens, label="held-out"
        )
        print("held-out:", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    # 6. The adapter folder: plain PEFT files + qtune.json + loss curve, written atomically.
    return run.save(
        model,
        trainer,
        kind=CAUSAL_LM,
        train_report=train_report,
        eval_report=eval_report,
        metrics=metrics,
        training={"trained_tokens": train_report.trained_tokens},
        samples=samples[:20],
        chat_template=tokenizer.chat_template,
    )


if __name__ == "__main__":
    import sys

    from qtune.cli import main as cli_main

    cli_main(["train", *sys.argv[1:]])
