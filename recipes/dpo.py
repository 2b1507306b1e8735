"""Preference tuning with (Q)LoRA: DPO (and IPO, hinge, robust) on (prompt, chosen, rejected) pairs, or KTO on
(prompt, completion, good/bad) records -> a PEFT adapter, like recipes/sft.py's.

Run it:
    qtune train recipes/configs/smollm2_sentiment_dpo.yaml          # make demo-dpo builds its pairs first
    qtune train my_config.yaml dpo.loss=kto dpo.beta=0.2             # dotted overrides
    qtune train my_config.yaml lora.from_adapter=adapters/my-sft     # start from an SFT adapter
Copy it to change what it does:  qtune cp dpo my_dpo.py

Steps: resolve the base -> read and tokenize the pairs (every bad record is reported: missing or identical
chosen/rejected, a prompt that leaves no room for the answer) -> load the base quantized -> fresh LoRA, or
lora.from_adapter's -> train with trl's DPOTrainer (KTOTrainer for dpo.loss=kto) -> held-out preference metrics ->
write adapters/<name>/ atomically. The reference model is the same model under a frozen copy of the starting LoRA
weights (the base itself for a fresh adapter; lora.from_adapter's otherwise): never a second copy of the base.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from qtune import data, evaluate, lora, models, train
from qtune.config import RunConfig
from qtune.meta import CAUSAL_LM


def main(cfg: RunConfig) -> Path:
    # 1. The run: the output folder checked, seed, base and tokenizer.
    run = train.start(cfg)
    tokenizer = run.tokenizer
    kto = cfg.dpo.loss == "kto"

    # 2. Preference data, validated and tokenized up front: pairs for DPO, judged completions for KTO (a pair file
    #    gives one good and one bad completion per pair).
    load = data.load_judged if kto else data.load_pairs
    train_items, train_report = load(cfg.data.train, tokenizer, cfg.data)
    print(f"train data: {train_report.summary()}")
    train_items, eval_items, eval_report = run.held_out(train_items, partial(load, tokenizer=tokenizer, cfg=cfg.data))
    cfg = run.prepare(train_report, longest=max(data.longest(item) for item in train_items))

    # 3. The base, quantized and frozen; LoRA on top (fresh, or lora.from_adapter's).
    model = models.load_base(run.base_path, cfg.model, cfg.quant, cfg.train)
    model = lora.attach_lora(model, cfg.lora)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"base: {cfg.model.name} ({cfg.quant.method}), {trainable:,} trainable of {total:,} parameters")

    # 4. Train with trl's DPOTrainer / KTOTrainer, checkpointing as it goes; every train.eval_every steps the
    #    preference loss on a sample of the held-out data is logged too.
    to_dataset = data.judged_dataset if kto else data.pairs_dataset
    watched = run.eval_sample(eval_items)
    trainer = train.build_dpo_trainer(
        model,
        tokenizer,
        to_dataset(train_items),
        cfg,
        run.checkpoints,
        eval_dataset=to_dataset(watched) if watched else None,
    )
    run.train(trainer)
    if not run.writes:  # under torchrun / accelerate, rank 0 alone evaluates and writes
        return run.out_dir

    # 5. Held-out: how often the adapter prefers the chosen answer, the reward margin against the reference, and
    #    (pairs with a reference answer) exact-match accuracy of its greedy answers.
    metrics, samples = {}, []
    if run.evaluates(eval_items) and not kto:
        metrics, samples = evaluate.evaluate_preferences(
            model, tokenizer, eval_items, cfg.dpo.beta, cfg.eval.batch_size, cfg.eval.max_new_tokens, "held-out"
        )
        print("held-out:", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    # 6. The adapter folder: plain PEFT files + qtune.json (method, loss, beta) + loss curve, written atomically.
    return run.save(
        model,
        trainer,
        kind=CAUSAL_LM,
        train_report=train_report,
        eval_report=eval_report,
        metrics=metrics,
        training={
            "method": "kto" if kto else "dpo",
            "loss": cfg.dpo.loss,
            "beta": cfg.dpo.beta,
            "from_adapter": cfg.lora.from_adapter,
            "trained_tokens": train_report.trained_tokens,
        },
        samples=samples[:20],
        chat_template=tokenizer.chat_template,
    )


if __name__ == "__main__":
    import sys

    from qtune.cli import main as cli_main

    cli_main(["train", *sys.argv[1:]])
