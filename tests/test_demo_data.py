"""The demo data sets built from the vadersentiment sdist (downloaded by `make install`)."""

import json
from pathlib import Path

import pytest

from recipes import vader

SDIST = Path(__file__).parent.parent / "data" / "downloads" / "vaderSentiment-3.3.2.tar.gz"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not SDIST.is_file():
        pytest.fail(f"{SDIST} is missing: `make install` downloads it")
    root = tmp_path_factory.mktemp("data")
    return root, vader.prepare_all(SDIST, root)


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_splits_are_fixed_disjoint_and_filtered(prepared, tmp_path):
    root, sizes = prepared
    rows = vader.read_snippets(SDIST)
    kept = [r for r in rows if abs(r[1]) >= 0.5]
    assert sizes["vader_movies"] == {"test": 400, "train": len(kept) - 400}
    assert sizes["vader_movies_cls"] == sizes["vader_movies"]
    train = {r["text"] for r in read(root / "vader_movies_cls" / "train.jsonl")}
    test = {r["text"] for r in read(root / "vader_movies_cls" / "test.jsonl")}
    # Only snippets the source itself repeats can land on both sides.
    texts = [t for _, _, t in kept]
    repeated = {t for t in texts if texts.count(t) > 1}
    assert train & test <= repeated
    # Same seed, same files.
    again = vader.prepare(SDIST, tmp_path / "again")
    assert again == sizes["vader_movies"]
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (root / "vader_movies" / "test.jsonl").read_bytes()


def test_records_have_the_shapes_the_recipes_read(prepared):
    root, sizes = prepared
    chat = read(root / "vader_movies" / "test.jsonl")[0]["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"] in ("positive", "negative")
    labelled = read(root / "vader_tweets_cls" / "train.jsonl")
    assert {r["label"] for r in labelled} == {"positive", "negative"} and all(r["text"].strip() for r in labelled)
    assert sum(sizes["vader_tweets_cls"].values()) == sum(
        abs(r[1]) >= 0.5 for r in vader.read_snippets(SDIST, vader.SOURCES["tweets"])
    )


def test_sharegpt_and_alpaca_copies_hold_the_same_reviews_in_the_same_split(prepared):
    root, sizes = prepared
    assert sizes["vader_movies_sharegpt"] == sizes["vader_movies_alpaca"] == sizes["vader_movies"]
    for split in ("train", "test"):
        chats = [r["messages"] for r in read(root / "vader_movies" / f"{split}.jsonl")]
        sharegpt = [r["conversations"] for r in read(root / "vader_movies_sharegpt" / f"{split}.jsonl")]
        alpaca = read(root / "vader_movies_alpaca" / f"{split}.jsonl")
        assert [[t["value"] for t in c] for c in sharegpt] == [[m["content"] for m in c] for c in chats]
        assert all(t["from"] for c in sharegpt for t in c) and {c[1]["from"] for c in sharegpt} == {"gpt"}
        assert [a["output"] for a in alpaca] == [c[1]["content"] for c in chats]
        assert all(a["input"] in c[0]["content"] for a, c in zip(alpaca, chats))
