"""Several data.train sources in one run (each with its format, columns, weight and cap), and data loading that
streams: a large file is tokenized into Arrow files on disk, in several processes, without being held in memory."""

import csv
import json
import tracemalloc
from pathlib import Path

import pytest

from qtune.config import ConfigError, DataConfig, SourceConfig, load_config
from qtune.data import DataError, hold_out, load_examples, load_train, weighted
from tests.conftest import write_jsonl


def sharegpt_file(path, n):
    rows = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(n)
    ]
    return str(write_jsonl(path, rows))


def qa_csv(path, n):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows([f"what is {i}?", f"it is {i}"] for i in range(n))
    return str(path)


def test_a_list_of_sources_each_with_its_format_columns_cap_and_weight(smollm2_tokenizer, tmp_path):
    chats, qa = sharegpt_file(tmp_path / "chats.jsonl", 10), qa_csv(tmp_path / "qa.csv", 30)
    cfg = load_config(
        None,
        [
            f"data.train=[{chats}, {{path: {qa}, format: alpaca, columns: {{instruction: question, response: answer}}, "
            "weight: 2.5, cap: 8}]"
        ],
    ).data
    examples, report = load_train(cfg, smollm2_tokenizer, seed=42)
    assert [s["format"] for s in report.sources] == ["sharegpt", "alpaca"]
    assert [s["examples"] for s in report.sources] == [10, 8] and report.examples == len(examples) == 18
    assert report.records == 40 and report.file == f"{chats} + {qa}" and report.format == "sharegpt+alpaca"
    texts = [smollm2_tokenizer.decode(e.input_ids) for e in examples]
    assert sum("what is" in t for t in texts) == 8  # the cap: a seeded sample of 8 of the 30 rows
    assert {e.source for e in examples} == {0, 1}

    trained = weighted(examples, cfg, seed=42)
    per_source = [sum(e.source == i for e in trained) for i in (0, 1)]
    assert per_source == [10, 20]  # weight 2.5 on 8 examples: each twice, and a seeded half of them once more
    assert weighted(examples, cfg, seed=42).data["row"] == trained.data["row"]  # seeded
    assert len(trained.dataset()) == 30 and trained.dataset().column_names == ["input_ids", "labels", "row"]

    # The fingerprint a resumed run is checked against changes with a source's weight, cap, format or columns.
    other = load_config(
        None,
        [
            f"data.train=[{chats}, {{path: {qa}, format: alpaca, weight: 1, cap: 8, "
            "columns: {instruction: question, response: answer}}]"
        ],
    ).data
    assert load_train(other, smollm2_tokenizer, seed=42)[1].fingerprint != report.fingerprint


def test_held_out_rows_are_taken_before_weights_so_no_copy_is_trained_on(smollm2_tokenizer, tmp_path):
    cfg = DataConfig(train=[SourceConfig(sharegpt_file(tmp_path / "c.jsonl", 20), weight=3.0)], eval_fraction=0.25)
    examples, _ = load_train(cfg, smollm2_tokenizer, seed=1)
    train, held, info = hold_out(examples, cfg.eval_fraction, 1, "c.jsonl")
    trained = weighted(train, cfg, seed=1)
    assert info.examples == 5 and len(trained) == 45
    assert not {e.row for e in held} & {e.row for e in trained}


