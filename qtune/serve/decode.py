"""Step-wise batched decoding with a KV cache: the rows of one batch may each use another adapter.

    batch = prefill(model, rows, tokenizer.pad_token_id)             # left-padded prompts, not yet run
    while batch is not None:                                           # one token per row per step
        batch = step(model, batch, tokenizer, eos_ids, context, on_step)

The first step runs the whole prompts (prefill), each later one a single token per row with the KV
cache. A long prompt may be run into the cache a chunk at a time first (`fill`), so that the steps of
a running batch go on between its chunks (chunked prefill; AdapterPool.generate interleaves them).
Every row names its adapter through peft's `adapter_names` ("__base__" for the plain base), samples
with its own temperature / top_p / seed, and stops on its own stop strings, token budget, cancellation
or time budget (`deadline`); finished rows leave the batch at once. A batch only adds left padding
that attention masks out, but padding changes the shapes of the matrix products, so a row's logits
may differ from the row run alone in the last bits, and a greedy choice between two near-tied tokens
may flip (tests/test_pool.py checks that flips happen only on near-ties). Rows that arrive later are
prefilled on their own and `merge`d into a running batch whose cache is `joinable`.
AdapterPool.generate drives this loop; which adapters are loaded is its business.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qtune.errors import AdapterError

BASE = "base"  # the name a caller uses for the base alone
PEFT_BASE = "__base__"  # the name peft uses for a row without an adapter


@dataclass
class Sampling:
    """How one row picks its tokens; temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One prompt to complete with one adapter; the decode loop fills in the output fields."""

    adapter: str
    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    # output
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", "timeout" or "error"
    sent: int = 0  # characters of `text` already handed out as stream deltas
    cancelled: bool = False  # set from any thread; the row leaves the batch at the next step
    error: str | None = None  # why, when finish_reason is "error" or "timeout"
    deadline: float | None = None  # time.monotonic() past which the row stops with finish_reason "timeout"
    generator: torch.Generator | None = field(default=None, repr=False)  # its own random stream

    def stream_text(self) -> str:
        """The part of `text` that is final: not a possible start of a stop string, nor half a character."""
        if self.finish_reason is not None:
            return self.text
        text = self.text.rstrip("\ufffd")
        for stop in self.sampling.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text


@dataclass
class Batch:
    """Rows being decoded: their KV cache, the ids not yet run (the prompt, or the last token), their positions,
    and the attention mask over cache and ids."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    ids: torch.Tensor


def prefill(model, rows: list[Row], pad_token_id: int) -> Batch:
    """New rows as a batch ready for its first step: prompts left-padded, each row with its random stream."""
    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
        r.generator = _generator(r.sampling.seed)
    mask = mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(rows, None, mask, positions, ids.to(device))


def step(
    model,
    batch: Batch,
    tokenizer,
    eos_ids: set[int],
    context: int | None,
    on_step: Callable[[list[Row]], None] | None = None,
) -> Batch | None:
    """One forward pass: a token for every row; finished and cancelled rows leave; None when none is left.

    `eos_ids` end a row ("stop"), and `context` (the model's length, if known) caps prompt plus reply.
    """
    out = _forward(model, batch, pending(batch))
    logits = out.logits[:, -1, :].float()
    next_ids = [_pick(logits[i], r.sampling, r.generator) for i, r in enumerate(batch.rows)]
    for r, token in zip(batch.rows, next_ids):
        _append(r, token, tokenizer, eos_ids, context)
    _time_out(batch.rows)
    if on_step is not None:
        on_step(batch.rows)
    ids = torch.tensor(next_ids, dtype=torch.long, device=batch.mask.device).unsqueeze(1)
    mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
    return _drop_finished(Batch(batch.rows, out.cache, mask, batch.positions[:, -1:] + 1, ids))


def fill(model, batch: Batch, chunk: int, on_step: Callable[[list[Row]], None] | None = None) -> Batch | None:
    """Run the first `chunk` prompt columns of a prefilled batch into its KV cache; the rest waits for the next call.

    Rows cancelled or past their deadline meanwhile leave (`on_step` sees them); None when none is left. The
    last columns go through `step`, which picks the first token.
    """
    out = _forward(model, batch, chunk)
    batch = Batch(batch.rows, out.cache, batch.mask, batch.positions[:, chunk:], batch.ids[:, chunk:])
    _time_out(batch.rows)
    leaving = [r for r in batch.rows if r.finish_reason is not None or r.cancelled]
    if on_step is not None and leaving:
        on_step(leaving)
    return _drop_finished(batch)


