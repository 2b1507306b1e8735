"""Sequence classification with (Q)LoRA: a quantized base + LoRA on the backbone + a head trained in full.

Run it:
    qtune train recipes/configs/minilm_movies.yaml        # an encoder (BERT)
    qtune train recipes/configs/smollm2_movies_cls.yaml   # a decoder (Llama): pools on the last real token
Copy it to change what it does:  qtune cp classify my_classify.py

Data: one record per text with a label (`data.text_field`, `data.label_field`), labels as text or
integers. The new head is found by comparing the model with the checkpoint, kept out of
quantization, trained in full and saved with the adapter (peft modules_to_save): a reload can
never re-initialise it. The adapter folder holds the label map and a confusion-matrix PNG.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from qtune import classify, lora, models, train
from qtune.config import RunConfig
from qtune.meta import CLASSIFIER, Labels


def main(cfg: RunConfig) -> Path:
    # 1. The run (output folder checked, seed, base and tokenizer); labelled data validated and tokenized up front.
    run = train.start(cfg)
    tokenizer = run.tokenizer
    train_examples, train_report, id2label = classify.load_labelled(cfg.data.train, tokenizer, cfg.data)
    print(f"train data: {train_report.summary()}")
    # Held-out data: data.eval (its labels must be known to the training set), or a seeded data.eval_fraction.
    label2id = {v: k for k, v in id2label.items()}
    read_eval = partial(classify.load_labelled, tokenizer=tokenizer, cfg=cfg.data, label2id=label2id)
    train_examples, eval_examples, eval_report = run.held_out(train_examples, read_eval)
    # train.fit_to_vram; resume an interrupted run (resume=auto) or refuse to start over it; before any model loads.
    cfg = run.prepare(train_report, longest=max(len(e.input_ids) for e in train_examples))

    # 2. The base with a classification head; LoRA on the backbone, the head (and any other module the
    #    checkpoint lacks) trained in full and saved with the adapter.
    model, head = models.load_classifier(
        run.base_path, cfg.model, cfg.quant, id2label, tokenizer.pad_token_id, cfg.train
    )
    lora_cfg = dataclasses.replace(cfg.lora, modules_to_save=sorted({*cfg.lora.modules_to_save, *head}))
    model = lora.attach_lora(model, lora_cfg, task_type="SEQ_CLS")
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"base: {cfg.model.name} ({cfg.quant.method}), new head {head}, LoRA r={cfg.lora.r}: "
        f"{trainable:,} trainable of {total:,} parameters"
    )

    # 3. Train, checkpointing as it goes (a NaN/inf stops it cleanly); every train.eval_every steps, the loss on a
    #    sample of the held-out data is logged too (and to TensorBoard: train.report_to).
    watched = run.eval_sample(eval_examples)
    watched = classify.to_dataset(watched) if watched else None
    dataset = classify.to_dataset(train_examples)
    trainer = train.build_classification_trainer(model, tokenizer, dataset, cfg, run.checkpoints, eval_dataset=watched)
    run.train(trainer)
    if not run.writes:  # under torchrun / accelerate, rank 0 alone evaluates and writes
        return run.out_dir

    # 4. Held-out metrics: accuracy, macro-F1, per-class precision/recall, confusion matrix.
    metrics, files = {}, {}
    if run.evaluates(eval_examples):
        metrics = classify.evaluate(model, tokenizer, eval_examples, id2label, cfg.eval.batch_size, "held-out")
        print(
            f"held-out: accuracy={metrics['accuracy']:.4f} macro_f1={metrics['macro_f1']:.4f} "
            f"(majority class {metrics['majority_baseline']:.4f})"
        )
        print(classify.format_confusion(metrics))
        files["confusion.png"] = classify.confusion_png(metrics, f"{run.out_dir.name}: held-out")

    # 5. The adapter folder: plain PEFT files (LoRA + the full head) + qtune.json with the label map.
    return run.save(
        model,
        trainer,
        kind=CLASSIFIER,
        train_report=train_report,
        eval_report=eval_report,
        metrics=metrics,
        files=files,
        labels=Labels(id2label, head),
    )
