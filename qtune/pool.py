"""An adapter pool: one base in memory, many LoRA adapters, one batch whose rows use different adapters.

    pool = AdapterPool("smollm2-135m", quant="nf4", max_adapters=8)
    pool.add("sentiment", "adapters/smollm2-sentiment")          # a qtune folder, or any PEFT adapter folder
    pool.add_folder("adapters/")                                 # every adapter folder under it
    rows = [Row("sentiment", pool.chat_ids("sentiment", [{"role": "user", "content": "Great film!"}])),
            Row("base", pool.encode("Once upon a time"), Sampling(temperature=0.8, seed=1))]
    pool.generate(rows)                                          # one batch; rows[i].text, .finish_reason

Rows are decoded step by step (prefill, then one token per step with a KV cache) through peft's
`adapter_names`, so each row runs its own adapter ("__base__" for the plain base) inside one forward
pass, samples with its own temperature / top_p / seed, and stops on its own stop strings, token budget,
or cancellation; finished rows leave the batch at once. Greedy rows give the same tokens as the row run
alone: the batch only adds left padding that attention masks out (checked by tests/test_pool.py).

Adapters are *registered* (name -> folder) and *resident* (weights in memory). At most `max_adapters`
(and, if set, `max_adapter_bytes` of adapter weights) are resident; loading another evicts the least
recently used one that no running batch needs, and an evicted adapter is reloaded from its folder when
asked for again.

Classification adapters (qtune kind "sequence-classification") cannot share the causal-LM base: their
base carries a classification head (peft modules_to_save). They go to a second kind of shared base,
one per (base folder, quantization, dtype, number of labels), loaded from the adapter's own qtune.json.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from qtune.config import ModelConfig, QuantConfig
from qtune.errors import AdapterError, ConfigError
from qtune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, check_head_saved, checked_base, read_meta
from qtune.models import fingerprint_base, load_base, load_classifier, load_tokenizer, resolve_base

BASE = "base"  # the name a caller uses for the base alone
PEFT_BASE = "__base__"  # the name peft uses for a row without an adapter


def adapter_folder(spec: str | Path) -> Path:
    """Where an adapter spec (a folder, or a hub id owner/name[@revision]) lies on disk."""
    from qtune.hub import resolve_adapter

    path = resolve_adapter(spec, require_meta=False)
    if not path.is_dir():
        raise AdapterError(f"{spec}: no such adapter folder")
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT adapter folder)")
    return path


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
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    sent: int = 0  # characters of `text` already handed out as stream deltas
    cancelled: bool = False  # set from any thread; the row leaves the batch at the next step
    error: str | None = None  # why, when finish_reason is "error"
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
class AdapterInfo:
    name: str
    path: Path
    kind: Literal["causal-lm", "sequence-classification"]
    source: Literal["qtune", "peft"]
    bytes: int
    system_prompt: str | None = None
    id2label: dict[int, str] | None = None
    group: tuple | None = None  # classification: which classifier base it sits on
    loads: int = 0  # how many times its weights were read (reloads after eviction count)


@dataclass
class _Classifier:
    model: Any
    tokenizer: Any
    max_length: int


class AdapterPool:
    """One causal-LM base (4-bit, 8-bit or 16-bit) and many adapters, resident up to a bound (LRU)."""

    def __init__(
        self,
        base: str = "smollm2-135m",
        quant: Literal["nf4", "fp4", "int8", "none"] = "nf4",
        dtype: Literal["bf16", "fp16", "fp32"] | None = None,
        max_adapters: int = 8,
        max_adapter_bytes: int | None = None,
        trust_remote_code: bool = False,
    ):
        """Load the base once.

        Args:
            base: 'smollm2-135m', a local HF model folder, or a hub id (see models.resolve_base).
            quant: how the base weights are stored, as in training ("none" is 16/32-bit).
            dtype: compute dtype; default bf16 on a GPU and fp32 on CPU (CPU bf16 matmuls are slow).
            max_adapters: most adapters resident at once (causal-LM and classification together).
            max_adapter_bytes: optional budget for resident adapter weights (their safetensors size).
            trust_remote_code: run model code shipped with a hub repo.
        """
        if max_adapters < 1:
            raise ConfigError(f"max_adapters must be at least 1, got {max_adapters}")
        dtype = dtype or ("bf16" if torch.cuda.is_available() else "fp32")
        self.model_cfg = ModelConfig(name=str(base), dtype=dtype, trust_remote_code=trust_remote_code)
        self.quant_cfg = QuantConfig(method=quant)
        self.max_adapters = max_adapters
        self.max_adapter_bytes = max_adapter_bytes
        self.base_path = resolve_base(self.model_cfg)
        self.tokenizer = load_tokenizer(self.base_path, trust_remote_code)
        self.model = load_base(self.base_path, self.model_cfg, self.quant_cfg).eval()
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._fingerprint: str | None = None
        self.adapters: dict[str, AdapterInfo] = {}  # registered
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.classifiers: dict[tuple, _Classifier] = {}
        self._pins: dict[str, int] = {}
        self._lock = threading.RLock()
        self.load_seconds: list[float] = []  # how long each adapter load took (the cost of a switch)

    # ---------------------------------------------------------------- registry

    def names(self) -> list[str]:
        """Every name a request may use: 'base' and the registered adapters."""
        return [BASE, *self.adapters]

    def add(self, name: str, spec: str | Path, load: bool = True) -> AdapterInfo:
        """Register the adapter at `spec` under `name` (checked against the base), and load it unless `load` is off."""
        if not name or name in (BASE, PEFT_BASE) or "/" in name:
            raise AdapterError(f"adapter name {name!r} is reserved or not a plain name")
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
            info = self._inspect(name, adapter_folder(spec))
            self.adapters[name] = info
            if load:
                try:
                    self.ensure([name])
                except BaseException:
                    del self.adapters[name]
                    raise
            return info

    def add_folder(self, folder: str | Path) -> list[str]:
        """Register every adapter folder directly under `folder` (name = subfolder name); load up to the bound."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"{folder}: no such folder of adapters")
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        added = []
        for path in subdirs:
            if not (path / ADAPTER_CONFIG).is_file():
                continue  # not an adapter (e.g. a half-written one, or notes)
            self.add(path.name, path, load=len(self.resident) < self.max_adapters)
            added.append(path.name)
        return added

    def remove(self, name: str) -> None:
        """Forget an adapter: unload its weights and drop its name."""
        with self._lock:
            if name not in self.adapters:
                raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
            if self._pins.get(name):
                raise AdapterError(f"adapter {name!r} is in use by a running batch; retry when it finishes")
            if name in self.resident:
                self._evict(name)
            del self.adapters[name]

    def _inspect(self, name: str, path: Path) -> AdapterInfo:
        """Read what kind of adapter a folder holds, and refuse one made for another base."""
        size = (path / ADAPTER_WEIGHTS).stat().st_size
        if not (path / META_FILE).is_file():  # plain PEFT: the base is checked when peft loads it
            config = json.loads((path / ADAPTER_CONFIG).read_text())
            if config.get("task_type") not in (None, "CAUSAL_LM"):
                raise AdapterError(
                    f"{path}: a plain PEFT adapter for {config['task_type']}; only CAUSAL_LM ones can be served "
                    "without a qtune.json (classification adapters need qtune's label map and base)"
                )
            return AdapterInfo(name, path, "causal-lm", "peft", size)
        meta = read_meta(path)
        kind = meta.get("kind", "causal-lm")
        cfg, base_path = checked_base(path, meta, check=kind == "sequence-classification")
        if kind == "sequence-classification":
            id2label = {int(k): v for k, v in meta["labels"]["id2label"].items()}
            check_head_saved(path, meta["labels"]["head_modules"])
            group = (str(base_path), cfg.quant.method, cfg.model.dtype, len(id2label))
            return AdapterInfo(name, path, kind, "qtune", size, id2label=id2label, group=group)
        recorded = meta["base"]["fingerprint"]
        if recorded != self.fingerprint:
            raise AdapterError(
                f"{path} was trained on a base with fingerprint {recorded[:19]}..., but the served base "
                f"{self.base_path} has {self.fingerprint[:19]}...: serve it with its own base ({cfg.model.name})"
            )
        return AdapterInfo(name, path, "causal-lm", "qtune", size, system_prompt=cfg.data.system_prompt)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_base(self.base_path)
        return self._fingerprint

    # ---------------------------------------------------------------- residency (LRU)

    def ensure(self, names: Iterable[str]) -> None:
        """Make these adapters resident (loading, and evicting others, as needed) and mark them recently used."""
        with self._lock:
            wanted = [n for n in dict.fromkeys(names) if n != BASE]
            for name in wanted:
                if name not in self.adapters:
                    raise AdapterError(f"no adapter named {name!r}; known: {', '.join(self.names())}")
            if len(wanted) > self.max_adapters:
                raise AdapterError(f"{len(wanted)} adapters in one batch, over max_adapters={self.max_adapters}")
            for name in wanted:
                if name in self.resident:
                    self.resident.move_to_end(name)
                    continue
                self._make_room(self.adapters[name].bytes, keep=set(wanted))
                start = time.perf_counter()
                self._load(self.adapters[name])
                self.load_seconds.append(time.perf_counter() - start)
                self.resident[name] = None

    def _make_room(self, incoming: int, keep: set[str]) -> None:
        def over() -> bool:
            used = sum(self.adapters[n].bytes for n in self.resident)
            budget = self.max_adapter_bytes
            return len(self.resident) >= self.max_adapters or (budget is not None and used + incoming > budget)

        while over():
            victim = next((n for n in self.resident if n not in keep and not self._pins.get(n)), None)
            if victim is None:
                if not self.resident and self.max_adapter_bytes is not None:
                    raise AdapterError(
                        f"adapter of {incoming} bytes exceeds max_adapter_bytes={self.max_adapter_bytes}"
                    )
                raise AdapterError(
                    f"no room for another adapter: the {len(self.resident)} resident ones are all in use "
                    f"(max_adapters={self.max_adapters}, max_adapter_bytes={self.max_adapter_bytes})"
                )
            self._evict(victim)

    def _load(self, info: AdapterInfo) -> None:
        from peft import PeftModel

        if info.kind == "causal-lm":
            # Checked before peft touches the model: a load that fails halfway leaves layers injected.
            _check_fits(self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model, info.path)
        try:
            if info.kind == "sequence-classification":
                group = self.classifiers.get(info.group)
                if group is None:
                    group = self._classifier_base(info)
                    group.model = PeftModel.from_pretrained(group.model, str(info.path), adapter_name=info.name)
                    self.classifiers[info.group] = group
                else:
                    group.model.load_adapter(str(info.path), adapter_name=info.name)
                group.model.eval()
            elif isinstance(self.model, PeftModel):
                self.model.load_adapter(str(info.path), adapter_name=info.name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(info.path), adapter_name=info.name)
        except Exception as e:  # target modules missing, shapes differ: the adapter is for another base
            for model in (self.model, *(c.model for c in self.classifiers.values())):
                if isinstance(model, PeftModel) and info.name in model.peft_config and len(model.peft_config) > 1:
                    model.delete_adapter(info.name)  # undo a half-done load_adapter
            raise AdapterError(f"{info.path}: the adapter does not load onto its base: {e}") from None
        self.model.eval()
        info.loads += 1

    def _classifier_base(self, info: AdapterInfo) -> _Classifier:
        meta = read_meta(info.path)
        cfg, base_path = checked_base(info.path, meta)
        tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
        model, _ = load_classifier(base_path, cfg.model, cfg.quant, info.id2label, pad_token_id=tokenizer.pad_token_id)
        return _Classifier(model, tokenizer, cfg.data.max_length)

    def _evict(self, name: str) -> None:
        info = self.adapters[name]
        model = self.classifiers[info.group].model if info.kind == "sequence-classification" else self.model
        if len(model.peft_config) > 1:
            if model.active_adapter == name:  # hand "active" on first (peft would warn); rows name theirs anyway
                model.set_adapter(next(n for n in model.peft_config if n != name))
            model.delete_adapter(name)
        elif info.kind == "sequence-classification":
            del self.classifiers[info.group]  # the last adapter on this classifier base: free the base too
        else:
            self.model = model.unload()  # the last adapter: back to the bare base (peft cannot hold zero)
        del self.resident[name]

    # ---------------------------------------------------------------- prompts

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (with the tokenizer's special tokens, as a completion endpoint does)."""
        return self.tokenizer(text)["input_ids"]

    def chat_ids(self, adapter: str, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the assistant's reply.

        A qtune adapter trained with a system prompt gets it when the messages bring none, as in training.
        """
        if not self.tokenizer.chat_template:
            raise ConfigError(f"{self.base_path} has no chat template: use the completions endpoint")
        info = self.adapters.get(adapter)
        if info is not None and info.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": info.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        rows: list[Row],
        on_step: Callable[[list[Row]], None] | None = None,
        admit: Callable[[int], list[Row]] | None = None,
    ) -> list[Row]:
        """Complete all rows in one batch, each with its own adapter and sampling; returns the rows, filled in.

        `on_step(rows)` is called after every forward pass with the rows that got a token (for streaming);
        a row whose `cancelled` is set (from any thread) leaves the batch at the next step. `admit(n)`, called
        between steps with the number of running rows, returns new rows to join the running batch
        (continuous batching); they are prefilled on their own and their KV cache is appended to the batch's.
        """
        with self._lock:
            held: dict[int, Row] = {}  # rows running: their adapters are pinned (never evicted under them)
            try:
                batch, incoming, first = None, list(rows), True
                while True:
                    if incoming:
                        try:
                            fresh = self._start(incoming, on_step, held)
                        except (AdapterError, ConfigError) as e:
                            if first:
                                raise
                            for r in incoming:  # a row admitted later fails alone
                                r.finish_reason, r.error = "error", str(e)
                            if on_step is not None:
                                on_step(incoming)
                            fresh = None
                        batch = fresh if batch is None else _merge(batch, fresh) if fresh is not None else batch
                    first = False
                    if batch is not None:
                        batch = self._step(batch, on_step)
                    self._release(held)
                    running = 0 if batch is None else len(batch.rows)
                    joinable = batch is None or _joinable(batch.cache)
                    incoming = admit(running) if admit is not None and joinable else []
                    if batch is None and not incoming:
                        return rows
            finally:
                for r in held.values():
                    self._pins[r.adapter] -= 1

    def _release(self, held: dict[int, Row]) -> None:
        for key, r in list(held.items()):
            if r.finish_reason is not None:
                self._pins[r.adapter] -= 1
                del held[key]

    def _check_row(self, row: Row) -> None:
        if not row.prompt_ids:
            raise ConfigError("a prompt needs at least one token")
        info = self.adapters.get(row.adapter)
        if row.adapter != BASE and info is None:
            raise AdapterError(f"no adapter named {row.adapter!r}; known: {', '.join(self.names())}")
        if info is not None and info.kind != "causal-lm":
            raise AdapterError(f"{row.adapter!r} is a {info.kind} adapter, not a text-generation adapter")

    def _start(self, rows: list[Row], on_step, held: dict[int, Row]) -> _Batch | None:
        """Prefill new rows (their adapters loaded and pinned): their first token, and a batch ready to step."""
        for row in rows:
            self._check_row(row)
        self.ensure(r.adapter for r in rows)
        for r in rows:
            if r.cancelled:
                r.finish_reason = "cancelled"
        rows = [r for r in rows if not r.cancelled]
        for r in rows:
            self._pins[r.adapter] = self._pins.get(r.adapter, 0) + 1
            held[id(r)] = r
        if not rows:
            return None
        device = next(self.model.parameters()).device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
            r.generator = _generator(r.sampling.seed)
        mask = mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._step(_Batch(rows, None, mask, positions, ids.to(device)), on_step)

    def _step(self, batch: _Batch, on_step) -> _Batch | None:
        """One forward pass: a token for every row; finished and cancelled rows leave; None when none is left."""
        from peft import PeftModel

        names = [PEFT_BASE if r.adapter == BASE else r.adapter for r in batch.rows]
        extra = {"adapter_names": names} if isinstance(self.model, PeftModel) else {}
        out = self.model(
            input_ids=batch.ids,
            attention_mask=batch.mask,
            position_ids=batch.positions,
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        logits = out.logits[:, -1, :].float()
        next_ids = [_pick(logits[i], r.sampling, r.generator) for i, r in enumerate(batch.rows)]
        for r, token in zip(batch.rows, next_ids):
            self._append(r, token)
        if on_step is not None:
            on_step(batch.rows)
        for r in batch.rows:
            if r.finish_reason is None and r.cancelled:
                r.finish_reason = "cancelled"
        keep = [i for i, r in enumerate(batch.rows) if r.finish_reason is None]
        if not keep:
            return None
        cache, mask, positions = out.cache, batch.mask, batch.positions
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, dtype=torch.long, device=mask.device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
        ids = torch.tensor([next_ids[i] for i in keep], dtype=torch.long, device=mask.device).unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return _trim(_Batch([batch.rows[i] for i in keep], cache, mask, positions[:, -1:] + 1, ids))

    def _append(self, row: Row, token: int) -> None:
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.tokens.append(token)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (row.text.find(s) for s in row.sampling.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            row.text, row.finish_reason = row.text[:cut], "stop"
        elif len(row.tokens) >= row.sampling.max_tokens:
            row.finish_reason = "length"
        elif self.context is not None and len(row.prompt_ids) + len(row.tokens) >= self.context:
            row.finish_reason = "length"

    # ---------------------------------------------------------------- classification

    @torch.no_grad()
    def classify(self, adapters: list[str], texts: list[str]) -> list[dict[str, Any]]:
        """Label each text with its adapter: [{"label", "probabilities": {label: p}}], one batch per base."""
        if len(adapters) != len(texts):
            raise ConfigError(f"{len(adapters)} adapter names for {len(texts)} texts")
        for name in adapters:
            info = self.adapters.get(name)
            if info is None or info.kind != "sequence-classification":
                known = [n for n, i in self.adapters.items() if i.kind == "sequence-classification"]
                raise AdapterError(
                    f"{name!r} is not a classification adapter; those loaded: {', '.join(known) or 'none'}"
                )
        out: list[dict[str, Any]] = [{}] * len(texts)
        with self._lock:
            self.ensure(adapters)
            groups: dict[tuple, list[int]] = {}
            for i, name in enumerate(adapters):
                groups.setdefault(self.adapters[name].group, []).append(i)
            for key, index in groups.items():
                clf = self.classifiers[key]
                ids = [clf.tokenizer(texts[i], truncation=True, max_length=clf.max_length)["input_ids"] for i in index]
                padded = clf.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
                device = next(clf.model.parameters()).device
                logits = clf.model(
                    input_ids=padded["input_ids"].to(device),
                    attention_mask=padded["attention_mask"].to(device),
                    adapter_names=[adapters[i] for i in index],
                ).logits
                probs = torch.softmax(logits.float(), dim=-1).cpu()
                for row, i in enumerate(index):
                    id2label = self.adapters[adapters[i]].id2label
                    p = {id2label[k]: float(v) for k, v in enumerate(probs[row].tolist())}
                    out[i] = {"label": max(p, key=p.get), "probabilities": p}
        return out


@dataclass
class _Batch:
    """Rows being decoded: their KV cache, attention mask (one column ahead of the cache), next positions and ids."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    ids: torch.Tensor


def _joinable(cache) -> bool:
    """Can rows be appended to this cache? Only plain dynamic layers (keys/values of shape B x H x T x D) are
    padded and concatenated here; other cache kinds (sliding windows, static, ...) finish their batch first."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of both: the shorter history is left-padded (masked out), so every row keeps its positions."""
    if not (_joinable(a.cache) and _joinable(b.cache)):
        raise AdapterError("internal: joining rows needs dynamic caches")  # _joinable was checked before admitting
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_left_pad(la.keys, width - 1, 2), _left_pad(lb.keys, width - 1, 2)])
        la.values = torch.cat([_left_pad(la.values, width - 1, 2), _left_pad(lb.values, width - 1, 2)])
    mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)])
    return _Batch(a.rows + b.rows, a.cache, mask, torch.cat([a.positions, b.positions]), torch.cat([a.ids, b.ids]))


def _trim(batch: _Batch) -> _Batch:
    """Drop leading columns that are padding in every row (left behind by rows that finished)."""
    if not _joinable(batch.cache):
        return batch
    lead = int((batch.mask.sum(0) > 0).int().argmax())
    if lead == 0:
        return batch
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
    batch.mask = batch.mask[:, lead:]
    return batch


def _check_fits(model, folder: Path) -> None:
    """Refuse an adapter whose LoRA matrices name modules the model lacks, or have other shapes than its layers."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():
            for part, dim, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
                if part not in key:
                    continue
                path = key.split(part)[0].removeprefix("base_model.model.")
                if path not in modules:
                    raise AdapterError(f"{folder}: the adapter adapts `{path}`, which the served base does not have")
                expected = getattr(modules[path], attr, None)
                got = f.get_slice(key).get_shape()[dim]
                if expected is not None and expected != got:
                    raise AdapterError(
                        f"{folder}: `{path}` has {attr}={expected} in the served base but {got} in the adapter: "
                        "it was made for another base"
                    )


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
