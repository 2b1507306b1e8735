"""Tokenize validated records with label masks, and hold out an evaluation split.

The formats (one per file, detected from the first record's fields unless `data.format` says) are in
qtune/data/formats.py.

Chat-like records are rendered with the tokenizer's chat template; loss falls on the assistant
replies (or completions) only, each ending in EOS, unless `data.loss_on` is "all". Every bad
record is reported with its file, row and field; nothing is dropped without being counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from qtune.config import DataConfig
from qtune.data.formats import check_columns, detect_format, rename_columns, validate
from qtune.data.read import fingerprint_data, raise_all, read_records
from qtune.errors import DataError

IGNORE = -100
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class Example:
    """One tokenized training example and, where it has one, the prompt/answer pair for evaluation."""

    input_ids: list[int]
    labels: list[int]
    row: int
    prompt_ids: list[int] | None = None
    answer: str | None = None


@dataclass
class DataReport:
    """What happened to every record of one file; written into the run report."""

    file: str
    format: str
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_target: list[int] = field(default_factory=list)
    duplicates: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    fingerprint: str = ""

    def summary(self) -> str:
        parts = [f"{self.file}: {self.records} records ({self.format})", f"{self.examples} examples"]
        parts.append(f"{self.tokens} tokens, {self.trained_tokens} trained")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_no_target:
            parts.append(f"{len(self.dropped_no_target)} dropped: nothing left to train after truncation")
        if self.duplicates:
            parts.append(f"{self.duplicates} exact duplicate records (kept)")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Tokenization with label masks


def _tokens(tokenizer, text: str) -> list[int]:
    # Never add special tokens here: the chat template already wrote them, and BOS is handled once below.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _adds_bos(tokenizer) -> bool:
    """Does this tokenizer put BOS in front of plain text by convention (Llama-2/3 do, SmolLM2 does not)?"""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # a broken template, or one that refuses these roles (raise_exception)
        raise DataError(f"the chat template cannot render this conversation: {e} (see data.chat_template)") from None


def chat_segments(tokenizer, messages: list[dict], first_trained: int = 0) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces.

    A trained piece is an assistant reply (at message index >= `first_trained`): what the template
    adds after the generation prompt, up to and including the first EOS. Text after that EOS (a
    newline, say) is untrained. If the template does not end a reply with EOS, an EOS is inserted,
    written as the piece ("", True).
    """
    full = _render(tokenizer, messages, False)
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        prefix = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
            raise DataError(
                "the chat template does not render conversations as growing prefixes, so assistant turns "
                "cannot be located; set data.loss_on=all or use a template without history rewriting"
            )
        segments.append((full[pos : len(prefix)], False))
        reply = upto[len(prefix) :]
        cut = reply.find(eos) if eos else -1
        if cut >= 0:
            segments += [(reply[: cut + len(eos)], True), (reply[cut + len(eos) :], False)]
        else:
            segments += [(reply, True), ("", True)]
        pos = len(upto)
    segments.append((full[pos:], False))
    return segments


def _segments(tokenizer, record: dict) -> tuple[list[tuple[str, bool]], str | None]:
    """The (text, trained) pieces of a normalised record, and its reference answer if it has one."""
    if "text" in record:
        return [(record["text"], True), ("", True)], None
    if "prompt" in record:
        return [(record["prompt"], False), (record["completion"], True), ("", True)], record["completion"]
    messages = record["messages"]
    answer = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")  # (a call-only turn: "")
    if tokenizer.chat_template:
        segments = chat_segments(tokenizer, messages, record.get("n_prompt", 0))
        first = record.get("n_prompt", 0)
        for i, m in enumerate(messages[first:], first):
            if m.get("tool_calls"):  # a template that ignores tool_calls would train an empty or partial reply
                without = [*messages[:i], {k: v for k, v in m.items() if k != "tool_calls"}]
                if _render(tokenizer, messages[: i + 1], False) == _render(tokenizer, without, False):
                    raise DataError(
                        "the chat template leaves tool_calls out of the text: set data.chat_template to one that "
                        "renders them (chatml, llama-3, mistral, gemma, alpaca)"
                    )
        return segments, answer
    if "alpaca" not in record:
        raise DataError("chat messages need a base whose tokenizer has a chat template; this one has none")
    # Alpaca records for a base without a chat template: the classic Alpaca prompt.
    instruction, extra = record["alpaca"]
    block = f"### Input:\n{extra}\n\n" if extra.strip() else ""
    prompt = ALPACA_TEMPLATE.format(instruction=instruction, input_block=block)
    return [(prompt, False), (answer, True), ("", True)], answer