def test_a_bad_source_in_the_list_is_named_by_its_index_file_row_and_field(smollm2_tokenizer, tmp_path):
    good = sharegpt_file(tmp_path / "good.jsonl", 3)
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}]
    )
    cfg = DataConfig(train=[SourceConfig(good), SourceConfig(str(bad))])
    with pytest.raises(
        DataError,
        match=r"(?s)^data.train\[1\] .*bad.jsonl: 1 bad record.*row 1: field `conversations\[1\]"
        r"\.from` must be one of",
    ):
        load_train(cfg, smollm2_tokenizer, seed=0)
    qa = qa_csv(tmp_path / "qa.csv", 2)
    with pytest.raises(DataError, match=r"data.train\[1\] .*qa.csv: row 1: no column data.columns.prompt=query"):
        load_train(
            DataConfig(train=[SourceConfig(good), SourceConfig(qa, columns={"prompt": "query"})]),
            smollm2_tokenizer,
            seed=0,
        )


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train=[{path: a.csv, wieght: 2}]", r"data.train\[0\].wieght`; did you mean `data.train\[0\].weight"),
        ("data.train=[a.jsonl, {path: b.csv, weight: 0}]", r"data.train\[1\]`: b.csv: weight must be a positive"),
        ("data.train=[{path: b.csv, weight: .nan}]", r"data.train\[0\].weight` must be a finite number"),
        ("data.train=[{format: alpaca}]", r"data.train\[0\]`: a data.train source has no path"),
        ("data.train=[{path: b.csv, format: tsv}]", r"data.train\[0\].format` must be one of auto, chat"),
        ("data.train=[{path: b.csv, cap: 0}]", r"b.csv: cap must be a positive number"),
        ("data.train=[]", r"data.train is an empty list"),
        ("data.num_proc=-1", r"data.num_proc must be >= 0"),
    ],
)
def test_source_list_config_errors_name_the_entry(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def text_file(path, n, words=40):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 97}" for j in range(words))}) + "\n")
    return path


def peak_python_memory(path, tokenizer):
    tracemalloc.start()
    examples, report = load_examples(path, tokenizer, DataConfig(max_length=4096, num_proc=1))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, examples, report


def test_a_large_file_streams_to_disk_and_memory_does_not_grow_with_it(chatml_tokenizer, tmp_path):
    peak_python_memory(text_file(tmp_path / "warm.jsonl", 50), chatml_tokenizer)  # first-use imports and caches
    small, _, _ = peak_python_memory(text_file(tmp_path / "small.jsonl", 3_000, words=8), chatml_tokenizer)
    path = text_file(tmp_path / "big.jsonl", 12_000, words=8)
    peak, examples, report = peak_python_memory(path, chatml_tokenizer)
    # Each extra record may cost its 16-byte duplicate digest in a set (~40 bytes), not the record (~45
    # characters as a dict, ~1.5 kB) or its token lists: a 1 GB file is not held in memory.
    per_record = (peak - small) / 9_000
    assert per_record < 150, f"peak Python memory grew {per_record:.0f} bytes per record ({small} -> {peak})"
    assert report.records == len(examples) == 12_000
    assert all(f["filename"].startswith(str(examples.folder)) for f in examples.data.cache_files)  # on disk
    last = json.loads(path.read_text().splitlines()[-1])["text"]
    eos = chatml_tokenizer.eos_token_id
    assert examples[-1].input_ids == chatml_tokenizer(last, add_special_tokens=False)["input_ids"] + [eos]


def test_several_processes_tokenize_exactly_as_one(smollm2_tokenizer, tmp_path):
    path = sharegpt_file(tmp_path / "c.jsonl", 300)
    one, r1 = load_examples(path, smollm2_tokenizer, DataConfig(num_proc=1))
    two, r2 = load_examples(path, smollm2_tokenizer, DataConfig(num_proc=2))
    assert one.data.to_list() == two.data.to_list()
    assert (r1.tokens, r1.trained_tokens) == (r2.tokens, r2.trained_tokens)


def test_csv_cells_stay_the_text_they_are(smollm2_tokenizer, tmp_path):
    """datasets' CSV reader (pandas) turns `02139` into 2139.0 and `NA` into a missing value; qtune's does not."""
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nzip code of MIT?,02139\nsay NA,NA\n")
    examples, _ = load_examples(
        path, smollm2_tokenizer, DataConfig(columns={"prompt": "question", "response": "answer"})
    )
    assert [e.answer for e in examples] == ["02139", "NA"]


def test_token_files_live_while_the_process_does_and_a_killed_runs_are_cleaned(tmp_path):
    import subprocess
    import sys

    from qtune.data.store import scratch

    killed = "import os; from qtune.data.store import scratch; print(scratch('x.jsonl')); os._exit(9)"  # no exit hooks
    left = Path(subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True).stdout.strip())
    assert (left / ".lock").is_file()
    live = (
        "import sys, time; from qtune.data.store import scratch; print(scratch('y.jsonl'), flush=True); time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", live], stdout=subprocess.PIPE, text=True)
    try:
        alive = Path(other.stdout.readline().strip())
        mine = scratch("z.jsonl")
        assert not left.exists() and alive.is_dir() and mine.is_dir()  # another live run's folder is kept
    finally:
        other.kill()


