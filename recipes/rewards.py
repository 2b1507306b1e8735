"""Reward functions for `recipe: grpo` (grpo.rewards: [recipes.rewards:exact_answer, ...]).

Copy this file to write your own (`qtune cp rewards my_rewards.py`, then grpo.rewards: [my_rewards.py:my_reward]).
trl calls each with keyword arguments: prompts, completions (text, or [{"role": "assistant", "content": ...}] for
chat data), completion_ids, reference (each record's answer), and a few more; it returns one float per completion
(None: this function does not score that one). Rewards are compared within each prompt's group of samples, so
only their differences matter.
"""

from __future__ import annotations

import re

from qtune.evaluate import contains_answer, normalize_answer

# What `format_match` accepts: one word, optionally followed by a full stop (edit it to your own answer format).
FORMAT = r"\s*\w+\.?\s*"


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def exact_answer(completions, reference, **kwargs) -> list[float | None]:
    """1 when the answer equals the record's reference (ignoring case, spaces and end punctuation), else 0."""
    return [
        None if ref is None else float(normalize_answer(_text(c)) == normalize_answer(ref))
        for c, ref in zip(completions, reference)
    ]


def contains_reference(completions, reference, **kwargs) -> list[float | None]:
    """0.5 when the reference appears in the answer as a word or phrase ("The review is positive."), else 0:
    partial credit that lets a verbose model find the short answer."""
    return [None if ref is None else 0.5 * contains_answer(_text(c), ref) for c, ref in zip(completions, reference)]


def format_match(completions, **kwargs) -> list[float]:
    """1 when the whole answer matches FORMAT (a regular expression), else 0."""
    return [float(re.fullmatch(FORMAT, _text(c)) is not None) for c in completions]


def brevity(completions, completion_ids, **kwargs) -> list[float]:
    """A length penalty: -0.01 per generated token."""
    return [-0.01 * len(ids) for ids in completion_ids]
