"""Reward functions for `recipe: grpo`: found from `module:function` paths (grpo.rewards), and tried on a few
records before any model loads, so a path that does not import, a function that raises or one that returns the
wrong shape stops the run with a line naming it.

A reward function takes keyword arguments, as trl's GRPOTrainer calls it: `prompts`, `completions` (text, or
lists of chat messages for chat data), `completion_ids`, `reference` (the record's answer, or None), and more
trl adds (take **kwargs); it returns one float (or None: not scored) per completion. recipes/rewards.py ships some.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

from qtune.errors import ConfigError


def load_reward(path: str) -> Callable:
    """The function a `module:function` path names; the module may be a .py file path or a dotted module name
    (`recipes.` is also looked up as the installed `qtune.recipes.`)."""
    module_name, _, name = path.rpartition(":")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise ConfigError(f"grpo.rewards: {path}: no file {module_name}")
            spec = importlib.util.spec_from_file_location(f"qtune_rewards_{Path(module_name).stem}", module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = _import(module_name)
    except ConfigError:
        raise
    except Exception as e:  # whatever the module raises while importing, named with its path
        raise ConfigError(f"grpo.rewards: {path}: the module does not import: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {path}: {module_name} has no function {name!r}")
    return fn


def _import(module_name: str):
    from qtune import recipes_package

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        package = recipes_package()[0]
        if module_name.startswith("recipes.") and package != "recipes" and e.name in ("recipes", module_name):
            return importlib.import_module(f"{package}.{module_name.removeprefix('recipes.')}")
        raise


def check_rewards(paths: list[str], functions: list[Callable], prompts: list, references: list) -> None:
    """Call each reward on a few records, each record's reference given as its completion: one number (or None)
    per completion, or a ConfigError naming the function."""
    completions = [as_completion(p, r) for p, r in zip(prompts, references)]
    for path, fn in zip(paths, functions):
        try:
            values = fn(
                prompts=prompts, completions=completions, completion_ids=[[] for _ in prompts], reference=references
            )
        except Exception as e:
            raise ConfigError(
                f"grpo.rewards: {path} failed on the first {len(prompts)} records: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            got = f"a {type(values).__name__} of {len(values)}" if hasattr(values, "__len__") else repr(values)
            raise ConfigError(
                f"grpo.rewards: {path} must return a list of one float per completion: for {len(prompts)} "
                f"completions it returned {got}"
            )
        for v in values:
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ConfigError(f"grpo.rewards: {path} returned {v!r}: each reward must be a finite number or None")


def as_completion(prompt, text: str | None):
    """A completion shaped as trl hands it to reward functions: text, or one assistant message for chat prompts."""
    text = text or ""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