def test_a_bad_record_after_the_first_batch_is_listed_not_a_crash(chatml_tokenizer, tmp_path):
    rows = [{"text": "short one"} for _ in range(600)]
    rows[549] = {"text": "far too long " * 40}
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(
        DataError, match=r"t.jsonl: 1 bad record\(s\):\n  row 550: \d+ tokens is over data.max_length=64"
    ):
        load_examples(path, chatml_tokenizer, DataConfig(max_length=64, overlong="reject"))


def test_what_a_resumed_run_is_compared_against(smollm2_tokenizer, tmp_path):
    from qtune.data import fingerprint_data

    qa = qa_csv(tmp_path / "qa.csv", 3)
    as_string = load_train(
        DataConfig(train=qa, columns={"prompt": "question", "response": "answer"}), smollm2_tokenizer, 0
    )
    assert as_string[1].fingerprint == fingerprint_data(qa)  # one file: its bytes, as before lists existed
    prints = {
        load_train(DataConfig(train=[SourceConfig(qa, columns=c)]), smollm2_tokenizer, 0)[1].fingerprint
        for c in ({"prompt": "question", "response": "answer"}, {"prompt": "answer", "response": "question"})
    }
    assert len(prints) == 2  # a listed source's columns (and format, weight, cap) are part of it


def test_more_sources_and_shapes(smollm2_tokenizer, tmp_path):
    from qtune import classify
    from qtune.hub import public_meta

    cr = tmp_path / "mac.csv"  # classic Mac line endings
    cr.write_bytes(b"prompt,completion\rTwo plus two?, four\rThree?, three\r")
    examples, report = load_examples(cr, smollm2_tokenizer, DataConfig())
    assert report.format == "prompt_completion" and [e.answer for e in examples] == [" four", " three"]
    garbage = tmp_path / "x.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(DataError, match=r"x.parquet: not a readable Parquet file"):
        load_examples(garbage, smollm2_tokenizer, DataConfig())
    with pytest.raises(ConfigError, match="a list of sources is for SFT"):
        classify.load_labelled([SourceConfig("a.csv")], smollm2_tokenizer, DataConfig())
    meta = {
        "config": {"data": {"train": [{"path": "/home/me/a.jsonl"}, {"path": "owner/ds:train"}]}},
        "data": {"train": {"file": "/home/me/a.jsonl + owner/ds:train", "sources": [{"file": "/home/me/a.jsonl"}]}},
    }
    public = public_meta(meta)
    assert public["config"]["data"]["train"] == [{"path": "a.jsonl"}, {"path": "owner/ds:train"}]
    assert public["data"]["train"]["file"] == "a.jsonl + owner/ds:train" and public["data"]["train"]["sources"][0] == {
        "file": "a.jsonl"
    }


def test_a_run_over_two_sources_trains_and_reports_each(tiny_model_dir, tmp_path):
    from qtune.lora import read_meta
    from recipes import sft

    chats, qa = sharegpt_file(tmp_path / "chats.jsonl", 12), qa_csv(tmp_path / "qa.csv", 20)
    train = f"[{chats}, {{path: {qa}, format: alpaca, columns: {{instruction: question, response: answer}}, "
    train += "weight: 2, cap: 10}]"
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=fp32", "quant.method=none", "train.max_steps=2"]
    overrides += [f"data.train={train}", "data.eval_fraction=0.2", "train.save_every=0", f"output.dir={tmp_path}"]
    meta = read_meta(sft.main(load_config(None, [*overrides, "output.name=two"])))
    report = meta["data"]["train"]
    assert [(s["format"], s["examples"], s["weight"], s["cap"]) for s in report["sources"]] == [
        ("sharegpt", 12, 1.0, None),
        ("alpaca", 10, 2.0, 10),
    ]
    assert meta["data"]["eval"]["examples"] == round(22 * 0.2) and meta["metrics"]["answered"] == 4
    assert meta["config"]["data"]["train"][1]["columns"] == {"instruction": "question", "response": "answer"}
