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
import time
from pathlib import Path

from transformers import set_seed

from qtune import checkpoint, classify, lora, models, report, train
from qtune.config import RunConfig


def main(cfg: RunConfig) -> Path:
    out_dir = lora.output_dir(cfg)  # fail now, not after training, if it exists
    set_seed(cfg.train.seed)

    # 1. Base folder and tokenizer; labelled data validated and tokenized up front.
    base_path = models.resolve_base(cfg.model)
    tokenizer = models.load_tokenizer(base_path, cfg.model.trust_remote_code)
    train_examples, train_report, id2label = classify.load_labelled(cfg.data.train, tokenizer, cfg.data)
    print(f"train data: {train_report.summary()}")
    eval_examples, eval_report = [], None
    if cfg.data.eval:
        label2id = {v: k for k, v in id2label.items()}
        eval_examples, eval_report, _ = classify.load_labelled(cfg.data.eval, tokenizer, cfg.data, label2id)
        eval_examples = eval_examples[: cfg.eval.limit] if cfg.eval.limit else eval_examples
        print(f"eval data:  {eval_report.summary()}")
    if cfg.train.fit_to_vram:  # choose batch / accumulation / checkpointing that fit the GPU (qtune plan)
        cfg, note = train.fit_to_vram(cfg, base_path, max(len(e.input_ids) for e in train_examples))
        print(note)
    # Resume an interrupted run (resume=auto), or refuse to start over its checkpoints; before any model loads.
    fingerprint = models.fingerprint_base(base_path)
    run = checkpoint.identity(cfg, fingerprint, train_report.fingerprint)
    resume_from = checkpoint.prepare(cfg, run)

    # 2. The base with a classification head; LoRA on the backbone, the head (and any other module the
    #    checkpoint lacks) trained in full and saved with the adapter.
    model, head = models.load_classifier(
        base_path,
        cfg.model,
        cfg.quant,
        id2label,
        pad_token_id=tokenizer.pad_token_id,
        training=True,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        checkpoint_every=cfg.train.checkpoint_every,
        fsdp=cfg.train.fsdp,
    )
    lora_cfg = dataclasses.replace(cfg.lora, modules_to_save=sorted({*cfg.lora.modules_to_save, *head}))
    model = lora.attach_lora(model, lora_cfg, task_type="SEQ_CLS")
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"base: {cfg.model.name} ({cfg.quant.method}), new head {head}, LoRA r={cfg.lora.r}: "
        f"{trainable:,} trainable of {total:,} parameters"
    )

    # 3. Train, writing a resumable checkpoint every train.save_every steps (a NaN/inf stops it cleanly).
    print(f"training {train.planned_steps(cfg, len(train_examples))} steps of {cfg.train.batch_size} examples")
    start = time.perf_counter()
    trainer = train.build_classification_trainer(
        model, tokenizer, classify.to_dataset(train_examples), cfg, checkpoint.root(cfg)
    )
    result = train.fit(trainer, resume_from, run)
    seconds = time.perf_counter() - start
    weights = train.gathered_weights(trainer)  # under FSDP every process helps gather the sharded weights
    if not train.is_main_process():  # under torchrun / accelerate, rank 0 alone evaluates and writes
        return out_dir

    # 4. Held-out metrics: accuracy, macro-F1, per-class precision/recall, confusion matrix.
    metrics = {}
    files = {"loss.png": report.loss_curve_png(report.loss_points(trainer.state.log_history), out_dir.name)}
    if eval_examples and cfg.train.fsdp:  # a sharded model cannot run on rank 0 alone
        print(f"held-out evaluation skipped under FSDP: run `qtune eval {out_dir} --data {cfg.data.eval}`")
    elif eval_examples:
        metrics = classify.evaluate(model, tokenizer, eval_examples, id2label, cfg.eval.batch_size, "held-out")
        print(
            f"held-out: accuracy={metrics['accuracy']:.4f} macro_f1={metrics['macro_f1']:.4f} "
            f"(majority class {metrics['majority_baseline']:.4f})"
        )
        print(classify.format_confusion(metrics))
        files["confusion.png"] = classify.confusion_png(metrics, f"{out_dir.name}: held-out")

    # 5. The adapter folder: plain PEFT files (LoRA + the full head) + qtune.json with the label map.
    labels = {
        "id2label": {str(k): v for k, v in id2label.items()},
        "label2id": {v: k for k, v in id2label.items()},
        "head_modules": head,
    }
    meta = report.adapter_meta(
        "sequence-classification",
        cfg,
        base_path,
        fingerprint,
        train_report,
        eval_report,
        result,
        seconds,
        report.loss_points(trainer.state.log_history),
        metrics,
        labels=labels,
        training={
            "resumed_from_step": checkpoint.step_of(resume_from) if resume_from else None,
            "nonfinite_skipped": trainer.qtune_guard.events,
        },
    )
    lora.save_adapter(model, out_dir, meta, files=files, overwrite=cfg.output.overwrite, state_dict=weights)
    checkpoint.finish(cfg)  # the adapter is safely written: the run's checkpoints go (unless output.keep_checkpoints)
    print(f"adapter written to {out_dir} ({seconds:.0f} s of training)")
    return out_dir
