"""Read local data files (.jsonl, .json, .csv, .parquet, a saved `datasets` folder) into numbered records.

Every problem names the file and the row (1-based: the line of a JSONL file, the data row of a CSV);
`raise_all` reports every bad record of a file at once, not just the first.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtune.errors import DataError

MAX_LISTED_ERRORS = 20


def raise_all(file: str, errors: list[str], total: int | None = None) -> None:
    """Raise one DataError listing the first MAX_LISTED_ERRORS of `errors` (of `total` bad records, if more)."""
    total = len(errors) if total is None else total
    if not total:
        return
    shown = "\n".join(f"  {e}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {total - MAX_LISTED_ERRORS} more" if total > MAX_LISTED_ERRORS else ""
    raise DataError(f"{file}: {total} bad record(s):\n{shown}{more}")


@dataclass
class Bad:
    """A row that could not be read (not UTF-8, not JSON, a CSV row with too many fields): its message."""

    message: str


Rows = Iterator[tuple[int, Any]]  # (row number from 1, record or Bad)


def _iter_jsonl(path: Path) -> Rows:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield line_no, Bad(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            yield line_no, _unicode_checked(_parsed(text))


def _parsed(text: str) -> Any:
    """A JSONL line or a .json document, or Bad(why): not JSON, or a number or a nesting Python cannot read."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:  # (a line of JSONL has no line number of its own; a .json document has)
        at = f"line {e.lineno}, column {e.colno}" if "\n" in text.rstrip() else f"column {e.colno}"
        return Bad(f"not valid JSON ({e.msg} at {at})")
    except ValueError as e:  # an integer of more than 4300 digits (sys.int_info.default_max_str_digits)
        return Bad(f"not readable JSON ({str(e).split(':')[0]})")
    except RecursionError:
        return Bad("not readable JSON (nested too deeply)")
    return record


def _unicode_checked(record: Any) -> Any:
    """The record, or Bad naming its first string that is not valid Unicode."""
    where = lone_surrogate(record)
    if where is None:
        return record
    # Valid JSON ("\ud800"), not valid Unicode: no tokenizer takes it, and writing it out fails.
    return Bad(f"field `{where}` holds a lone surrogate (\\ud800-\\udfff), not text")


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate(value: Any) -> str | None:
    """The field (e.g. `messages[1].content`) of the first string or key that is not valid Unicode, or None.

    A key is named as Python's ascii() writes it. (Walked with a stack, not recursion: JSON may nest deeply.)
    """
    stack = [(value, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return where or "record"
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                name = k if _is_unicode(k) else ascii(k)
                if name != k:
                    return f"{where}.{name}" if where else name
                stack.append((v, f"{where}.{k}" if where else k))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None


def _iter_json(path: Path) -> Rows:
    raw = path.read_bytes()  # one JSON document is parsed whole: for a large data set, write JSONL
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: file: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    data = _parsed(text)
    if isinstance(data, Bad):
        raise DataError(f"{path}: {data.message}")
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records; use .jsonl for one per line")
    for row, record in enumerate(data, start=1):
        yield row, _unicode_checked(record)


def _iter_csv(path: Path) -> Rows:
    # Rows are numbered as data rows (the header is not a row), matching what a spreadsheet shows minus one.
    with path.open(encoding="utf-8-sig", newline="") as f:  # newline="": the csv module reads \n, \r\n and \r
        try:
            for i, row in enumerate(csv.DictReader(f), start=1):
                if None in row:
                    yield i, Bad(f"{len(row[None])} more field(s) than the header has columns (an unquoted comma?)")
                else:
                    yield i, row
        except UnicodeDecodeError:
            raise DataError(f"{path}: {_first_undecodable(path)}") from None
        except csv.Error as e:
            raise DataError(f"{path}: not readable as CSV ({e})") from None


def _first_undecodable(path: Path) -> str:
    """Where a file stops being UTF-8: `line N` and the byte (read again, line by line, on the error path only)."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return f"line {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x})"
    return "not UTF-8 text"


def _iter_table(batches: Iterable[dict[str, list]]) -> Rows:
    row = 0
    for batch in batches:
        for values in zip(*batch.values()):
            row += 1
            yield row, dict(zip(batch, values))


def _iter_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1000)
        yield from _iter_table(b.to_pydict() for b in batches)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _open_saved(path: Path):
    """A saved `datasets` split: one .arrow file, or a save_to_disk folder."""
    import datasets

    if path.suffix == ".arrow":
        try:
            return datasets.Dataset.from_file(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a readable datasets Arrow file ({e})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds several splits ({', '.join(ds)}); point at one, e.g. {path}/train")
    return ds


READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}


def iter_records(path: str | Path) -> Rows:
    """Stream a data file, a saved `datasets` split or a hub dataset id as (row number, record) pairs, rows counted
    from 1; a row that cannot be read comes as (row, Bad(why)), so every bad row of a file can be listed at once.

    Nothing is held whole but a .json document: memory does not grow with a JSONL, CSV or Parquet file's size.
    """
    if is_hub_dataset(path):
        yield from _iter_table(_hub_dataset(str(path)).iter(batch_size=1000))
        return
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix == ".arrow" or path.is_dir():
        yield from _iter_table(_open_saved(path).iter(batch_size=1000))
    elif path.suffix in READERS:
        yield from READERS[path.suffix](path)
    else:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet, .arrow, a saved "
            "datasets folder, or a hub dataset id (owner/name, owner/name:split)"
        )


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """All records of a data source (as `iter_records`), every unreadable row reported at once."""
    records, errors = [], []
    for row, record in iter_records(path):
        if isinstance(record, Bad):
            errors.append(f"row {row}: {record.message}")
        else:
            records.append((row, record))
    raise_all(str(path), errors)
    if not records:
        raise DataError(f"{path}: holds no records")
    return records


def is_hub_dataset(spec: str | Path) -> bool:
    """`owner/name` or `owner/name:split` that is not a local path: a dataset on the Hugging Face Hub."""
    text = str(spec)
    name = text.split(":", 1)[0]
    return (
        not Path(text).exists()
        and name.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and Path(name).suffix not in (*READERS, ".arrow")  # `x/train.jsonl` is a missing file ('org/Data-2.5' an id)
        and not Path(name.split("/")[0]).is_dir()  # `data/typo` beside a ./data folder is a local typo
    )


def _hub_dataset(spec: str):
    """One split of a hub dataset, through the Hugging Face cache; offline (HF_HUB_OFFLINE) only from the cache."""
    import datasets

    from qtune.hub.resolve import brief_error, hub_offline

    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline and not cached, a missing split, a gated repo: one clear line
        why = (
            "HF_HUB_OFFLINE is set and it is not in the datasets cache: run once with the network, or "
            "save it to a local file"
            if hub_offline()
            else brief_error(e)
        )
        raise DataError(f"{spec}: no such file, and as a hub dataset it could not be loaded: {why}") from None


def fingerprint_data(path: str | Path) -> str:
    """SHA-256 over the bytes of a data file, or of every file in a data folder; a hub dataset's own fingerprint."""
    if is_hub_dataset(path):
        return "datasets:" + _hub_dataset(str(path))._fingerprint
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:  # in 1 MiB pieces: a large file is never held whole
            while piece := f.read(1 << 20):
                digest.update(piece)
    return "sha256:" + digest.hexdigest()
