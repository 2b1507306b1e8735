"""The preference demo: teach the embedded SmolLM2-135M-Instruct, by DPO on its own answers, to label movie
reviews with one word, and show before/after on held-out reviews.

    make demo-dpo        (or: python -m recipes.demo_dpo [key=value ...] to override the config)

1. prepare the embedded model and the VADER movie-review data (as make demo does);
2. build preference pairs on-policy: for each review the correct one-word label is chosen over the base's own greedy
   answer (what it says before tuning: a sentence) and over the other label, for training and held-out reviews
   alike; written to data/vader_movies_dpo/{train,test}.jsonl;
3. measure the base on the held-out reviews: exact-match accuracy, answer length, and how often it prefers the
   chosen answer of a held-out pair;
4. train a QLoRA adapter with recipes/dpo.py on recipes/configs/smollm2_sentiment_dpo.yaml (the reference model is
   the base with the adapter off: no second copy), and measure the same things with the adapter on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qtune import data, evaluate, lora, models
from qtune.config import load_config

from . import dpo  # relative: recipes/ in the repo is qtune.recipes once installed
from .demo import row, vader_data

CONFIG = Path(__file__).parent / "configs" / "smollm2_sentiment_dpo.yaml"
SOURCE = Path("data/vader_movies")  # the SFT demo's chat data: the reviews and their labels
TRAIN_REVIEWS = 128  # training reviews the base answers (two pairs each)
HELD_OUT_REVIEWS = 64
MAX_ANSWER = 16  # tokens of the base's answer kept as the rejected one


def _reviews(file: Path, tokenizer, cfg, limit: int):
    """The first `limit` reviews of an SFT chat file: their chat records and tokenized examples (same order)."""
    records = [json.loads(line) for line in file.read_text().splitlines()[:limit]]
    subset = file.parent / f".{file.stem}-{limit}.jsonl"  # (the loader reads files: a subset of the file)
    subset.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples, _ = data.load_examples(subset, tokenizer, cfg.data)
    return records, list(examples)


def build_pairs(model, tokenizer, cfg, file: Path, out: Path, limit: int) -> dict:
    """Pairs for `limit` reviews of `file`, into `out`: each label chosen over the base's greedy answer (where that
    is not the label itself) and over the other label."""
    records, examples = _reviews(file, tokenizer, cfg, limit)
    answers = evaluate.generate_ids(
        model, tokenizer, [e.prompt_ids for e in examples], MAX_ANSWER, cfg.eval.batch_size, f"base answers {file.name}"
    )
    labels = sorted({r["messages"][-1]["content"] for r in records})
    pairs = []
    for record, answer in zip(records, answers):
        label = record["messages"][-1]["content"]
        prompt = [{"role": "system", "content": cfg.data.system_prompt}, *record["messages"][:-1]]
        # The label over the base's own answer (the format: one word), and over the other label (the judgement).
        if answer.strip() and evaluate.normalize_answer(answer) != evaluate.normalize_answer(label):
            pairs.append({"prompt": prompt, "chosen": label, "rejected": answer.strip()})
        pairs += [{"prompt": prompt, "chosen": label, "rejected": other} for other in labels if other != label]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"reviews": len(records), "pairs": len(pairs)}


def measure(model, tokenizer, cfg, examples, pairs) -> dict:
    """Exact-match accuracy and answer length on held-out reviews; preference accuracy on held-out pairs."""
    acc, samples = evaluate.answer_accuracy(model, tokenizer, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    words = sum(len(s["output"].split()) for s in samples) / len(samples)
    prefs = evaluate.preference_metrics(model, pairs, tokenizer.pad_token_id, cfg.dpo.beta, cfg.eval.batch_size)
    return {**acc, "answer_words": words, **prefs, "samples": samples}


def main(overrides: list[str]) -> None:
    cfg = load_config(CONFIG, ["output.overwrite=true", *overrides])
    timings = {}

    start = time.perf_counter()
    vader_data(SOURCE)
    base_path = models.resolve_base(cfg.model)
    tokenizer = data.apply_template(models.load_tokenizer(base_path), cfg.data.chat_template)
    timings["prepare model and data"] = time.perf_counter() - start

    # On-policy pairs: what the base itself says, against the label.
    start = time.perf_counter()
    base = models.load_base(base_path, cfg.model, cfg.quant)
    train_file, test_file = Path(cfg.data.train), Path(cfg.data.eval)
    sizes = {
        "train": build_pairs(base, tokenizer, cfg, SOURCE / "train.jsonl", train_file, TRAIN_REVIEWS),
        "held-out": build_pairs(base, tokenizer, cfg, SOURCE / "test.jsonl", test_file, HELD_OUT_REVIEWS),
    }
    for split, n in sizes.items():
        print(f"{split}: {n['pairs']} pairs from {n['reviews']} reviews")
    timings["build pairs (base answers)"] = time.perf_counter() - start

    start = time.perf_counter()
    _, held_out = _reviews(SOURCE / "test.jsonl", tokenizer, cfg, HELD_OUT_REVIEWS)
    held_pairs, _ = data.load_pairs(str(test_file), tokenizer, cfg.data)
    before = measure(base, tokenizer, cfg, held_out, held_pairs)
    del base
    timings["base: held-out metrics"] = time.perf_counter() - start

    start = time.perf_counter()
    out_dir = dpo.main(cfg)  # trains, evaluates on the held-out pairs, writes the adapter
    timings["DPO training + its evaluation"] = time.perf_counter() - start

    start = time.perf_counter()
    model, _, _, _ = lora.load_adapter(out_dir)
    after = measure(model, tokenizer, cfg, held_out, held_pairs)
    timings["adapter: held-out metrics"] = time.perf_counter() - start
    meta = lora.read_meta(out_dir)

    print(f"\nHeld-out VADER movie reviews (n={len(held_out)}; {len(held_pairs)} held-out pairs), {cfg.model.name}:")
    print(f"| {'metric':<34} | {'base':>14} | {'DPO adapter':>14} |")
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 16}|")
    print(row("exact-match accuracy", before["accuracy"], after["accuracy"], ".1%", 34))
    print(row("answer-contained accuracy", before["contains_accuracy"], after["contains_accuracy"], ".1%", 34))
    print(row("answer length (words)", before["answer_words"], after["answer_words"], ".2f", 34))
    print(
        row("prefers chosen (held-out pairs)", before["preference_accuracy"], after["preference_accuracy"], ".1%", 34)
    )
    print(row("reward accuracy (held-out pairs)", None, after.get("reward_accuracy"), ".1%", 34))
    print(row("reward margin (held-out pairs)", None, after.get("reward_margin"), ".3f", 34))
    print(f"\ntraining: {meta['training']['steps']} steps in {meta['training']['seconds']:.0f} s")
    for name, seconds in timings.items():
        print(f"  {name:<32} {seconds:6.0f} s")
    print(f"  {'total':<32} {sum(timings.values()):6.0f} s")

    print("\nSample answers (held-out):")
    for b, a in list(zip(before["samples"], after["samples"]))[:6]:
        print(f"  truth: {a['answer']:<9} base: {b['output'][:40]!r:<44} adapter: {a['output']!r}")
    print(f"\nadapter: {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
