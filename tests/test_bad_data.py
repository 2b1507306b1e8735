"""Hostile input: a corpus of bad data files, and a fuzzer. Nothing but clear errors naming file, row and field;
what is truncated, dropped or duplicated is counted in the run report."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtune import classify
from qtune.config import load_config
from qtune.data import DataConfig, DataError, load_examples
from qtune.lora import read_meta
from recipes import sft
from tests.conftest import BOS_TEMPLATE, CHATML, make_tokenizer

CHAT = {"messages": [{"role": "user", "content": "is it good?"}, {"role": "assistant", "content": "yes"}]}

# (file name, bytes, what the error must say). Each is one kind of bad data a user hands in.
CORPUS = [
    ("malformed.jsonl", b'{"text": "ok"}\n{"text": "unclosed\n{"text": "ok"}\n', "row 2: not valid JSON"),
    ("trailing_comma.jsonl", b'{"text": "ok",}\n', "row 1: not valid JSON"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "na\xefve"}\n', "row 2: not UTF-8 text (byte 0xef at column 13)"),
    ("latin1.csv", b"text\nok\nna\xefve\n", "line 3: not UTF-8 text (byte 0xef)"),
    ("latin1.json", b'[{"text": "na\xefve"}]', "file: not UTF-8 text"),
    ("empty.jsonl", b"", "holds no records"),
    ("blank_lines.jsonl", b"\n  \n\n", "holds no records"),
    ("empty.csv", b"", "holds no records"),
    ("header_only.csv", b"prompt,completion\n", "holds no records"),
    ("empty_list.json", b"[]", "holds no records"),
    ("not_a_list.json", b'{"text": "one"}', "must hold a list of records"),
    (
        "missing_field.jsonl",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
        "row 2: field `completion` is missing",
    ),
    (
        "empty_field.jsonl",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n',
        "row 2: field `completion` is empty",
    ),
    ("null_field.jsonl", b'{"text": "ok"}\n{"text": null}\n', "row 2: field `text` is missing"),
    ("number.jsonl", b'{"text": "ok"}\n{"text": 3.5}\n', "row 2: field `text` must be text, got float"),
    ("list_text.jsonl", b'{"text": "ok"}\n{"text": ["a"]}\n', "row 2: field `text` must be text, got list"),
    ("bare_string.jsonl", b'{"text": "ok"}\n"just text"\n', "row 2: a record must be an object"),
    ("message_not_object.jsonl", b'{"messages": ["hi"]}\n', "row 1: field `messages[0]`"),
    (
        "no_content.jsonl",
        b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n',
        "row 1: field `messages[0].content` is missing",
    ),
    ("extra_csv_field.csv", b"prompt,completion\na,b\na,b,c\n", "row 2: 1 more field(s) than the header"),
    ("unknown_fields.jsonl", b'{"question": "a", "answer": "b"}\n', "cannot tell the format from fields"),
    ("wrong_suffix.txt", b"hello\n", "unsupported file type '.txt'"),
    ("surrogate_key.jsonl", b'{"text": "ok", "\\ud800": 1}\n', "row 1: field `'\\ud800'` holds a lone surrogate"),
    ("surrogate.json", b'[{"text": "ok"}, {"text": "a\\udfff"}]', "row 2: field `text` holds a lone surrogate"),
    ("huge_number.jsonl", b'{"text": "ok", "n": ' + b"9" * 5000 + b"}\n", "row 1: not readable JSON (Exceeds"),
    ("deep.jsonl", b'{"text": "ok", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "row 1: not readable JSON"),
]


@pytest.mark.parametrize("name, content, message", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_data_corpus_names_file_row_and_field(chatml_tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_examples(path, chatml_tokenizer, DataConfig())
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_a_file_with_many_problems_lists_every_one(chatml_tokenizer, tmp_path):
    path = tmp_path / "many.jsonl"
    lines = [json.dumps(CHAT), "{broken", json.dumps({"messages": []}), json.dumps(CHAT), '{"messages": 7}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:  # the JSON error first: a file that does not parse is not validated
        load_examples(path, chatml_tokenizer, DataConfig())
    assert "row 2: not valid JSON" in str(err.value)
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(path, chatml_tokenizer, DataConfig())
    assert "2 bad record(s)" in str(err.value)
    assert "row 2: field `messages`" in str(err.value) and "row 4: field `messages`" in str(err.value)


def test_a_one_megabyte_record_is_truncated_and_counted_or_rejected(chatml_tokenizer, tmp_path):
    big = ("the movie was great and the acting was wonderful " * 21000)[: 1 << 20]
    path = tmp_path / "big.jsonl"
    rows = [
        {"prompt": big, "completion": "four"},
        {"prompt": "hello", "completion": big},
        {"prompt": "a", "completion": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_examples(path, chatml_tokenizer, DataConfig(max_length=64))
    # Row 1 lost its completion to truncation (dropped, counted); row 2 was cut to max_length (counted).
    assert report.truncated == 2 and report.dropped_no_target == [1] and [e.row for e in examples] == [2, 3]
    assert all(len(e.input_ids) <= 64 for e in examples)
    with pytest.raises(DataError, match=r"row 1: more than 512 tokens is over data.max_length=64"):
        load_examples(path, chatml_tokenizer, DataConfig(max_length=64, overlong="reject"))


def test_a_20_megabyte_record_is_tokenized_only_as_far_as_max_length_needs(chatml_tokenizer, tmp_path, monkeypatch):
    """A 50 MB line took ~7 GB of tokenizer memory, only to be cut to data.max_length: its start is enough."""
    from transformers import PreTrainedTokenizerFast

    big = ("the movie was great and the acting was wonderful " * 420_000)[: 20 << 20]
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "completion": big}) + "\n" + '{"prompt": "a", "completion": "b"}\n')
    longest, call = [0], PreTrainedTokenizerFast.__call__

    def measured(self, text, *args, **kwargs):
        longest[0] = max([longest[0], *map(len, [text] if isinstance(text, str) else text)])
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", measured)
    examples, report = load_examples(path, chatml_tokenizer, DataConfig(max_length=64))
    assert longest[0] < 100_000 and report.truncated == 1 and len(examples[0].input_ids) == 64
    with pytest.raises(DataError, match=r"row 1: more than 512 tokens is over data.max_length=64"):
        load_examples(path, chatml_tokenizer, DataConfig(max_length=64, overlong="reject"))


@pytest.mark.parametrize("template", [CHATML, BOS_TEMPLATE])
def test_a_long_record_tokenized_from_its_start_keeps_the_ids_truncation_keeps(template):
    from qtune.data import encode

    tokenizer = make_tokenizer(template, add_bos=template == BOS_TEMPLATE)
    long = "the movie was great and the acting was wonderful " * 2000
    for record in (
        {"prompt": "hello", "completion": long},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]},
        {"text": "hello" * 5000},  # no spaces: one long word
    ):
        whole, cut = encode(tokenizer, record), encode(tokenizer, record, max_tokens=100)
        assert len(cut.input_ids) > 100 and cut.input_ids[:100] == whole.input_ids[:100]
        assert cut.labels[:100] == whole.labels[:100]


def test_a_huge_bad_value_is_cut_short_in_the_error(chatml_tokenizer, tmp_path):
    huge = "x" * (20 << 20)
    for record, where in (
        ({"messages": [{"role": huge, "content": "hi"}, {"role": "assistant", "content": "ok"}]}, "messages[0].role"),
        ({huge: "no known field"}, "cannot tell the format from fields ['xxx"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError) as err:
            load_examples(path, chatml_tokenizer, DataConfig())
        assert where in str(err.value) and len(str(err.value)) < 1000


def test_data_whose_every_answer_is_truncated_away_says_why_in_its_own_message(chatml_tokenizer, tmp_path):
    """Every answer cut off by data.max_length (e.g. `qtune eval` data with long prompts): the one error says it all."""
    path = tmp_path / "long_prompts.jsonl"
    path.write_text((json.dumps({"prompt": "the movie was great " * 40, "completion": "yes"}) + "\n") * 3)
    with pytest.raises(DataError) as err:
        load_examples(path, chatml_tokenizer, DataConfig(max_length=16))
    message = str(err.value)
    assert "see above" not in message
    assert f"{path}: no usable examples: all 3 records lose their whole answer" in message
    assert "data.max_length=16 (rows 1, 2, 3)" in message and "shorten" in message


def test_the_run_report_counts_truncated_dropped_and_duplicate_rows(tmp_path, tiny_model_dir):
    long = "the movie was great and the acting was wonderful " * 40
    short = {"prompt": "is it good?", "completion": "yes"}
    rows = [short, short, {"prompt": long, "completion": "no"}, {"prompt": "hi", "completion": long}, short]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = sft.main(
        load_config(
            None,
            [
                f"model.name={tiny_model_dir}",
                "model.dtype=fp32",
                "quant.method=none",
                f"data.train={path}",
                "data.max_length=48",
                "train.max_steps=1",
                "train.batch_size=2",
                f"output.dir={tmp_path / 'adapters'}",
                "output.name=run",
            ],
        )
    )
    meta = read_meta(out)
    assert meta["hardware"]["processes"] == 1 and "cores" in meta["hardware"]["device"]  # where it trained
    report = meta["data"]["train"]
    assert report["records"] == 5 and report["examples"] == 4
    assert report["truncated"] == 2 and report["dropped_no_target"] == [3] and report["duplicates"] == 2


def test_classification_data_errors_name_file_row_and_field(chatml_tokenizer, tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_bytes(b'{"text": "good", "label": "pos"}\n{"text": "", "label": "neg"}\n{"text": "ok"}\n')
    with pytest.raises(DataError) as err:
        classify.load_labelled(path, chatml_tokenizer, DataConfig())
    assert str(path) in str(err.value)
    assert "row 2: field `text` is empty" in str(err.value) and "row 3: field `label` is missing" in str(err.value)


# ---- fuzzing: whatever the bytes, the loader returns examples or raises DataError, nothing else ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["messages", "role", "content", "text", "prompt", "completion", "instruction", "output", "input", "label", "x"]
)
records = st.dictionaries(field_names, json_values | st.lists(st.dictionaries(field_names, json_values)), max_size=4)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_data_errors(path, tokenizer, cfg=None):
    try:
        examples, report = load_examples(path, tokenizer, cfg or DataConfig(max_length=32))
    except DataError as e:
        assert str(path) in str(e)
        return
    assert report.examples == len(examples) and all(len(e.input_ids) <= 32 for e in examples)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_fuzz_raw_bytes(chatml_tokenizer, tmp_path, raw, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(raw)
    _only_data_errors(path, chatml_tokenizer)


@FUZZ
@given(st.lists(records, min_size=1, max_size=5))
def test_fuzz_json_records(chatml_tokenizer, tmp_path, rows):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _only_data_errors(path, chatml_tokenizer)


@FUZZ
@given(st.lists(records, min_size=1, max_size=5))
def test_fuzz_labelled_records(chatml_tokenizer, tmp_path, rows):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        examples, _, id2label = classify.load_labelled(path, chatml_tokenizer, DataConfig(max_length=32))
    except DataError as e:
        assert str(path) in str(e)
        return
    assert examples and all(e.label in id2label for e in examples)


def test_a_lone_surrogate_is_named_by_row_and_field(chatml_tokenizer, tmp_path):
    """`"\\ud800"` is valid JSON but not Unicode: no tokenizer takes it, so it is a bad record, not a traceback."""
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
        '{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "ok"}]}\n'
    )
    with pytest.raises(DataError, match=r"row 2: field `messages\[0\].content` holds a lone surrogate"):
        load_examples(path, chatml_tokenizer, DataConfig())


def test_labelled_eval_data_with_a_lone_surrogate_is_named_by_row_and_field(chatml_tokenizer, tmp_path):
    """`qtune eval` of a classification adapter reads its data through classify.load_labelled."""
    path = tmp_path / "labelled.jsonl"
    path.write_text('{"text": "good", "label": "pos"}\n{"text": "b\\ud800d", "label": "neg"}\n')
    with pytest.raises(DataError, match=r"row 2: field `text` holds a lone surrogate"):
        classify.load_labelled(path, chatml_tokenizer, DataConfig())


@pytest.mark.parametrize("text, message", [("[1, 2]", "must hold a JSON object, got a list"), ("{", "not valid JSON")])
def test_an_adapter_folder_whose_qtune_json_is_not_an_object_is_one_clear_error(tmp_path, text, message):
    from qtune.errors import AdapterError
    from qtune.meta import read_meta

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "qtune.json").write_text(text)
    with pytest.raises(AdapterError, match=rf"qtune.json: {message}"):
        read_meta(tmp_path)