def _forward(model, batch: Batch, columns: int):
    """Run the first `columns` ids not yet in the batch's cache through the model, each row through its own
    adapter; the output holds the extended cache and the last column's logits."""
    from peft import PeftModel

    names = [PEFT_BASE if r.adapter == BASE else r.adapter for r in batch.rows]
    extra = {"adapter_names": names} if isinstance(model, PeftModel) else {}
    seen = batch.mask.shape[1] - pending(batch)  # columns already in the cache
    return model(
        input_ids=batch.ids[:, :columns],
        attention_mask=batch.mask[:, : seen + columns],
        position_ids=batch.positions[:, :columns],
        cache=batch.cache,
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )


def pending(batch: Batch) -> int:
    """How many prompt columns of a batch are not yet in its cache (1 once it decodes)."""
    return batch.ids.shape[1]


def _time_out(rows: list[Row]) -> None:
    now = time.monotonic()
    for r in rows:
        if r.finish_reason is None and r.deadline is not None and now > r.deadline:
            r.finish_reason = "timeout"


def _drop_finished(batch: Batch) -> Batch | None:
    """The batch without its finished and cancelled rows (their cache rows too); None when none is left."""
    for r in batch.rows:
        if r.finish_reason is None and r.cancelled:
            r.finish_reason = "cancelled"
    keep = [i for i, r in enumerate(batch.rows) if r.finish_reason is None]
    if not keep:
        return None
    if len(keep) < len(batch.rows):
        index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        if batch.cache is not None:
            batch.cache.batch_select_indices(index)
        batch = Batch(
            [batch.rows[i] for i in keep], batch.cache, batch.mask[index], batch.positions[index], batch.ids[index]
        )
    return _trim(batch)


def _append(row: Row, token: int, tokenizer, eos_ids: set[int], context: int | None) -> None:
    if token in eos_ids:
        row.finish_reason = "stop"
        return
    row.tokens.append(token)
    row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    cut = min((i for i in (row.text.find(s) for s in row.sampling.stop if s) if i >= 0), default=-1)
    if cut >= 0:
        row.text, row.finish_reason = row.text[:cut], "stop"
    elif len(row.tokens) >= row.sampling.max_tokens:
        row.finish_reason = "length"
    elif context is not None and len(row.prompt_ids) + len(row.tokens) >= context:
        row.finish_reason = "length"


def joinable(cache) -> bool:
    """Can rows be appended to this cache? Only plain dynamic layers (keys/values of shape B x H x T x D) are
    padded and concatenated here; other cache kinds (sliding windows, static, ...) finish their batch first."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def merge(a: Batch, b: Batch) -> Batch:
    """One batch of both: the shorter history is left-padded (masked out), so every row keeps its positions."""
    if not (joinable(a.cache) and joinable(b.cache)):
        raise AdapterError("internal: joining rows needs dynamic caches")  # joinable was checked before admitting
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_left_pad(la.keys, width - 1, 2), _left_pad(lb.keys, width - 1, 2)])
        la.values = torch.cat([_left_pad(la.values, width - 1, 2), _left_pad(lb.values, width - 1, 2)])
    mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)])
    return Batch(a.rows + b.rows, a.cache, mask, torch.cat([a.positions, b.positions]), torch.cat([a.ids, b.ids]))


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _trim(batch: Batch) -> Batch:
    """Drop leading columns that are padding in every row (left behind by rows that finished)."""
    if not joinable(batch.cache):
        return batch
    cached = batch.mask.shape[1] - pending(batch)
    lead = min(int((batch.mask.sum(0) > 0).int().argmax()), cached)  # only columns already in the cache
    if lead == 0:
        return batch
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
    batch.mask = batch.mask[:, lead:]
    return batch


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """The next token of one row: argmax at temperature 0, else a sample from the top-p nucleus."""
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.cpu() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= s.top_p  # keep the smallest prefix reaching top_p
        outside[0] = False  # and at least the likeliest token (top_p=0)
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
