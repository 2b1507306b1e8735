"""GRPO's prompts: read out of SFT records (chat, sharegpt, alpaca, prompt_completion, each as formats.py
recognises it) or {"prompt": ...} alone, each record's last assistant reply (or completion) kept as its reference
for the reward functions. A prompt is kept as trl's generation takes it (text, or chat messages) and tokenized as
training and generation see it, to plan memory and to refuse one that leaves no room for grpo.max_new_tokens.

Sources, columns and tokenization are preference.py's (one prompt + reply encoded as SFT encodes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtune.config import DataConfig, SourceConfig
from qtune.data.formats import check_columns, detect_format, sharegpt_turns, turns, validate
from qtune.data.load import COUNTED, DataReport, alpaca_template, token_count
from qtune.data.preference import (
    ONE_FORM,
    Source,
    each_source,
    mapped_records,
    record_field,
    seen_before,
    split_ids,
    with_system,
)
from qtune.data.read import fingerprint_data, raise_all
from qtune.errors import ConfigError, DataError

PROMPT_FIELD = {"chat": "messages", "sharegpt": "conversations", "alpaca": "instruction"}  # else `prompt`


@dataclass
class Prompted:
    """One GRPO prompt: as trl's generation takes it (text, or chat messages) and how long it tokenizes."""

    row: int
    prompt: str | list[dict]
    reference: str | None
    prompt_ids: list[int]


def _prompt_format(row: int, first: Any, file: str, fmt: str) -> str:
    """An SFT format (`detect_format`), or `prompt`: a prompt without a completion, the reference being optional."""
    if fmt == "auto" and isinstance(first, dict) and "prompt" in first and "completion" not in first:
        return "prompt"
    fmt = detect_format(row, first, file) if fmt == "auto" else fmt
    if fmt == "text":
        raise DataError(
            f"{file}: text records hold no prompt to generate from; GRPO reads chat, sharegpt, alpaca or "
            "prompt(+completion) records"
        )
    return fmt


def _before_reply(messages: list[dict] | None) -> tuple:
    """(the messages before the last one, its content) where the last is an assistant reply, else (all, None)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def _generation_prompt(record: Any, fmt: str, chat: bool, row: int, errors: list[str]) -> tuple | None:
    """(prompt, reference) of one SFT record: the conversation before its last assistant reply and that reply (a
    conversation that ends on another turn is all prompt), or the prompt and its completion; None with errors."""
    if not isinstance(record, dict):
        errors.append(f"row {row}: a record must be an object with named fields, got {type(record).__name__}")
        return None
    if fmt in ("prompt", "prompt_completion") and record.get("completion") is None:
        prompt, reference = record_field(record, "prompt", "user", chat, row, errors), None
    elif fmt == "chat":
        prompt, reference = _before_reply(turns(record.get("messages"), "messages", errors, row, sharegpt=False))
    elif fmt == "sharegpt":
        prompt, reference = _before_reply(sharegpt_turns(record, row, errors))
    else:
        norm = validate(record, fmt, row, errors) or {}
        if "prompt" in norm:
            prompt, reference = norm["prompt"], norm["completion"]
        elif "n_prompt" in norm:
            cut = norm["n_prompt"]
            prompt, reference = norm["messages"][:cut], norm["messages"][-1]["content"]
        else:
            prompt, reference = _before_reply(norm.get("messages"))
    field = PROMPT_FIELD.get(fmt, "prompt")
    if isinstance(prompt, list) and not chat:
        errors.append(f"row {row}: field `{field}` is a list of messages in a file of text records: {ONE_FORM}")
    elif prompt == []:
        errors.append(f"row {row}: field `{field}` has no message before its reply to prompt with")
    elif prompt is not None:
        return ([{"role": "user", "content": prompt}] if chat and isinstance(prompt, str) else prompt), reference
    return None


def _generation_ids(tokenizer, prompt: str | list[dict], max_tokens: int) -> list[int]:
    """The ids generation starts from: encode's prompt part before a placeholder reply (a chat prompt ends in the
    template's generation prompt), with BOS where training puts it."""
    reply = [{"role": "assistant", "content": "."}] if isinstance(prompt, list) else "."
    return split_ids(tokenizer, prompt, reply, max_tokens)[0]


