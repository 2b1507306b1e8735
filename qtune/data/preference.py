"""Preference data for DPO and KTO: read pairs (prompt, chosen, rejected) or judged completions (prompt,
completion, good or bad), validate every record, and tokenize each prompt + reply as SFT does (`encode`), so BOS,
EOS and the prompt's tokens are exactly the ones SFT training and generation use. GRPO's prompts are prompts.py,
which reads and tokenizes with the public helpers here.

  pairs            {"prompt": str, "chosen": str, "rejected": str}
  pairs-chat       {"prompt": [messages] | str, "chosen": [assistant messages] | str, "rejected": ...}
  pairs-implicit   {"chosen": [conversation], "rejected": [conversation]}, alike but for the last assistant message
  pairs-sharegpt   {"conversations": [{from, value}, ...], "chosen": {from: gpt, value}, "rejected": ..., "system"?}
  unpaired(-chat)  {"prompt": ..., "completion": ..., "label": true | false | 1 | 0}  (KTO)

A completion is the trained ids only: the reply and its one EOS, nothing of the template after it. Records are
held in memory (a preference set is thousands of records, not millions); every bad one is listed at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtune.config import DataConfig, SourceConfig
from qtune.data.encode import IGNORE, encode
from qtune.data.formats import check_columns, column_fields, rename_record, sharegpt_turns, shown, text_field, turns
from qtune.data.load import COUNTED, DataReport, token_count
from qtune.data.read import Bad, fingerprint_data, iter_records, raise_all
from qtune.data.sources import combined_report
from qtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from qtune.data.prompts import Prompted

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "messages", "conversations", "system")
CHAT_FORMS = ("pairs-chat", "pairs-implicit", "pairs-sharegpt", "unpaired-chat")
ONE_FORM = "a file holds one form, its first record's"
Source = str | Path | SourceConfig | list[SourceConfig]  # a file or hub id, or data.train's sources


@dataclass
class Pair:
    """One preference pair, tokenized: the shared prompt and each completion (reply + EOS)."""

    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    answer: str | None = None  # the chosen reply's text, for evaluation


@dataclass
class Judged:
    """One completion judged good (True) or bad (False), tokenized: what KTO trains on."""

    row: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


@dataclass
class _Record:
    """A validated preference record: its prompt and replies as text, or as chat messages."""

    row: int
    prompt: str | list[dict]
    replies: dict[str, str | list[dict]]  # chosen and rejected, or completion
    label: bool | None = None


# ---------------------------------------------------------------------------------------------
# Reading: sources, columns, forms


def _sources(source: Source, cfg: DataConfig) -> list[SourceConfig]:
    """The sources to read, with data.format and data.columns filled in as for SFT (`DataConfig.sources`)."""
    train = source if isinstance(source, list) else [source] if isinstance(source, SourceConfig) else str(source)
    sources = dataclasses.replace(cfg, train=train).sources()
    for i, s in enumerate(sources):
        if s.weight != 1 or s.cap is not None:  # (one Pair list per run: no per-source sampling to apply them to)
            raise ConfigError(f"data.train[{i}] ({s.path}): weight and cap apply to SFT data; remove them here")
    return sources


def mapped_records(src: SourceConfig, columns: dict[str, str], errors: list[str]) -> list[tuple[int, Any]]:
    """A source's records as (row, record), with data.columns (`columns`, checked) applied; an unreadable row is
    added to `errors`."""
    fields, out = None, []
    for row, record in iter_records(src.path):
        if isinstance(record, Bad):
            errors.append(f"row {row}: {record.message}")
            continue
        if fields is None:
            fields = column_fields(columns, record, row, src.path)
        out.append((row, rename_record(record, fields)))
    if not out and not errors:
        raise DataError(f"{src.path}: holds no records")
    return out


def _form(row: int, first: Any, file: str) -> str:
    """The form of a preference file, from its first record's fields."""
    if not isinstance(first, dict):
        raise DataError(f"{file}: row {row}: a record must be an object with named fields, got {type(first).__name__}")
    chat = any(isinstance(first.get(k), list) for k in ("prompt", "chosen", "rejected", "completion"))
    if "label" in first or ("completion" in first and "chosen" not in first):
        return "unpaired-chat" if chat else "unpaired"
    if "chosen" in first or "rejected" in first:
        if "conversations" in first:
            return "pairs-sharegpt"
        if "prompt" in first:
            return "pairs-chat" if chat else "pairs"
        if not isinstance(first.get("chosen"), list):
            raise DataError(
                f"{file}: row {row}: `chosen` and `rejected` without a `prompt` must be whole conversations (lists of "
                "messages); name your prompt column with data.columns.prompt"
            )
        return "pairs-implicit"
    names = ", ".join(shown(n) for n in sorted(first)[:20])
    raise DataError(
        f"{file}: row {row}: cannot tell preference data from fields [{names}]; expected prompt+chosen+rejected, "
        "chosen+rejected (full conversations), conversations+chosen+rejected (ShareGPT) or prompt+completion+label; "
        "map your columns with data.columns"
    )


