"""The demo: QLoRA-tune the embedded SmolLM2-135M-Instruct to label movie reviews, and show before/after.

    make demo            (or: python -m recipes.demo [key=value ...] to override the config)

1. prepare the embedded model (GGUF -> HF folder, once) and the VADER movie-review data;
2. evaluate the base zero-shot on the held-out split;
3. train a QLoRA (nf4) adapter with recipes/sft.py on recipes/configs/smollm2_sentiment.yaml;
4. print a before/after table, timings and a few sample generations. The adapter stays in adapters/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qtune import data, evaluate, lora, models
from qtune.config import load_config

from . import sft, vader  # relative: recipes/ in the repo is qtune.recipes once installed

CONFIG = Path(__file__).parent / "configs" / "smollm2_sentiment.yaml"
VADER_SDIST = Path("data/downloads/vaderSentiment-3.3.2.tar.gz")


def row(name: str, before: float | None, after: float | None, fmt: str, width: int = 28) -> str:
    """One line of a before/after table (`-` where there is no value)."""
    cell = lambda v: "-" if v is None else format(v, fmt)  # noqa: E731
    return f"| {name:<{width}} | {cell(before):>14} | {cell(after):>14} |"


def vader_data(folder: Path) -> None:
    """The VADER movie-review chat data in `folder` (train.jsonl, test.jsonl), prepared from the sdist once."""
    if (folder / "train.jsonl").is_file() and (folder / "test.jsonl").is_file():
        return
    if not VADER_SDIST.is_file():
        raise SystemExit(f"{VADER_SDIST} is missing: run `make install` to download it")
    sizes = vader.prepare(VADER_SDIST, folder)
    print(f"demo data: {sizes['train']} training and {sizes['test']} held-out reviews")


def main(overrides: list[str]) -> None:
    cfg = load_config(CONFIG, ["output.overwrite=true", *overrides])
    timings = {}

    start = time.perf_counter()
    vader_data(Path(cfg.data.train).parent)
    base_path = models.resolve_base(cfg.model)
    timings["prepare model and data"] = time.perf_counter() - start

    # Zero-shot: the base alone, same prompt, same quantization as training.
    start = time.perf_counter()
    tokenizer = data.apply_template(models.load_tokenizer(base_path), cfg.data.chat_template)  # as sft.main will
    held_out, _ = data.load_examples(cfg.data.eval, tokenizer, cfg.data)
    held_out = held_out[: cfg.eval.limit] if cfg.eval.limit else held_out
    base = models.load_base(base_path, cfg.model, cfg.quant)
    # The base answers in sentences ("The review is positive"): give it room, and count contained answers too.
    before, before_samples = evaluate.evaluate(
        base, tokenizer, held_out, cfg.eval.batch_size, max(16, cfg.eval.max_new_tokens), label="zero-shot"
    )
    del base
    timings["zero-shot evaluation"] = time.perf_counter() - start

    start = time.perf_counter()
    out_dir = sft.main(cfg)  # trains, evaluates on the same held-out split, writes the adapter
    timings["train + held-out evaluation"] = time.perf_counter() - start
    meta = lora.read_meta(out_dir)
    after, after_samples = meta["metrics"], meta["samples"]

    n = len(held_out)
    answers = [e.answer for e in held_out]
    majority = max(answers.count(a) for a in set(answers)) / n
    print(f"\nHeld-out VADER movie reviews (n={n}), {cfg.model.name} in {cfg.quant.method}:")
    print(f"| {'metric':<28} | {'base zero-shot':>14} | {'QLoRA adapter':>14} |")
    print(f"|{'-' * 30}|{'-' * 16}|{'-' * 16}|")
    print(row("exact-match accuracy", before.get("accuracy"), after.get("accuracy"), ".1%"))
    print(row("answer-contained accuracy", before.get("contains_accuracy"), after.get("contains_accuracy"), ".1%"))
    print(row("majority-class baseline", majority, majority, ".1%"))
    print(row("answer loss (nats/token)", before["loss"], after["loss"], ".3f"))
    print(row("answer perplexity", before["perplexity"], after["perplexity"], ".2f"))
    print(
        f"\ntraining: {meta['training']['steps']} steps in {meta['training']['seconds']:.0f} s "
        f"({meta['training']['trained_tokens']} answer tokens in the training set)"
    )
    for name, seconds in timings.items():
        print(f"  {name:<30} {seconds:6.0f} s")
    print(f"  {'total':<30} {sum(timings.values()):6.0f} s")

    by_row = {s["row"]: s for s in before_samples}
    print("\nSample generations (held-out):")
    for s in after_samples[:6]:
        review = next(e for e in held_out if e.row == s["row"])
        text = tokenizer.decode(review.prompt_ids).split("Review: ", 1)[-1].split("\nIs this", 1)[0]
        print(
            f"- {text[:90]}{'...' if len(text) > 90 else ''}\n    truth: {s['answer']:<9} "
            f"base: {by_row[s['row']]['output']!r:<28} adapter: {s['output']!r}"
        )
    print(
        f'\nadapter: {out_dir}  (try: qtune generate {out_dir} --prompt "Review: A joy from start to finish.'
        f'\\nIs this movie review positive or negative?")'
    )


if __name__ == "__main__":
    main(sys.argv[1:])
