"""Load one data source: stream its records through column mapping and validation into an Arrow file, tokenize
them with `datasets`' map (in data.num_proc processes for a large file) into memory-mapped `Examples`, and count
what happened to every record in a `DataReport`. Every bad record is listed with its file, row and field before
any is tokenized; nothing is dropped without being counted.

How a record becomes tokens and labels is qtune/data/encode.py; the formats are qtune/data/formats.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from qtune.config import DataConfig, SourceConfig
from qtune.data.encode import IGNORE, encode
from qtune.data.formats import check_columns, column_fields, detect_format, rename_record, validate
from qtune.data.read import MAX_LISTED_ERRORS, Bad, fingerprint_data, iter_records, raise_all
from qtune.data.store import Example, Examples, scratch
from qtune.data.templates import apply_template
from qtune.errors import DataError


@dataclass
class DataReport:
    """What happened to every record of one file; written into the run report."""

    file: str
    format: str
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_target: list = field(default_factory=list)  # rows (several sources: "file:row")
    duplicates: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    fingerprint: str = ""
    sources: list[dict] = field(default_factory=list)  # several data.train sources: each one's report

    def summary(self) -> str:
        parts = [f"{self.file}: {self.records} records ({self.format})", f"{self.examples} examples"]
        parts.append(f"{self.tokens} tokens, {self.trained_tokens} trained")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_no_target:
            parts.append(f"{len(self.dropped_no_target)} dropped: nothing left to train after truncation")
        if self.duplicates:
            parts.append(f"{self.duplicates} exact duplicate records (kept)")
        lines = [", ".join(parts)]
        for s in self.sources:
            capped = f", cap {s['cap']}" if s["cap"] is not None else ""
            dropped = f", {len(s['dropped_no_target'])} dropped" if s["dropped_no_target"] else ""
            lines.append(
                f"  {s['file']}: {s['records']} records ({s['format']}), {s['examples']} examples, "
                f"weight {s['weight']:g}{capped}{dropped}"
            )
        return "\n".join(lines)


def _encode_batch(batch: dict[str, list], tokenizer, loss_on: str, max_length: int, overlong: str) -> dict:
    """datasets.map function: tokenize a batch of validated records (JSON text) with their loss masks."""
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "prompt_len", "answer", "status", "error")}
    counted = COUNTED * max_length  # tokens a record is tokenized to at most: a longer one is cut anyway
    for record in batch["record"]:
        status, error = OK, None
        try:
            ex = encode(tokenizer, json.loads(record), loss_on, max_tokens=counted)
        except DataError as e:
            ex, status, error = Example([], [], 0), FAILED, str(e)
        if len(ex.input_ids) > max_length:
            if overlong == "reject":
                status = FAILED
                error = (
                    f"{token_count(len(ex.input_ids), max_length)} tokens is over data.max_length={max_length} "
                    "(raise data.max_length, or set data.overlong=truncate)"
                )
            else:
                ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
                status = TRUNCATED if any(lab != IGNORE for lab in ex.labels) else DROPPED
        if status == FAILED:
            ex = Example([], [], 0)
        out["input_ids"].append(ex.input_ids)
        out["labels"].append(ex.labels)
        out["prompt_len"].append(len(ex.prompt_ids) if ex.prompt_ids and len(ex.prompt_ids) < len(ex.input_ids) else 0)
        out["answer"].append(ex.answer)
        out["status"].append(status)
        out["error"].append(error)
    return out


OK, TRUNCATED, DROPPED, FAILED = 0, 1, 2, 3
# A record is tokenized to at most COUNTED x data.max_length tokens (its count in a data.overlong=reject error is
# exact up to there): a 50 MB one tokenized whole would take gigabytes, to be cut to data.max_length anyway.
COUNTED = 8


def token_count(n: int, max_length: int) -> str:
    """A record's token count for an error message: exact up to what was tokenized (COUNTED x data.max_length)."""
    return str(n) if n <= COUNTED * max_length else f"more than {COUNTED * max_length}"


def _tokenized_features():
    from datasets import Features, List, Value

    return Features(
        {
            "row": Value("int64"),
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "prompt_len": Value("int32"),
            "answer": Value("string"),
            "status": Value("int8"),
            "error": Value("string"),
        }
    )


BIG = 20000  # records: from here a file is tokenized in several processes, with a progress bar


class _Errors:
    """Bad-record messages of one file: the first MAX_LISTED_ERRORS kept (memory stays flat), all counted."""

    def __init__(self):
        self.shown: list[str] = []
        self.total = 0

    def extend(self, messages: list[str]) -> None:
        self.total += len(messages)
        self.shown.extend(messages[: max(0, MAX_LISTED_ERRORS - len(self.shown))])

    def raise_any(self, file: str) -> None:
        raise_all(file, self.shown, self.total)


