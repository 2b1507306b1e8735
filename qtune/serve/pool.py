"""An adapter pool: one base in memory, many LoRA adapters, one batch whose rows use different adapters.

    pool = AdapterPool("smollm2-135m", quant="nf4", max_adapters=8)
    pool.add("sentiment", "adapters/smollm2-sentiment")          # a qtune folder, or any PEFT adapter folder
    pool.add_folder("adapters/")                                 # every adapter folder under it
    rows = [Row("sentiment", pool.chat_ids("sentiment", [{"role": "user", "content": "Great film!"}])),
            Row("base", pool.encode("Once upon a time"), Sampling(temperature=0.8, seed=1))]
    pool.generate(rows)                                          # one batch; rows[i].text, .finish_reason

Rows are decoded step by step in one batch, each through its own adapter (see qtune/decode.py); the pool
loads the adapters they name and pins them while their rows run.

Adapters are *registered* (name -> folder) and *resident* (weights in memory). At most `max_adapters`
(and, if set, `max_adapter_bytes` of adapter weights) are resident; loading another evicts the least
recently used one that no running batch needs, and an evicted adapter is reloaded from its folder when
asked for again.

Classification adapters (qtune kind "sequence-classification") cannot share the causal-LM base: their
base carries a classification head (peft modules_to_save). They go to a second kind of shared base,
one per (base folder, quantization, dtype, number of labels), loaded from the adapter's own qtune.json.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qtune.config import ModelConfig, QuantConfig
from qtune.errors import USER_ERRORS, AdapterError, ConfigError
from qtune.meta import ADAPTER_CONFIG, CAUSAL_LM, CLASSIFIER
from qtune.models import fingerprint_base, load_base, load_classifier, load_tokenizer, resolve_base
from qtune.serve.adapter_info import AdapterInfo, adapter_folder, check_fits, inspect_adapter
from qtune.serve.decode import BASE, PEFT_BASE, Batch, Row, fill, joinable, merge, pending, prefill, step
from qtune.serve.decode import Sampling as Sampling  # re-exported: callers build their rows from qtune.serve.pool


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
        # The most bytes of text one token stands for (UTF-8 of its vocabulary string: never less than the
        # bytes it decodes to), so that len(text in bytes) / max_token_bytes bounds a prompt's token count.
        self.max_token_bytes = max(len(t.encode("utf-8", "replace")) for t in self.tokenizer.get_vocab())
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._fingerprint: str | None = None
        self.adapters: dict[str, AdapterInfo] = {}  # registered
        self.skipped: dict[str, str] = {}  # adapter folders add_folder could not serve: name -> why
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
            info = inspect_adapter(name, adapter_folder(spec), self.base_path, lambda: self.fingerprint)
            self.adapters[name] = info
            if load:
                try:
                    self.ensure([name])
                except BaseException:
                    del self.adapters[name]
                    raise
            return info

    def add_folder(self, folder: str | Path) -> list[str]:
        """Register every adapter folder directly under `folder` (name = subfolder name); load up to the bound.

        A folder that cannot be served (truncated weights, a bad qtune.json, another base) is skipped, with its
        reason in `skipped`: one bad folder does not keep the others from being served."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"{folder}: no such folder of adapters")
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        added = []
        for path in subdirs:
            if not (path / ADAPTER_CONFIG).is_file():
                continue  # not an adapter (e.g. a half-written one, or notes)
            try:
                self.add(path.name, path, load=len(self.resident) < self.max_adapters)
            except Exception as e:  # noqa: BLE001 - whatever is wrong with one folder, serve the rest
                self.skipped[path.name] = str(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}"
            else:
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

    def fits(self, names: Iterable[str]) -> bool:
        """Could these adapters be resident at once (within max_adapters and max_adapter_bytes)?"""
        wanted = {n for n in names if n != BASE}
        size = sum(self.adapters[n].bytes for n in wanted if n in self.adapters)
        budget = self.max_adapter_bytes
        return len(wanted) <= self.max_adapters and (budget is None or size <= budget)

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

        if info.kind == CAUSAL_LM:
            # Checked before peft touches the model: a load that fails halfway leaves layers injected.
            check_fits(self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model, info.path)
        try:
            if info.kind == CLASSIFIER:
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
        cfg, base_path = info.config, info.base_path  # read and checked once, when the adapter was added
        tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
        model, _ = load_classifier(base_path, cfg.model, cfg.quant, info.id2label, tokenizer.pad_token_id)
        return _Classifier(model, tokenizer, cfg.data.max_length)

    def _evict(self, name: str) -> None:
        info = self.adapters[name]
        model = self.classifiers[info.group].model if info.kind == CLASSIFIER else self.model
        if len(model.peft_config) > 1:
            if model.active_adapter == name:  # hand "active" on first (peft would warn); rows name theirs anyway
                model.set_adapter(next(n for n in model.peft_config if n != name))
            model.delete_adapter(name)
        elif info.kind == CLASSIFIER:
            del self.classifiers[info.group]  # the last adapter on this classifier base: free the base too
        else:
            self.model = model.unload()  # the last adapter: back to the bare base (peft cannot hold zero)
        del self.resident[name]

    # ---------------------------------------------------------------- prompts

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (with the tokenizer's special tokens, as a completion endpoint does)."""
        return self.tokenizer(text)["input_ids"]

    def chat_ids(self, adapter: str, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the assistant's reply (`chat_text`)."""
        return self.tokenizer(self.chat_text(adapter, messages), add_special_tokens=False)["input_ids"]

    def chat_text(self, adapter: str, messages: list[dict[str, str]]) -> str:
        """A conversation through the chat template, ready for the assistant's reply.

        A qtune adapter is prompted as it was trained: with its chat template (data.chat_template), and its
        system prompt when the messages bring none.
        """
        info = self.adapters.get(adapter)
        template = (info.chat_template if info else None) or self.tokenizer.chat_template
        if not template:
            raise ConfigError(f"{self.base_path} has no chat template: use the completions endpoint")
        if info is not None and info.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": info.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        rows: list[Row],
        on_step: Callable[[list[Row]], None] | None = None,
        admit: Callable[[int], list[Row]] | None = None,
        prefill_chunk: int | None = None,
    ) -> list[Row]:
        """Complete all rows in one batch, each with its own adapter and sampling; returns the rows, filled in.

        `on_step(rows)` is called after every forward pass with the rows that got a token or finished (for
        streaming); a row whose `cancelled` is set (from any thread) leaves the batch at the next step. `admit(n)`,
        called between steps with the number of running rows, returns new rows to join the running batch
        (continuous batching); they are prefilled on their own and their KV cache is appended to the batch's.

        `prefill_chunk`: a joining prompt longer than this is run into its cache `prefill_chunk` tokens at a time,
        one chunk between two steps of the running batch, so a long prompt delays the running rows by one chunk
        per token rather than by its whole prefill (None: every prompt in one pass). Short prompts that arrive
        meanwhile join at once; long ones wait for the one filling to finish. Once filled, long rows decode in
        a lane of their own, so the short rows' steps are not padded to a long history.
        """
        with self._lock:
            held: dict[int, Row] = {}  # rows running: their adapters are pinned (never evicted under them)
            try:
                batch = filling = slow = None  # slow: the rows of long prompts, decoded in their own lane
                incoming, waiting, first = list(rows), [], True
                while True:
                    if incoming:
                        try:
                            short, long = self._start(incoming, held, prefill_chunk)
                        except (AdapterError, ConfigError) as e:
                            if first:
                                raise
                            for r in incoming:  # rows admitted later fail alone
                                r.finish_reason, r.error = "error", str(e)
                            if on_step is not None:
                                on_step(incoming)
                            short, long = [], []
                        waiting += long
                        if short:
                            fresh = self._step(prefill(self.model, short, self.tokenizer.pad_token_id), on_step)
                            batch = self._join(batch, fresh)
                    first = False
                    if filling is None and waiting:
                        filling, waiting = prefill(self.model, waiting, self.tokenizer.pad_token_id), []
                    if filling is not None:  # one chunk of the long prompts, or their last columns and first token
                        if pending(filling) > prefill_chunk:
                            filling = fill(self.model, filling, prefill_chunk, on_step)
                        else:
                            slow, filling = self._join(slow, self._step(filling, on_step)), None
                    if batch is not None:
                        batch = self._step(batch, on_step)
                    if slow is not None:
                        slow = self._step(slow, on_step)
                    self._release(held)
                    running = sum(len(b.rows) for b in (batch, slow) if b is not None)
                    can_join = all(b is None or joinable(b.cache) for b in (batch, slow))
                    incoming = admit(running) if admit is not None and can_join else []
                    if batch is None and slow is None and filling is None and not waiting and not incoming:
                        return rows
            finally:
                for r in held.values():
                    self._pins[r.adapter] -= 1

    @staticmethod
    def _join(batch: Batch | None, fresh: Batch | None) -> Batch | None:
        return fresh if batch is None else merge(batch, fresh) if fresh is not None else batch

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
        if info is not None and info.kind != CAUSAL_LM:
            raise AdapterError(f"{row.adapter!r} is a {info.kind} adapter, not a text-generation adapter")

    def _start(self, rows: list[Row], held: dict[int, Row], chunk: int | None) -> tuple[list[Row], list[Row]]:
        """Check new rows and load and pin their adapters: (short rows, rows whose prompt is over `chunk`)."""
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
        is_long = [chunk is not None and len(r.prompt_ids) > chunk for r in rows]
        return [r for r, x in zip(rows, is_long) if not x], [r for r, x in zip(rows, is_long) if x]

    def _step(self, batch: Batch, on_step) -> Batch | None:
        return step(self.model, batch, self.tokenizer, self.eos_ids, self.context, on_step)

    # ---------------------------------------------------------------- classification

    @torch.no_grad()
    def classify(self, adapters: list[str], texts: list[str]) -> list[dict[str, Any]]:
        """Label each text with its adapter: [{"label", "probabilities": {label: p}}], one batch per base."""
        if len(adapters) != len(texts):
            raise ConfigError(f"{len(adapters)} adapter names for {len(texts)} texts")
        for name in adapters:
            info = self.adapters.get(name)
            if info is None or info.kind != CLASSIFIER:
                known = [n for n, i in self.adapters.items() if i.kind == CLASSIFIER]
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
