"""Read local data files (.jsonl, .json, .csv, .parquet, a saved `datasets` folder) into numbered records.

Every problem names the file and the row (1-based: the line of a JSONL file, the data row of a CSV);
`raise_all` reports every bad record of a file at once, not just the first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qtune.errors import DataError

MAX_LISTED_ERRORS = 20


def raise_all(file: str, errors: list[str]) -> None:
    if not errors:
        return
    shown = "\n".join(f"  {e}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    raise DataError(f"{file}: {len(errors)} bad record(s):\n{shown}{more}")


def _decode(raw: bytes, file: str, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: {where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    records, errors = [], []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"row {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            try:
                records.append((line_no, json.loads(text)))
            except json.JSONDecodeError as e:
                errors.append(f"row {line_no}: not valid JSON ({e.msg} at column {e.colno})")
    raise_all(str(path), errors)
    return records


def _read_json(path: Path) -> list[tuple[int, Any]]:
    text = _decode(path.read_bytes(), str(path), "file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records; use .jsonl for one per line")
    return list(enumerate(data, start=1))


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # Rows are numbered as data rows (the header is not a row), matching what a spreadsheet shows minus one.
    rows = list(enumerate(reader, start=1))
    errors = [
        f"row {i}: {len(row[None])} more field(s) than the header has columns (an unquoted comma?)"
        for i, row in rows
        if None in row
    ]
    raise_all(str(path), errors)
    return rows


def _read_table(rows: Iterable[dict]) -> list[tuple[int, Any]]:
    return list(enumerate(rows, start=1))


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """Read a data file, a saved `datasets` folder, or a hub dataset id into (row number, record) pairs, rows
    counted from 1."""
    if is_hub_dataset(path):
        return _read_table(_hub_dataset(str(path)).to_list())
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix == ".arrow":  # one Arrow file of a saved `datasets` split
        import datasets

        try:
            records = _read_table(datasets.Dataset.from_file(str(path)).to_list())
        except Exception as e:
            raise DataError(f"{path}: not a readable datasets Arrow file ({e})") from None
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: holds several splits ({', '.join(ds)}); point at one, e.g. {path}/train")
        records = _read_table(ds.to_list())
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".json":
        records = _read_json(path)
    elif path.suffix == ".csv":
        records = _read_csv(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = _read_table(pq.read_table(path).to_pylist())
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet, .arrow, a saved "
            "datasets folder, or a hub dataset id (owner/name, owner/name:split)"
        )
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
        and not Path(name).suffix
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
        digest.update(file.read_bytes())
    return "sha256:" + digest.hexdigest()