def _validated(src: SourceConfig, cfg: DataConfig, report: DataReport, folder: Path, chat_ok: bool) -> Path:
    """Stream a source's records through column mapping and validation into an Arrow file of (row, record JSON);
    every bad record is reported (DataError) before any is tokenized."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    file = src.path
    columns = check_columns(src.columns or {})
    fields = None
    errors = _Errors()
    seen: set[bytes] = set()  # a 16-byte digest per record, for the duplicate count
    path = folder / "records.arrow"
    big = Path(file).is_file() and Path(file).stat().st_size > 50_000_000
    features = datasets.Features({"row": datasets.Value("int64"), "record": datasets.Value("large_string")})
    with ArrowWriter(path=str(path), features=features) as writer:
        for row, record in tqdm(iter_records(file), desc=f"reading {Path(file).name}", disable=not big, leave=False):
            if isinstance(record, Bad):
                errors.extend([f"row {row}: {record.message}"])
                continue
            first = fields is None
            if first:  # whether the mapped columns exist in the first record
                fields = column_fields(columns, record, row, file)
            record = rename_record(record, fields)
            if first:  # the format, from the first record's (mapped) fields
                report.format = detect_format(row, record, file) if src.format == "auto" else src.format
                if report.format in ("chat", "sharegpt") and not chat_ok:
                    raise DataError(
                        f"{file}: {report.format} records need a chat template and this base's tokenizer has none: "
                        "set data.chat_template (chatml, llama-3, mistral, gemma, alpaca, or a .jinja file)"
                    )
            report.records += 1
            bad: list[str] = []
            norm = validate(record, report.format, row, bad)
            if norm is None:
                errors.extend(bad)
                continue
            if cfg.system_prompt and "messages" in norm and norm["messages"][0]["role"] != "system":
                norm["messages"] = [{"role": "system", "content": cfg.system_prompt}, *norm["messages"]]
                if "n_prompt" in norm:
                    norm["n_prompt"] += 1
            key = hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode(), digest_size=16)
            report.duplicates += key.digest() in seen
            seen.add(key.digest())
            writer.write({"row": row, "record": json.dumps(norm, ensure_ascii=False)})
        writer.finalize()
    errors.raise_any(file)
    if not report.records:
        raise DataError(f"{file}: holds no records")
    return path


def alpaca_template(tokenizer) -> None:
    """A base without a chat template renders Alpaca records with the named `alpaca` template; set on the tokenizer,
    it is stored with the adapter, so generate, eval, serve and export prompt as training did."""
    apply_template(tokenizer, "alpaca")
    print("note: this base has no chat template; Alpaca records use data.chat_template=alpaca")


def load_examples(source: str | Path | SourceConfig, tokenizer, cfg: DataConfig, index: int = 0):
    """Read, validate and tokenize one data source per `cfg` (a path, or a `SourceConfig` of data.train) into
    `Examples` on disk and a `DataReport`; raise DataError listing every bad record.

    Memory stays flat in the file's size: records stream through validation into Arrow, and `datasets`' map
    tokenizes them (in data.num_proc processes for a large file) into memory-mapped Arrow files.
    """
    import datasets

    src = source if isinstance(source, SourceConfig) else SourceConfig(str(source), cfg.format, dict(cfg.columns))
    file = src.path
    report = DataReport(file=file, format=src.format or "auto")
    folder = scratch(file)
    records = datasets.Dataset.from_file(str(_validated(src, cfg, report, folder, bool(tokenizer.chat_template))))
    if report.format == "alpaca" and not tokenizer.chat_template:
        alpaca_template(tokenizer)
    report.fingerprint = fingerprint_data(file)
    big = len(records) >= BIG
    procs = cfg.num_proc or (min(8, len(os.sched_getaffinity(0))) if big else 1)
    quiet = not big and datasets.is_progress_bar_enabled()  # a bar only where it takes a while
    if quiet:
        datasets.disable_progress_bars()
    try:
        encoded = records.map(
            _encode_batch,
            batched=True,
            batch_size=500,
            num_proc=procs if procs > 1 else None,
            remove_columns=["record"],
            fn_kwargs={
                "tokenizer": tokenizer,
                "loss_on": cfg.loss_on,
                "max_length": cfg.max_length,
                "overlong": cfg.overlong,
            },
            features=_tokenized_features(),  # typed up front: a first batch without errors must not fix `error` as null
            cache_file_name=str(folder / "tokens.arrow"),
            new_fingerprint=folder.name,
            desc=f"tokenizing {Path(file).name}",
        )
    finally:
        if quiet:
            datasets.enable_progress_bars()
    status = encoded.with_format("numpy", columns=["status"])[:]["status"]
    failed = (status == FAILED).nonzero()[0]
    errors = _Errors()
    if len(failed):
        bad = encoded.select(failed[:MAX_LISTED_ERRORS]).select_columns(["row", "error"]).to_list()
        errors.extend([f"row {b['row']}: {b['error']}" for b in bad])
        errors.total = len(failed)
    errors.raise_any(file)
    dropped = (status == DROPPED).nonzero()[0]
    report.truncated = int((status != OK).sum())
    report.dropped_no_target = [int(r) for r in encoded.select(dropped)["row"]] if len(dropped) else []
    kept = encoded.remove_columns(["status", "error"]).add_column("source", [index] * len(encoded))
    if len(dropped):
        kept = kept.select((status != DROPPED).nonzero()[0])
    examples = Examples(kept, folder)
    report.examples = len(examples)
    if not len(examples):
        rows = ", ".join(map(str, report.dropped_no_target[:MAX_LISTED_ERRORS]))
        more = ", ..." if len(report.dropped_no_target) > MAX_LISTED_ERRORS else ""
        raise DataError(
            f"{file}: no usable examples: all {report.records} records lose their whole answer to truncation at "
            f"data.max_length={cfg.max_length} (rows {rows}{more}); shorten their prompts, or raise data.max_length"
        )
    report.tokens, report.trained_tokens = examples.token_counts()
    return examples, report


def to_dataset(examples, labels: list | None = None):
    """A `datasets.Dataset` of input_ids, labels and source row, the shape trl's SFTTrainer accepts as tokenized.

    `Examples` give their own (on disk); a list of examples is copied. `labels` replaces the per-token labels
    (a classifier's one label per example).
    """
    import datasets

    if isinstance(examples, Examples) and labels is None:
        return examples.dataset()
    return datasets.Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": labels if labels is not None else [e.labels for e in examples],
            "row": [e.row for e in examples],
        }
    )
