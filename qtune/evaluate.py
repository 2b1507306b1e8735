"""Evaluate a model on tokenized examples: loss, perplexity and exact-match answer accuracy; generate text."""

from __future__ import annotations

import math
import string

import torch
from tqdm.auto import tqdm

from qtune.data import IGNORE, DataError, Example
from qtune.data.read import lone_surrogate
from qtune.rewards import as_completion


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[str]:
    """Greedy completions for already-tokenized prompts, batched with left padding; returns decoded text."""
    model.eval()
    # Longest first: batches of similar length waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        ids, mask = _left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, _device(model))
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, i in enumerate(batch):
            out[i] = tokenizer.decode(gen[row, ids.shape[1] :], skip_special_tokens=True)
    return out


def generate(model, tokenizer, prompt: str, system_prompt: str | None = None, max_new_tokens: int = 128) -> str:
    """Answer one user prompt, through the chat template if the tokenizer has one."""
    for text, what in ((prompt, "--prompt"), (system_prompt, "the adapter's data.system_prompt")):
        if text and lone_surrogate(text):  # (bytes that are not UTF-8 reach sys.argv as lone surrogates)
            raise DataError(f"{what} holds a lone surrogate (\\ud800-\\udfff), not text: give it as valid UTF-8")
    if tokenizer.chat_template:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return generate_ids(model, tokenizer, [ids], max_new_tokens=max_new_tokens)[0]


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding punctuation: what exact match compares."""
    return " ".join(text.split()).strip(string.punctuation + " ").casefold()


def contains_answer(output: str, answer: str) -> bool:
    """Does the reference occur in the output as whole words ("The review is positive." contains "positive")?"""
    words = [w.strip(string.punctuation) for w in normalize_answer(output).split()]
    target = normalize_answer(answer).split()
    return any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1))


@torch.no_grad()
def evaluate_loss(
    model, examples: list[Example], pad_id: int, batch_size: int = 16, progress: str | None = None
) -> dict[str, float]:
    """Mean cross-entropy over trained tokens (labels != -100), and its perplexity.

    Rows are left-padded, so the trained tokens of every row sit in the last K positions, and only
    those K positions go through the LM head (`logits_to_keep`): for short answers after long
    prompts that skips most of the (tokens x vocabulary) logits.
    """
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = _device(model)
    for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        rows = [examples[i] for i in batch]
        ids, mask = _left_pad([e.input_ids for e in rows], pad_id, device)
        labels, _ = _left_pad([e.labels for e in rows], IGNORE, device)
        first = [next((j for j, lab in enumerate(e.labels) if lab != IGNORE), len(e.labels)) for e in rows]
        keep = max(len(e.labels) - f for e, f in zip(rows, first)) + 1  # +1: the position predicting the first one
        keep = min(keep, ids.shape[1])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logits, targets = logits[:, :-1].float(), labels[:, ids.shape[1] - keep + 1 :]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += loss.item()
        count += int((targets != IGNORE).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def answer_accuracy(
    model,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: str | None = None,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Accuracy of greedy answers against the references.

    `accuracy` is exact match after normalize_answer; `contains_accuracy` is the lenient reading a
    human would apply to a chatty base ("The review is positive" counts for "positive", unless it
    also names another of the data's answers).
    """
    scored = [e for e in examples if e.prompt_ids is not None and e.answer is not None]
    if not scored:
        return {}, []
    outputs = generate_ids(model, tokenizer, [e.prompt_ids for e in scored], max_new_tokens, batch_size, progress)
    # With a small label set (classification-like answers), a lenient match must not name a rival label too:
    # "positive, not negative" is no answer.
    labels = {normalize_answer(e.answer) for e in scored}
    rivals = labels if len(labels) <= 20 else set()
    samples = []
    for e, o in zip(scored, outputs):
        ref = normalize_answer(e.answer)
        contains = contains_answer(o, e.answer) and not any(contains_answer(o, r) for r in rivals - {ref})
        samples.append(
            {
                "row": e.row,
                "prompt": tokenizer.decode(e.prompt_ids),  # as the model saw it: chat template, system prompt
                "answer": e.answer,
                "output": o,
                "correct": normalize_answer(o) == ref,
                "contains": contains,
            }
        )
    n = len(samples)
    return {
        "accuracy": sum(s["correct"] for s in samples) / n,
        "contains_accuracy": sum(s["contains"] for s in samples) / n,
        "answered": n,
    }, samples


