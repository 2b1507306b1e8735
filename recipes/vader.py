"""Prepare the demo data: VADER's human-rated movie-review snippets (and tweets) as SFT and labelled data.

Source: Hutto & Gilbert (2014), "VADER: A Parsimonious Rule-based Model for Sentiment Analysis
of Social Media Text", MIT licence, shipped in the source distribution of vadersentiment==3.3.2
(`additional_resources/hutto_ICWSM_2014.tar.gz`). Each line is: id <TAB> mean rating in [-4, 4]
<TAB> snippet, in latin-1. Ratings with |mean| < 0.5 are too mixed to call and are left out.

    python -m recipes.vader data/downloads/vaderSentiment-3.3.2.tar.gz data
writes data/vader_movies/ (chat, for recipes/sft.py; the same split as ShareGPT and Alpaca records in
data/vader_movies_sharegpt/ and data/vader_movies_alpaca/), data/vader_movies_cls/ and data/vader_tweets_cls/
({"text", "label"}, for recipes/classify.py), each as train.jsonl + test.jsonl.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from pathlib import Path

INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
QUESTION = "Review: {text}\nIs this movie review positive or negative?"


def read_snippets(sdist: Path, name: str = "movieReviewSnippets_GroundTruth.txt") -> list[tuple[str, float, str]]:
    """(id, mean rating, text) rows of one VADER ground-truth file, read straight from the sdist."""
    with tarfile.open(sdist) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
        if member is None:
            raise SystemExit(f"{sdist}: {INNER_ARCHIVE} not found; is this vadersentiment-3.3.2.tar.gz?")
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next(m for m in inner.getmembers() if m.name.endswith(name))
        text = inner.extractfile(member).read().decode("latin-1")
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise SystemExit(f"{sdist}:{name}: line {line_no}: expected 3 tab-separated fields, got {len(parts)}")
        rows.append((parts[0], float(parts[1]), parts[2].strip()))
    return rows


def to_chat(text: str, label: str) -> dict:
    return {
        "messages": [{"role": "user", "content": QUESTION.format(text=text)}, {"role": "assistant", "content": label}]
    }


def to_sharegpt(text: str, label: str) -> dict:
    """The same question and answer as `to_chat`, as a ShareGPT record (the shape FastChat and LLaMA-Factory use)."""
    return {"conversations": [{"from": "human", "value": QUESTION.format(text=text)}, {"from": "gpt", "value": label}]}


def to_alpaca(text: str, label: str) -> dict:
    return {"instruction": "Is this movie review positive or negative?", "input": text, "output": label}


def to_labelled(text: str, label: str) -> dict:
    return {"text": text, "label": label}


SOURCES = {"movies": "movieReviewSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt"}


def prepare(
    sdist: Path, out_dir: Path, test_size: int = 400, seed: int = 0, source: str = "movies", record=to_chat
) -> dict[str, int]:
    """Write train.jsonl and test.jsonl (a fixed, seeded split) of one source and return their sizes."""
    rows = [
        (t, "positive" if r > 0 else "negative") for _, r, t in read_snippets(sdist, SOURCES[source]) if abs(r) >= 0.5
    ]
    random.Random(seed).shuffle(rows)
    splits = {"test": rows[:test_size], "train": rows[test_size:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        tmp = out_dir / f".{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for text, label in items:
                f.write(json.dumps(record(text, label), ensure_ascii=False) + "\n")
        tmp.replace(out_dir / f"{split}.jsonl")
    return {k: len(v) for k, v in splits.items()}


def prepare_all(sdist: Path, root: Path) -> dict[str, dict[str, int]]:
    """Every demo data set under `root`."""
    return {
        "vader_movies": prepare(sdist, root / "vader_movies"),
        "vader_movies_sharegpt": prepare(sdist, root / "vader_movies_sharegpt", record=to_sharegpt),
        "vader_movies_alpaca": prepare(sdist, root / "vader_movies_alpaca", record=to_alpaca),
        "vader_movies_cls": prepare(sdist, root / "vader_movies_cls", record=to_labelled),
        "vader_tweets_cls": prepare(sdist, root / "vader_tweets_cls", source="tweets", record=to_labelled),
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    for name, sizes in prepare_all(Path(sys.argv[1]), Path(sys.argv[2])).items():
        print(f"wrote {sys.argv[2]}/{name}/train.jsonl ({sizes['train']} rows) and test.jsonl ({sizes['test']} rows)")
