"""The Hugging Face Hub: find an adapter by id (resolve.py), publish one (push.py) with a model card (card.py)."""

from qtune.hub.card import public_meta, render_card
from qtune.hub.push import PushResult, format_files, push, stage
from qtune.hub.resolve import HubError, parse_repo_id, resolve_adapter

__all__ = [
    "HubError",
    "PushResult",
    "format_files",
    "parse_repo_id",
    "public_meta",
    "push",
    "render_card",
    "resolve_adapter",
    "stage",
]