# ---------------------------------------------------------------------------------------------
# Validation: one record into a _Record, or its problems added to `errors`


def _messages(value: Any, key: str, row: int, errors: list[str]) -> list[dict] | None:
    """Chat messages or ShareGPT turns (told apart by `from`), one turn given alone ({from: gpt, value}) too."""
    one = isinstance(value, dict)
    given = [value] if one else value
    sharegpt = isinstance(given, list) and bool(given) and isinstance(given[0], dict) and "from" in given[0]
    n = len(errors)
    messages = turns(given, key, errors, row, sharegpt=sharegpt)
    if one:  # name the field as the file has it: `chosen.value`, not `chosen[0].value`
        errors[n:] = [e.replace(f"`{key}[0]", f"`{key}") for e in errors[n:]]
    return messages


def record_field(record: dict, key: str, role: str, chat: bool, row: int, errors: list[str]) -> str | list[dict] | None:
    """A prompt or reply field: text, or in a chat record messages (a text there is one message of `role`); None
    with its problem added to `errors`."""
    value = record.get(key)
    if chat and isinstance(value, (list, dict)):
        return _messages(value, key, row, errors)
    if isinstance(value, list):
        errors.append(f"row {row}: field `{key}` is a list of messages in a file of text records: {ONE_FORM}")
        return None
    text = text_field(record, key, errors, row)
    return [{"role": role, "content": text}] if chat and text is not None else text


def _reply(record: dict, key: str, chat: bool, row: int, errors: list[str]) -> str | list[dict] | None:
    reply = record_field(record, key, "assistant", chat, row, errors)
    if isinstance(reply, list) and reply[-1]["role"] != "assistant":
        errors.append(f"row {row}: field `{key}` must end in an assistant message, got {reply[-1]['role']}")
        return None
    return reply


def _label(record: dict, row: int, errors: list[str]) -> bool | None:
    value = record.get("label")
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    why = "is missing" if value is None else f"must be true or false (or 1 or 0), got {shown(value)}"
    errors.append(f"row {row}: field `label` {why}")
    return None


def _implicit(record: dict, row: int, errors: list[str]) -> tuple | None:
    """Two full conversations sharing every message but the last assistant one: (prompt, chosen, rejected)."""
    chosen, rejected = (_reply(record, k, True, row, errors) for k in ("chosen", "rejected"))
    if chosen is None or rejected is None:
        return None
    if chosen[:-1] != rejected[:-1]:
        errors.append(
            f"row {row}: fields `chosen` and `rejected` differ before their last assistant message; without a "
            "`prompt` field both must be the same conversation up to that reply"
        )
        return None
    if not chosen[:-1]:
        errors.append(f"row {row}: field `chosen` has no message before its reply to use as the prompt")
        return None
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _validated(record: Any, form: str, row: int, errors: list[str], system: str | None) -> _Record | None:
    """One raw record as a _Record, or None with every problem found added to `errors`."""
    if not isinstance(record, dict):
        errors.append(f"row {row}: a record must be an object with named fields, got {type(record).__name__}")
        return None
    n, chat, label = len(errors), form in CHAT_FORMS, None
    if form == "pairs-implicit":
        prompt, chosen, rejected = _implicit(record, row, errors) or (None, None, None)
    elif form == "pairs-sharegpt":
        prompt = sharegpt_turns(record, row, errors)
        chosen, rejected = (_reply(record, k, True, row, errors) for k in ("chosen", "rejected"))
    else:
        prompt = record_field(record, "prompt", "user", chat, row, errors)
        if form.startswith("unpaired"):
            chosen, rejected = _reply(record, "completion", chat, row, errors), None
            label = _label(record, row, errors)
        else:
            chosen, rejected = (_reply(record, k, chat, row, errors) for k in ("chosen", "rejected"))
    if len(errors) > n:
        return None
    if rejected is not None and chosen == rejected:
        errors.append(f"row {row}: fields `chosen` and `rejected` are the same reply: nothing to prefer")
        return None
    replies = {"completion": chosen} if rejected is None else {"chosen": chosen, "rejected": rejected}
    return _Record(row, with_system(prompt, system), replies, label)


def with_system(prompt: str | list[dict], system: str | None) -> str | list[dict]:
    """data.system_prompt put before chat messages that have no system message (as load.py does); text as is."""
    if isinstance(prompt, list) and system and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system}, *prompt]
    return prompt


# ---------------------------------------------------------------------------------------------
# Tokenization: each prompt + reply encoded as one SFT record


