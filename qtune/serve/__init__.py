"""`qtune serve`: one base, many adapters, OpenAI-compatible routes, mixed-adapter batches.

app.py           the Starlette app and its routes, the server thread, `serve` (the command)
openai_api.py    request checks and OpenAI response shapes
scheduler.py     the worker that owns the model: joins requests into running batches
pool.py          the base and the resident adapters (LRU by count and bytes); classifiers by base
decode.py        prefill and one decoding step over rows that each name their adapter
adapter_info.py  what an adapter folder holds and whether it fits the served base
"""

from qtune.serve.app import ServerThread, create_app, is_loopback, serve
from qtune.serve.openai_api import Limits

__all__ = ["Limits", "ServerThread", "create_app", "is_loopback", "serve"]