def _load_prompts_source(
    src: SourceConfig, tokenizer, cfg: DataConfig, limit: int
) -> tuple[list[Prompted], DataReport]:
    """Read and validate one source's prompts; one DataError lists every bad record and every prompt over `limit`."""
    errors: list[str] = []
    rows = mapped_records(src, check_columns(src.columns or {}), errors)
    report = DataReport(file=src.path, format=_prompt_format(*rows[0], src.path, src.format) if rows else "")
    if report.format in ("chat", "sharegpt") and not tokenizer.chat_template:
        raise DataError(
            f"{src.path}: {report.format} records need a chat template and this base's tokenizer has none: "
            "set data.chat_template (chatml, llama-3, mistral, gemma, alpaca, or a .jinja file)"
        )
    if report.format == "alpaca" and not tokenizer.chat_template:
        alpaca_template(tokenizer)
    first = rows[0][1] if rows and isinstance(rows[0][1], dict) else {}
    chat = report.format not in ("prompt", "prompt_completion") or isinstance(first.get("prompt"), list)
    seen: set[bytes] = set()
    out = []
    for row, raw in rows:
        found = _generation_prompt(raw, report.format, chat, row, errors)
        if found is None:
            continue
        report.duplicates += seen_before(raw, seen)
        prompt = with_system(found[0], cfg.system_prompt)
        try:
            ids = _generation_ids(tokenizer, prompt, COUNTED * cfg.max_length)
        except DataError as e:
            errors.append(f"row {row}: {e}")
            continue
        if len(ids) > limit:
            errors.append(
                f"row {row}: field `{PROMPT_FIELD.get(report.format, 'prompt')}`: the prompt is "
                f"{token_count(len(ids), cfg.max_length)} tokens, over data.max_length - grpo.max_new_tokens = {limit} "
                "(shorten it, or raise data.max_length)"
            )
            continue
        out.append(Prompted(row, prompt, found[1], ids))
    raise_all(src.path, errors)
    report.records, report.examples = len(rows), len(out)
    report.tokens = sum(len(p.prompt_ids) for p in out)
    report.fingerprint = fingerprint_data(src.path)
    return out, report


def load_prompts(
    source: Source, tokenizer, cfg: DataConfig, max_new_tokens: int = 0
) -> tuple[list[Prompted], DataReport]:
    """Read the prompts GRPO generates from, out of SFT records (chat, sharegpt, alpaca, prompt_completion) or
    {"prompt": ...} alone; each record's last assistant reply (or completion) is kept as its reference.

    Args:
        source: as `preference.load_pairs`: a path or hub id, a `SourceConfig`, or data.train's list of them.
        tokenizer: the base's tokenizer, its chat template already set (data.chat_template).
        cfg: data.format, data.columns and data.system_prompt apply as for SFT.
        max_new_tokens: grpo.max_new_tokens: a prompt longer than data.max_length minus these is an error.

    Raises:
        DataError: listing every bad record, and every prompt too long, with its file, row and field.
    """
    limit = cfg.max_length - max_new_tokens
    if limit <= 0:
        raise ConfigError(
            f"data.max_length={cfg.max_length} leaves no room for a prompt before "
            f"grpo.max_new_tokens={max_new_tokens}: raise data.max_length"
        )
    return each_source(source, cfg, lambda src: _load_prompts_source(src, tokenizer, cfg, limit))


def prompts_dataset(items: list[Prompted]):
    """A `datasets.Dataset` of prompt, reference and row: trl's GRPOTrainer renders and samples each prompt itself,
    and hands `reference` to the reward functions."""
    import datasets

    return datasets.Dataset.from_dict(
        {"prompt": [p.prompt for p in items], "reference": [p.reference for p in items], "row": [p.row for p in items]}
    )
