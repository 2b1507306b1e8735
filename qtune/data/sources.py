"""A run's training data: every source of data.train read (each with its format, columns and cap), a seeded
held-out split (data.eval_fraction), and the sources' sampling weights applied to what is trained on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass

from qtune.config import DataConfig, SourceConfig
from qtune.data.load import DataReport, load_examples
from qtune.data.store import Examples, concatenate
from qtune.errors import DataError


def describe(cfg: DataConfig) -> str:
    """data.train as a user wrote it: the path, or the sources' paths joined with `+`."""
    return " + ".join(s.path for s in cfg.sources())


def load_train(cfg: DataConfig, tokenizer, seed: int) -> tuple[Examples, DataReport]:
    """Every data.train source read, validated and tokenized, each cut to its `cap` (a seeded sample); one
    report over all of them (per source under `sources`). Weights are applied later, by `weighted`, to the
    training part only, so no copy of a held-out example is trained on."""
    sources = cfg.sources()
    if not sources:
        raise DataError("data.train is not set: point it at a .jsonl/.csv/.parquet file, or list several sources")
    parts, reports = [], []
    for i, src in enumerate(sources):
        where = f"data.train[{i}] " if len(sources) > 1 else ""
        try:
            examples, report = load_examples(src, tokenizer, cfg, index=i)
        except DataError as e:
            raise DataError(f"{where}{e}") from None
        if src.cap is not None and src.cap < len(examples):
            keep = sorted(random.Random(seed + i).sample(range(len(examples)), src.cap))
            examples = examples.select(keep)
            report.examples = len(keep)
            report.tokens, report.trained_tokens = examples.token_counts()
        parts.append(examples)
        reports.append(report)
    if not isinstance(cfg.train, list):  # one file: its own fingerprint (data.format and data.columns are compared
        return parts[0], reports[0]  # as config keys on resume)
    return concatenate(parts), combined_report(reports, sources)


def combined_report(reports: list[DataReport], sources: list[SourceConfig]) -> DataReport:
    """One report over several sources (each read into its report, in order): the counts summed, one fingerprint
    over every source's data and settings (format, columns, weight, cap), each source's own report under
    `sources`. SFT's `load_train` and preference data (qtune.data.preference) write theirs with it."""
    settings = [[r.fingerprint, s.format, s.columns, s.weight, s.cap] for r, s in zip(reports, sources)]
    total = DataReport(
        file=" + ".join(s.path for s in sources),
        format="+".join(dict.fromkeys(r.format for r in reports)),
        fingerprint="sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
    )
    for field in ("records", "examples", "truncated", "duplicates", "tokens", "trained_tokens"):
        setattr(total, field, sum(getattr(r, field) for r in reports))
    total.dropped_no_target = [f"{r.file}:{row}" for r in reports for row in r.dropped_no_target]
    total.sources = [{**dataclasses.asdict(r), "weight": s.weight, "cap": s.cap} for r, s in zip(reports, sources)]
    return total


def weighted(examples: Examples, cfg: DataConfig, seed: int) -> Examples:
    """The training examples with each source's sampling weight applied: weight w keeps every example of the
    source int(w) times plus a seeded sample of the fraction left (0.5: half of them, 2.5: each twice and a
    half once more)."""
    sources = cfg.sources()
    if all(s.weight == 1 for s in sources):
        return examples
    which = examples.data.with_format("numpy", columns=["source"])[:]["source"]
    order: list[int] = []
    rng = random.Random(seed)
    for i, src in enumerate(sources):
        own = (which == i).nonzero()[0].tolist()
        whole, part = divmod(src.weight, 1)
        order += own * int(whole) + sorted(rng.sample(own, round(part * len(own))))
    if not order:
        raise DataError("data.train: the sources' weights leave no training example")
    return examples.select(order)


@dataclass
class HeldOut:
    """The evaluation split taken from the training data (data.eval_fraction); written into the run report."""

    file: str
    fraction: float
    seed: int
    examples: int

    def summary(self) -> str:
        return (
            f"{self.examples} examples held out of {self.file} (data.eval_fraction={self.fraction}, seed {self.seed})"
        )


def hold_out(examples, fraction: float, seed: int, file: str) -> tuple:
    """Split a seeded `fraction` of the examples (`Examples` or a list) off for evaluation: (train, held out,
    report).

    At least one example is held out and at least one kept; the split depends on the seed and the
    examples' order only, so a resumed run holds out the same ones.
    """
    if len(examples) < 2:
        raise DataError(f"{file}: data.eval_fraction needs at least 2 examples to split, it has {len(examples)}")
    count = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(random.Random(seed).sample(range(len(examples)), count))
    train_idx = [i for i in range(len(examples)) if i not in held]
    held_idx = sorted(held)
    if isinstance(examples, Examples):
        train, evaluation = examples.select(train_idx), examples.select(held_idx)
    else:
        train, evaluation = [examples[i] for i in train_idx], [examples[i] for i in held_idx]
    return train, evaluation, HeldOut(file, fraction, seed, len(evaluation))
