"""The reward demo: GRPO teaches the embedded SmolLM2-135M-Instruct to answer movie-review questions with the
right one-word label, rewarded by plain Python functions (recipes/rewards.py); before/after on held-out reviews.

    make demo-grpo       (or: python -m recipes.demo_grpo [key=value ...] to override the config)

1. prepare the embedded model and the VADER movie-review data (as make demo does);
2. score the base's greedy answers to the held-out reviews with the run's reward functions;
3. train a QLoRA adapter with recipes/grpo.py on recipes/configs/smollm2_sentiment_grpo.yaml: each step samples
   grpo.group_size answers per review and moves the adapter toward the better ones of each group;
4. print the held-out rewards, exact-match accuracy and answer length before and after.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qtune import data, evaluate, lora, models, rewards
from qtune.config import load_config

from . import grpo  # relative: recipes/ in the repo is qtune.recipes once installed
from .demo import row, vader_data

CONFIG = Path(__file__).parent / "configs" / "smollm2_sentiment_grpo.yaml"


def main(overrides: list[str]) -> None:
    cfg = load_config(CONFIG, ["output.overwrite=true", *overrides])
    timings = {}

    start = time.perf_counter()
    vader_data(Path(cfg.data.train).parent)
    base_path = models.resolve_base(cfg.model)
    tokenizer = data.apply_template(models.load_tokenizer(base_path), cfg.data.chat_template)  # as grpo.main will
    held_out, _ = data.load_prompts(cfg.data.eval, tokenizer, cfg.data, cfg.grpo.max_new_tokens)
    held_out = held_out[: cfg.eval.limit] if cfg.eval.limit else held_out
    reward_funcs = [rewards.load_reward(path) for path in cfg.grpo.rewards]
    timings["prepare model and data"] = time.perf_counter() - start

    start = time.perf_counter()
    base = models.load_base(base_path, cfg.model, cfg.quant)
    before, before_samples = evaluate.evaluate_rewards(
        base, tokenizer, held_out, cfg.grpo, reward_funcs, cfg.eval.batch_size, "base"
    )
    del base
    timings["base: held-out rewards"] = time.perf_counter() - start

    start = time.perf_counter()
    out_dir = grpo.main(cfg)  # trains, scores the same held-out reviews, writes the adapter
    timings["GRPO training + its evaluation"] = time.perf_counter() - start
    meta = lora.read_meta(out_dir)
    after, after_samples = meta["metrics"], meta["samples"]

    print(f"\nHeld-out VADER movie reviews (n={len(held_out)}), {cfg.model.name} in {cfg.quant.method}:")
    print(f"| {'metric':<34} | {'base':>14} | {'GRPO adapter':>14} |")
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 16}|")
    for key in before:
        if key.startswith("reward"):
            print(row(f"{key} (mean)", before[key], after.get(key), ".3f", 34))
    print(row("exact-match accuracy", before.get("accuracy"), after.get("accuracy"), ".1%", 34))
    print(row("answer length (words)", before["answer_words"], after.get("answer_words"), ".2f", 34))
    print(f"\ntraining: {meta['training']['steps']} steps in {meta['training']['seconds']:.0f} s")
    for name, seconds in timings.items():
        print(f"  {name:<32} {seconds:6.0f} s")
    print(f"  {'total':<32} {sum(timings.values()):6.0f} s")

    print("\nSample answers (held-out):")
    for b, a in list(zip(before_samples, after_samples))[:6]:
        print(f"  truth: {a['answer']:<9} base: {b['output'][:40]!r:<44} adapter: {a['output']!r}")
    print(f"\nadapter: {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
