"""Tokenized examples kept on disk: Arrow files memory-mapped through `datasets`, so a large data set costs disk,
not RAM, and `datasets`' map can tokenize it in several processes.

Each load writes into its own folder under the datasets cache (`HF_DATASETS_CACHE/qtune-tokens/`), removed when
the process ends.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = ("input_ids", "labels", "row")  # what a trainer gets; Examples also hold prompt_len, answer, source


@dataclass
class Example:
    """One tokenized training example and, where it has one, the prompt/answer pair for evaluation."""

    input_ids: list[int]
    labels: list[int]
    row: int
    prompt_ids: list[int] | None = None
    answer: str | None = None
    source: int = 0  # which of the data.train sources it came from


_HELD: list = []  # the open, locked .lock file of each folder this process uses: released when it exits


def scratch(name: str) -> Path:
    """A new folder for one data source's Arrow files, deleted at exit.

    Each folder holds a `.lock` that its process keeps locked (flock) while it lives; a folder whose lock can
    be taken was left by a killed run, and is deleted. A read-only datasets cache falls back to the temp folder.
    """
    import datasets

    root = Path(datasets.config.HF_DATASETS_CACHE) / "qtune-tokens"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=root)
    except OSError:  # not writable: the system's temp folder
        root = Path(tempfile.gettempdir()) / "qtune-tokens"
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=root)
    os.rmdir(probe)
    for old in root.iterdir():
        if (old / ".lock").is_file() and _unlocked(old / ".lock"):
            shutil.rmtree(old, ignore_errors=True)
    label = re.sub(r"[^\w.]", "_", Path(name).name[:40])  # (a hub id's `:split`: no such character in a name)
    folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    lock = (folder / ".lock.new").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(folder / ".lock.new", folder / ".lock")  # seen by others only once locked
    _HELD.append(lock)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _unlocked(path: Path) -> bool:
    """Can this lock be taken, i.e. has the process that held it ended? (The probe lock is released at once.)"""
    try:
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
            return True
    except OSError:
        return False


class Examples(Sequence):
    """Tokenized examples backed by a memory-mapped `datasets.Dataset` (columns: input_ids, labels, row, prompt_len,
    answer, source). Indexing gives `Example`s; `dataset()` gives what a trainer takes."""

    def __init__(self, data, folder: Path):
        self.data = data
        self.folder = folder

    def __len__(self) -> int:
        return len(self.data)

    def _example(self, r: dict[str, Any]) -> Example:
        ids, cut = r["input_ids"], r["prompt_len"]
        return Example(ids, r["labels"], r["row"], ids[:cut] if cut > 0 else None, r["answer"], r["source"])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        return self._example(self.data[i])

    def __iter__(self) -> Iterator[Example]:
        for batch in self.data.iter(batch_size=256):
            for values in zip(*batch.values()):
                yield self._example(dict(zip(batch, values)))

    def select(self, indices) -> Examples:
        """These examples at `indices` (repeats allowed), in that order; no tokens are copied."""
        return Examples(self.data.select(list(indices)), self.folder)

    def lengths(self) -> list[int]:
        """Every example's token count, read from the Arrow list offsets (no token is loaded)."""
        return lengths(self.data)

    def token_counts(self) -> tuple[int, int]:
        """(tokens, trained tokens) over all these examples, counted in Arrow batches."""
        import numpy as np
        import pyarrow.compute as pc

        tokens = trained = 0
        for batch in self.data.with_format("arrow", columns=["labels"]).iter(batch_size=10000):
            flat = pc.list_flatten(batch.column("labels")).to_numpy(zero_copy_only=False)
            tokens += len(flat)
            trained += int(np.count_nonzero(flat != -100))
        return tokens, trained

    def dataset(self):
        """The (input_ids, labels, row) `datasets.Dataset` a trainer takes, written contiguously to disk once."""
        data = self.data.select_columns(list(COLUMNS))
        if data._indices is None:
            return data
        name = f"train-{uuid.uuid4().hex}"  # never an earlier selection's file
        return data.flatten_indices(cache_file_name=str(self.folder / f"{name}.arrow"), new_fingerprint=name)


def lengths(dataset) -> list[int]:
    """Token counts of a dataset's input_ids, from its Arrow offsets when it has no index mapping."""
    import pyarrow.compute as pc

    if dataset._indices is None:
        return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
    return [len(ids) for batch in dataset.iter(batch_size=1000) for ids in batch["input_ids"]]


def concatenate(parts: Sequence[Examples]) -> Examples:
    import datasets

    if len(parts) == 1:
        return parts[0]
    return Examples(datasets.concatenate_datasets([p.data for p in parts]), parts[0].folder)