def _sft_record(prompt: str | list[dict], reply: str | list[dict]) -> dict:
    """A prompt and one reply as the normalised record `encode` takes (formats.validate's prompt_completion)."""
    if isinstance(prompt, list):
        return {"messages": [*prompt, *reply], "n_prompt": len(prompt)}
    return {"prompt": prompt, "completion": reply}


def split_ids(
    tokenizer, prompt: str | list[dict], reply: str | list[dict], max_tokens: int | None
) -> tuple[list, list]:
    """(prompt ids, completion ids) of a prompt and a reply: the ids before the first trained one, and those from it
    to the last trained one, so the completion ends in its EOS and the template's text after it is dropped."""
    ex = encode(tokenizer, _sft_record(prompt, reply), max_tokens=max_tokens)
    trained = [i for i, label in enumerate(ex.labels) if label != IGNORE]
    return ex.input_ids[: trained[0]], ex.input_ids[trained[0] : trained[-1] + 1]


def _fitted(prompt_ids: list[int], completion: list[int], cfg: DataConfig, field: str) -> tuple[list[int], bool]:
    """The completion cut at its end to fit data.max_length after its prompt, and whether it was cut; DataError
    under data.overlong=reject, or where the prompt alone leaves nothing of the completion to train."""
    total, limit = len(prompt_ids) + len(completion), cfg.max_length
    if total <= limit:
        return completion, False
    if len(prompt_ids) >= limit:
        raise DataError(
            f"field `prompt` alone is {token_count(len(prompt_ids), limit)} tokens, data.max_length={limit}: "
            f"nothing of `{field}` is left to train (shorten the prompt, or raise data.max_length)"
        )
    if cfg.overlong == "reject":
        raise DataError(
            f"fields `prompt` + `{field}` are {token_count(total, limit)} tokens, over data.max_length={limit} "
            "(raise data.max_length, or set data.overlong=truncate)"
        )
    return completion[: limit - len(prompt_ids)], True


def _tokenized(tokenizer, record: _Record, cfg: DataConfig) -> tuple[list[int], dict[str, list[int]], bool]:
    """The record's prompt ids, each reply's completion ids fitted to data.max_length, and whether any was cut."""
    prompt_ids, completions, cut = None, {}, False
    for field, reply in record.replies.items():
        ids, completion = split_ids(tokenizer, record.prompt, reply, COUNTED * cfg.max_length)
        if prompt_ids is not None and ids != prompt_ids:  # DPO needs one prompt for both replies
            raise DataError(
                f"field `{field}`: the prompt tokenizes differently before it than before `chosen`, as a chat "
                "template that rewrites the history does; set data.chat_template to one that does not"
            )
        prompt_ids = ids
        completions[field], truncated = _fitted(ids, completion, cfg, field)
        cut = cut or truncated
    return prompt_ids, completions, cut


# ---------------------------------------------------------------------------------------------
# Loading preference sources


@dataclass
class _Encoded:
    row: int
    prompt_ids: list[int]
    completions: dict[str, list[int]]  # chosen and rejected, or completion
    label: bool | None
    answer: str | None


def seen_before(record: Any, seen: set[bytes]) -> bool:
    """Whether an identical record came earlier (counted in the report, as load.py counts them; kept)."""
    key = hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()
    found = key in seen
    seen.add(key)
    return found


def _answer(reply: str | list[dict] | None) -> str | None:
    return reply[-1]["content"] if isinstance(reply, list) else reply


def _load_source(src: SourceConfig, tokenizer, cfg: DataConfig, paired: bool) -> tuple[list[_Encoded], DataReport]:
    """Read, validate and tokenize one preference source; one DataError lists every bad record."""
    if src.format not in (None, "auto"):
        raise ConfigError(
            f"data.format={src.format} is an SFT format; preference data is recognised from its fields: leave it auto"
        )
    errors: list[str] = []
    rows = mapped_records(src, check_columns(src.columns or {}, PREFERENCE_FIELDS), errors)
    report = DataReport(file=src.path, format=_form(*rows[0], src.path) if rows else "")
    if paired and report.format.startswith("unpaired"):
        raise DataError(f"{src.path}: unpaired records (prompt, completion, label) train with dpo.loss=kto only")
    if report.format in CHAT_FORMS and not tokenizer.chat_template:
        raise DataError(
            f"{src.path}: row {rows[0][0]}: {report.format} records need a chat template and this base's tokenizer "
            "has none: set data.chat_template (chatml, llama-3, mistral, gemma, alpaca, or a .jinja file)"
        )
    seen: set[bytes] = set()
    out = []
    for row, raw in rows:
        record = _validated(raw, report.format, row, errors, cfg.system_prompt)
        if record is None:
            continue
        report.duplicates += seen_before(raw, seen)
        try:
            prompt_ids, completions, cut = _tokenized(tokenizer, record, cfg)
        except DataError as e:
            errors.append(f"row {row}: {e}")
            continue
        report.truncated += cut
        out.append(_Encoded(row, prompt_ids, completions, record.label, _answer(record.replies.get("chosen"))))
    raise_all(src.path, errors)
    report.records = len(rows)
    report.examples = sum(1 if paired else len(e.completions) for e in out)
    report.trained_tokens = sum(len(c) for e in out for c in e.completions.values())
    prompts = sum(len(e.prompt_ids) * (1 if paired else len(e.completions)) for e in out)  # KTO sees it per reply
    report.tokens = prompts + report.trained_tokens
    report.fingerprint = fingerprint_data(src.path)
    return out, report