def evaluate(
    model, tokenizer, examples: list[Example], batch_size: int = 16, max_new_tokens: int = 16, label: str = "eval"
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Loss, perplexity and (for prompt/answer data) exact-match accuracy, as one flat dict; plus samples."""
    metrics = evaluate_loss(model, examples, tokenizer.pad_token_id, batch_size, progress=f"{label}: loss")
    acc, samples = answer_accuracy(model, tokenizer, examples, max_new_tokens, batch_size, f"{label}: generate")
    return {**metrics, **acc, "examples": len(examples)}, samples


@torch.no_grad()
def sequence_logps(
    model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each completion after its prompt (what DPO's implicit reward is made of).

    Rows are left-padded, so the completions sit in the last positions and only those go through the LM head.
    """
    model.eval()
    out = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]) - len(completions[i]))
    device = _device(model)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = _left_pad([prompts[i] + completions[i] for i in batch], pad_id, device)
        lengths = torch.tensor([len(completions[i]) for i in batch], device=device)
        keep = int(lengths.max()) + 1  # +1: the position predicting the first completion token
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, ids.shape[1] - keep + 1 :]
        token = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        trained = torch.arange(keep - 1, device=device)[None, :] >= (keep - 1 - lengths)[:, None]
        for row, value in zip(batch, (token * trained).sum(-1).tolist()):
            out[row] = value
    return out


def preference_metrics(model, pairs: list, pad_id: int, beta: float, batch_size: int = 16) -> dict[str, float]:
    """How the model ranks held-out (prompt, chosen, rejected) pairs.

    `preference_accuracy`: the share of pairs whose chosen answer is more likely than the rejected one (a base
    is measured the same way). With an adapter: `reward_accuracy` and `reward_margin`, DPO's implicit reward
    beta * (log-ratio of chosen - log-ratio of rejected) against the base with the adapter switched off.
    """
    prompts = [p.prompt_ids for p in pairs]
    chosen = sequence_logps(model, prompts, [p.chosen_ids for p in pairs], pad_id, batch_size)
    rejected = sequence_logps(model, prompts, [p.rejected_ids for p in pairs], pad_id, batch_size)
    n = len(pairs)
    metrics = {"preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n, "pairs": n}
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            ref_chosen = sequence_logps(model, prompts, [p.chosen_ids for p in pairs], pad_id, batch_size)
            ref_rejected = sequence_logps(model, prompts, [p.rejected_ids for p in pairs], pad_id, batch_size)
        margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected)]
        metrics["reward_accuracy"] = sum(m > 0 for m in margins) / n
        metrics["reward_margin"] = sum(margins) / n
    return metrics


def evaluate_preferences(
    model, tokenizer, pairs: list, beta: float, batch_size: int = 16, max_new_tokens: int = 16, label: str = "eval"
) -> tuple[dict[str, float], list[dict]]:
    """Preference metrics on held-out pairs, and exact-match accuracy of greedy answers against the chosen answer
    for the prompts whose chosen answer fits in `max_new_tokens` (short answers: a label, a number; each prompt
    once); plus the mean answer length in words."""
    metrics = preference_metrics(model, pairs, tokenizer.pad_token_id, beta, batch_size)
    short = list({tuple(p.prompt_ids): p for p in pairs if len(p.chosen_ids) <= max_new_tokens}.values())
    if not short:
        return metrics, []
    accuracy, samples = answer_accuracy(model, tokenizer, short, max_new_tokens, batch_size, f"{label}: generate")
    words = sum(len(s["output"].split()) for s in samples) / max(len(samples), 1)
    return {**metrics, **accuracy, "answer_words": words}, samples


def evaluate_rewards(
    model, tokenizer, prompts: list, grpo, reward_funcs: list, batch_size: int = 16, label: str = "eval"
) -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to held-out prompts (up to grpo.max_new_tokens), scored by the run's reward functions: each
    function's mean and the weighted total (`reward`); plus exact-match accuracy where records have a reference."""
    outputs = generate_ids(
        model, tokenizer, [p.prompt_ids for p in prompts], grpo.max_new_tokens, batch_size, f"{label}: generate"
    )
    completions = [as_completion(p.prompt, o) for p, o in zip(prompts, outputs)]
    ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in outputs]
    references = [p.reference for p in prompts]
    weights = grpo.reward_weights or [1.0] * len(reward_funcs)
    metrics, total = {}, [0.0] * len(prompts)
    for path, fn, weight in zip(grpo.rewards, reward_funcs, weights):
        values = fn(
            prompts=[p.prompt for p in prompts], completions=completions, completion_ids=ids, reference=references
        )
        scored = [v for v in values if v is not None]
        metrics[f"reward/{path.rpartition(':')[2]}"] = sum(scored) / max(len(scored), 1)
        total = [t + weight * (v or 0.0) for t, v in zip(total, values)]
    metrics["reward"] = sum(total) / len(prompts)
    samples = [
        {"row": p.row, "prompt": tokenizer.decode(p.prompt_ids), "answer": p.reference, "output": o, "reward": r}
        for p, o, r in zip(prompts, outputs, total)
    ]
    known = [s for s in samples if s["answer"] is not None]
    if known:
        metrics["accuracy"] = sum(normalize_answer(s["output"]) == normalize_answer(s["answer"]) for s in known) / len(
            known
        )
    metrics["answer_words"] = sum(len(o.split()) for o in outputs) / len(outputs)
    return metrics, samples