def encode(tokenizer, record: dict, loss_on: str = "assistant") -> Example:
    """Tokenize one normalised record into input_ids and labels (-100 where no loss is taken).

    Pieces are tokenized separately, so the prompt tokens equal what generation later sees.
    """
    segments, answer = _segments(tokenizer, record)
    ids: list[int] = []
    labels: list[int] = []
    reply_start = None
    for text, trained in segments:
        piece = _tokens(tokenizer, text) if text else ([tokenizer.eos_token_id] if trained else [])
        if trained and text:
            reply_start = len(ids)
        ids.extend(piece)
        labels.extend(piece if (trained or loss_on == "all") else [IGNORE] * len(piece))
    bos = tokenizer.bos_token_id
    if _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        labels.insert(0, IGNORE)
        reply_start = None if reply_start is None else reply_start + 1
    while len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
        ids.pop(0)  # a text that already starts with BOS: keep exactly one
        labels.pop(0)
        reply_start = None if reply_start is None else reply_start - 1
    prompt_ids = ids[:reply_start] if (answer is not None and reply_start) else None
    return Example(input_ids=ids, labels=labels, row=0, prompt_ids=prompt_ids, answer=answer)


def load_examples(path: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[Example], DataReport]:
    """Read, validate and tokenize a data file per `cfg`; raise DataError listing every bad record."""
    file = str(path)
    records = rename_columns(read_records(path), check_columns(cfg.columns), file)
    fmt = detect_format(records, file) if cfg.format == "auto" else cfg.format
    if fmt in ("chat", "sharegpt") and not tokenizer.chat_template:
        raise DataError(
            f"{file}: {fmt} records need a chat template and this base's tokenizer has none: set data.chat_template "
            "(chatml, llama-3, mistral, gemma, alpaca, or a .jinja file)"
        )
    report = DataReport(file=file, format=fmt, records=len(records), fingerprint=fingerprint_data(path))
    errors: list[str] = []
    normalised = []
    seen: set[str] = set()
    for row, record in records:
        norm = validate(record, fmt, row, errors)
        if norm is None:
            continue
        if cfg.system_prompt and "messages" in norm and norm["messages"][0]["role"] != "system":
            norm["messages"] = [{"role": "system", "content": cfg.system_prompt}, *norm["messages"]]
            if "n_prompt" in norm:
                norm["n_prompt"] += 1
        key = json.dumps(record, sort_keys=True, ensure_ascii=False)
        report.duplicates += key in seen
        seen.add(key)
        normalised.append((row, norm))
    raise_all(file, errors)

    examples = []
    # A bar only where it takes a while: ~3 s per 10k short chat records on two CPU cores.
    for row, norm in tqdm(
        normalised, desc=f"tokenizing {Path(file).name}", disable=len(normalised) < 20000, leave=False
    ):
        try:
            ex = encode(tokenizer, norm, cfg.loss_on)
        except DataError as e:
            errors.append(f"row {row}: {e}")
            continue
        ex.row = row
        if len(ex.input_ids) > cfg.max_length:
            if cfg.overlong == "reject":
                errors.append(
                    f"row {row}: {len(ex.input_ids)} tokens is over data.max_length={cfg.max_length} "
                    "(raise data.max_length, or set data.overlong=truncate)"
                )
                continue
            ex.input_ids, ex.labels = ex.input_ids[: cfg.max_length], ex.labels[: cfg.max_length]
            report.truncated += 1
            if all(lab == IGNORE for lab in ex.labels):
                report.dropped_no_target.append(row)
                continue
        report.tokens += len(ex.input_ids)
        report.trained_tokens += sum(lab != IGNORE for lab in ex.labels)
        examples.append(ex)
    raise_all(file, errors)
    report.examples = len(examples)
    if not examples:
        raise DataError(f"{file}: no usable examples left (all {report.records} records were dropped: see above)")
    return examples, report


def to_dataset(examples, labels: list | None = None):
    """A `datasets.Dataset` of input_ids, labels and source row, the shape trl's SFTTrainer accepts as tokenized.

    `labels` replaces the per-token labels of `Example`s (a classifier's one label per example).
    """
    import datasets

    return datasets.Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": labels if labels is not None else [e.labels for e in examples],
            "row": [e.row for e in examples],
        }
    )


@dataclass
class HeldOut:
    """The evaluation split taken from the training file (data.eval_fraction); written into the run report."""

    file: str
    fraction: float
    seed: int
    examples: int

    def summary(self) -> str:
        return (
            f"{self.examples} examples held out of {self.file} (data.eval_fraction={self.fraction}, seed {self.seed})"
        )


def hold_out(examples: list, fraction: float, seed: int, file: str) -> tuple[list, list, HeldOut]:
    """Split a seeded `fraction` of the examples off for evaluation: (train, held out, report).

    At least one example is held out and at least one kept; the split depends on the seed and the
    examples' order only, so a resumed run holds out the same ones.
    """
    import random

    if len(examples) < 2:
        raise DataError(f"{file}: data.eval_fraction needs at least 2 examples to split, it has {len(examples)}")
    count = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in held]
    evaluation = [e for i, e in enumerate(examples) if i in held]
    return train, evaluation, HeldOut(file, fraction, seed, len(evaluation))