def each_source(
    source: Source, cfg: DataConfig, load_one: Callable[[SourceConfig], tuple[list, DataReport]]
) -> tuple[list, DataReport]:
    """`load_one(src)` over every source, in order: all their items, and one report (`combined_report` where there
    are several, each source's errors then prefixed with its data.train[i])."""
    sources = _sources(source, cfg)
    items, reports = [], []
    for i, src in enumerate(sources):
        try:
            loaded, report = load_one(src)
        except DataError as e:
            if len(sources) == 1:
                raise
            raise DataError(f"data.train[{i}] {e}") from None
        items += loaded
        reports.append(report)
    return items, reports[0] if len(reports) == 1 else combined_report(reports, sources)


def _load(source, tokenizer, cfg: DataConfig, paired: bool) -> tuple[list[_Encoded], DataReport]:
    if cfg.loss_on != "assistant":
        raise ConfigError(f"data.loss_on={cfg.loss_on} is for SFT; preference losses score the completions only")
    return each_source(source, cfg, lambda src: _load_source(src, tokenizer, cfg, paired))


def load_pairs(source: Source, tokenizer, cfg: DataConfig) -> tuple[list[Pair], DataReport]:
    """Read, validate and tokenize preference pairs (DPO) from a file, a source, or data.train's list of them.

    Args:
        source: a path or hub dataset id, a `SourceConfig`, or a list of them (data.train); weight and cap are
            SFT's and a ConfigError here.
        tokenizer: the base's tokenizer, its chat template already set (data.chat_template).
        cfg: data.columns, data.system_prompt, data.max_length and data.overlong apply as for SFT.

    Returns:
        The pairs in file order, and a report (tokens: prompt + chosen + rejected; trained: chosen + rejected).

    Raises:
        DataError: listing every bad record with its file, row and field.
    """
    items, report = _load(source, tokenizer, cfg, paired=True)
    pairs = [Pair(e.row, e.prompt_ids, e.completions["chosen"], e.completions["rejected"], e.answer) for e in items]
    return pairs, report


def load_judged(source: Source, tokenizer, cfg: DataConfig) -> tuple[list[Judged], DataReport]:
    """Read, validate and tokenize judged completions (KTO): unpaired records, or pairs as one good and one bad.

    A pair file gives every chosen reply first and then every rejected one: trl's KTO estimates its KL term from
    each completion next to its neighbour's prompt, and a pair's two replies side by side would share theirs.
    Arguments, returns and errors as `load_pairs` (tokens count the prompt once per completion).
    """
    items, report = _load(source, tokenizer, cfg, paired=False)
    judged = [Judged(e.row, e.prompt_ids, e.completions["completion"], e.label) for e in items if e.label is not None]
    for field, label in (("chosen", True), ("rejected", False)):
        judged += [Judged(e.row, e.prompt_ids, e.completions[field], label) for e in items if e.label is None]
    return judged, report


def longest(item: Pair | Judged | Prompted) -> int:
    """Tokens in the longest sequence one item puts through the model: its prompt and its longer completion (a
    GRPO prompt alone: add grpo.max_new_tokens); memory is planned for the longest of them."""
    if isinstance(item, Pair):
        return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))
    return len(item.prompt_ids) + len(getattr(item, "completion_ids", []))


# ---------------------------------------------------------------------------------------------
# As `datasets`, the tokenized columns trl's trainers take


def pairs_dataset(pairs: list[Pair]):
    """A `datasets.Dataset` of prompt_ids, chosen_ids, rejected_ids and row: trl's DPOTrainer takes it as tokenized."""
    return _dataset(pairs, "prompt_ids", "chosen_ids", "rejected_ids", "row")


def judged_dataset(items: list[Judged]):
    """A `datasets.Dataset` of prompt_ids, completion_ids, label and row: trl's KTOTrainer takes it as tokenized."""
    return _dataset(items, "prompt_ids", "completion_ids", "label", "row")


def _dataset(items: list, *names: str):
    import datasets

    return datasets.Dataset.from_dict({name: [getattr(item, name) for item in items] for name in names})
