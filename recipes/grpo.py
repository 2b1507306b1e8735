"""Reinforcement learning with verifiable rewards (GRPO) on a (Q)LoRA adapter: sample a group of answers per
prompt, score them with your reward functions, and move the adapter toward the better ones of each group.

Run it:
    qtune train recipes/configs/smollm2_sentiment_grpo.yaml
    qtune train my_config.yaml grpo.rewards=recipes.rewards:exact_answer,my_rewards.py:json_valid
    qtune train my_config.yaml lora.from_adapter=adapters/my-sft     # refine an SFT adapter
Copy it to change what it does:  qtune cp grpo my_grpo.py

Data: prompts in any SFT format (chat, sharegpt, alpaca, prompt_completion); a record's answer (the last assistant
message, the completion) is passed to the rewards as `reference`, and {"prompt": ...} alone is a prompt with none.
Rewards: grpo.rewards, `module:function` paths (recipes/rewards.py ships exact_answer, contains_reference,
format_match, brevity); each is tried on a few records before the model loads.
train.batch_size counts completions: batch_size x grad_accum / grpo.group_size prompts per optimizer step.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from qtune import data, evaluate, lora, models, rewards, train
from qtune.config import RunConfig
from qtune.meta import CAUSAL_LM


def main(cfg: RunConfig) -> Path:
    # 1. The run (output folder checked, seed, base and tokenizer); the reward functions, tried on a few records.
    run = train.start(cfg)
    tokenizer = run.tokenizer
    reward_funcs = [rewards.load_reward(path) for path in cfg.grpo.rewards]  # a path that does not import: now
    # Prompts (any SFT format; a record's answer is the rewards' `reference`), each with room for its answer.
    load = partial(data.load_prompts, tokenizer=tokenizer, cfg=cfg.data, max_new_tokens=cfg.grpo.max_new_tokens)
    train_items, train_report = load(cfg.data.train)
    print(f"train data: {train_report.summary()}")
    first = train_items[:4]
    rewards.check_rewards(cfg.grpo.rewards, reward_funcs, [p.prompt for p in first], [p.reference for p in first])
    train_items, eval_items, eval_report = run.held_out(train_items, load)
    cfg = run.prepare(train_report, longest=max(data.longest(p) for p in train_items) + cfg.grpo.max_new_tokens)

    # 2. The base, quantized and frozen; LoRA on top (fresh, or lora.from_adapter's).
    model = models.load_base(run.base_path, cfg.model, cfg.quant, cfg.train)
    model = lora.attach_lora(model, cfg.lora)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"base: {cfg.model.name} ({cfg.quant.method}), {trainable:,} trainable of {total:,} parameters")

    # 3. Train with trl's GRPOTrainer: each step samples grpo.group_size completions per prompt and scores them.
    trainer = train.build_grpo_trainer(
        model, tokenizer, data.prompts_dataset(train_items), reward_funcs, cfg, run.checkpoints
    )
    run.train(trainer)
    if not run.writes:  # under torchrun / accelerate, rank 0 alone evaluates and writes
        return run.out_dir

    # 4. Held-out: the mean reward of greedy answers (each function's and their weighted sum), and exact-match
    #    accuracy against the references.
    metrics, samples = {}, []
    if run.evaluates(eval_items):
        metrics, samples = evaluate.evaluate_rewards(
            model, tokenizer, eval_items, cfg.grpo, reward_funcs, cfg.eval.batch_size, "held-out"
        )
        print("held-out:", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    # 5. The adapter folder: plain PEFT files + qtune.json (method, rewards) + loss curve, written atomically.
    return run.save(
        model,
        trainer,
        kind=CAUSAL_LM,
        train_report=train_report,
        eval_report=eval_report,
        metrics=metrics,
        training={
            "method": "grpo",
            "rewards": cfg.grpo.rewards,
            "group_size": cfg.grpo.group_size,
            "beta": cfg.grpo.beta,
            "from_adapter": cfg.lora.from_adapter,
        },
        samples=samples[:20],
        chat_template=tokenizer.chat_template,
    )


if __name__ == "__main__":
    import sys

    from qtune.cli import main as cli_main

    cli_main(["train", *sys.argv[1:]])
