"""qtune: parameter-efficient fine-tuning for one consumer GPU.

The library is the core every verb shares (config, models, data, lora, meta, atomic, evaluate, classify)
and one package per verb family (train, export, serve, hub, plan); recipes/ holds the scripts that use
them, and `qtune <verb>` is the command line. docs/architecture.md is the map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__version__ = "0.1.0"
# The name pip installs qtune under (`qtune` on PyPI is another project); the import name stays `qtune`.
DISTRIBUTION = "qtune-lora"
# The recipes a config's `recipe:` may name without a path (recipes/sft.py, recipes/classify.py).
BUILTIN_RECIPES = ("sft", "classify", "dpo", "grpo")


def recipes_package() -> tuple[str, Path]:
    """The built-in recipes' package and folder: `qtune.recipes` once installed (pyproject.toml maps the repo's
    recipes/ folder there), else the source tree's `recipes` package."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("qtune.recipes")
    if spec is not None and spec.submodule_search_locations:
        return "qtune.recipes", Path(list(spec.submodule_search_locations)[0])
    return "recipes", Path(__file__).resolve().parent.parent / "recipes"


def recipes_folder() -> Path:
    """The built-in recipes' folder (its configs/ holds the shipped configs `qtune ls` lists)."""
    return recipes_package()[1]
