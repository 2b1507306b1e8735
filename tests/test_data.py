import json

import pytest

from qtune.config import DataConfig
from qtune.data import IGNORE, DataError, encode, load_examples
from tests.conftest import BOS_TEMPLATE, CHATML, NO_EOS_TEMPLATE, make_tokenizer, write_jsonl

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "fine thank you"},
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "four"},
    ]
}


def trained_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_chat_trains_only_assistant_replies_each_with_eos(chatml_tokenizer):
    tok = chatml_tokenizer
    ex = encode(tok, CHAT)
    assert trained_text(tok, ex) == "fine thank you<|im_end|>four<|im_end|>"
    assert [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE].count(tok.eos_token_id) == 2
    # Labels equal input ids wherever they are not masked, and the sequence is the rendered template.
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.input_ids, ex.labels))
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    # The eval prompt is everything before the last reply and ends with the generation prompt.
    assert tok.decode(ex.prompt_ids).endswith("two plus two<|im_end|>\n<|im_start|>assistant\n")
    assert ex.answer == "four"


def test_loss_on_all_trains_every_token(chatml_tokenizer):
    ex = encode(chatml_tokenizer, CHAT, loss_on="all")
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize(
    "record, trained, prompt_end",
    [
        (
            {
                "alpaca": ("add", "1 2"),
                "messages": [{"role": "user", "content": "add\n\n1 2"}, {"role": "assistant", "content": "three"}],
            },
            "three<|im_end|>",
            "<|im_start|>assistant\n",
        ),
        ({"prompt": "what is two plus two", "completion": " four"}, " four<|im_end|>", "two plus two"),
        ({"text": "hello world"}, "hello world<|im_end|>", None),
    ],
    ids=["alpaca", "prompt_completion", "text"],
)
def test_every_format_masks_its_prompt(chatml_tokenizer, record, trained, prompt_end):
    ex = encode(chatml_tokenizer, record)
    assert trained_text(chatml_tokenizer, ex) == trained
    assert [lab for lab in ex.labels if lab != IGNORE][-1] == chatml_tokenizer.eos_token_id
    if prompt_end is None:
        assert ex.prompt_ids is None
    else:
        assert chatml_tokenizer.decode(ex.prompt_ids).endswith(prompt_end)
        assert all(lab == IGNORE for lab in ex.labels[: len(ex.prompt_ids)])


def test_prompt_completion_messages_train_only_the_completion(chatml_tokenizer, tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "fine"},
                {"role": "user", "content": "and you"},
            ],
            "completion": [{"role": "assistant", "content": "thank you"}],
        }
    ]
    examples, report = load_examples(write_jsonl(tmp_path / "pc.jsonl", rows), chatml_tokenizer, DataConfig())
    assert report.format == "prompt_completion"
    assert trained_text(chatml_tokenizer, examples[0]) == "thank you<|im_end|>"


def test_exactly_one_bos_when_template_and_tokenizer_both_add_it():
    tok = make_tokenizer(BOS_TEMPLATE, add_bos=True)
    assert tok("hello")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS to plain text
    ex = encode(tok, {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]})
    assert ex.input_ids.count(tok.bos_token_id) == 1 and ex.input_ids[0] == tok.bos_token_id
    assert trained_text(tok, ex) == " fine</s>"
    # Plain text: BOS added once; a text that already starts with BOS does not get a second one.
    assert encode(tok, {"text": "hello"}).input_ids.count(tok.bos_token_id) == 1
    assert encode(tok, {"text": "<s>hello"}).input_ids.count(tok.bos_token_id) == 1


def test_no_bos_added_for_tokenizers_that_do_not_use_one(chatml_tokenizer):
    ex = encode(chatml_tokenizer, {"text": "hello"})
    assert chatml_tokenizer.bos_token_id not in ex.input_ids


def test_eos_inserted_when_template_leaves_it_out():
    tok = make_tokenizer(NO_EOS_TEMPLATE)
    ex = encode(tok, CHAT)
    trained = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert trained.count(tok.eos_token_id) == 2
    assert tok.decode(trained) == "fine thank you\n<|im_end|>four\n<|im_end|>"


def test_formats_are_detected_and_files_read(chatml_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("instruction,input,output\nadd,1 2,three\nsay hello,,hello\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "two plus two", "completion": "four"}]), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "hello world"}]))
    write_jsonl(tmp_path / "d.jsonl", [CHAT])
    formats = {}
    for name in ("a.csv", "b.parquet", "c.json", "d.jsonl"):
        examples, report = load_examples(tmp_path / name, chatml_tokenizer, DataConfig())
        formats[name] = (report.format, report.examples)
    assert formats == {
        "a.csv": ("alpaca", 2),
        "b.parquet": ("prompt_completion", 1),
        "c.json": ("text", 1),
        "d.jsonl": ("chat", 1),
    }


def test_csv_row_with_more_fields_than_the_header(chatml_tokenizer, tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\nhello, world\n")
    with pytest.raises(DataError, match=r"a.csv: 1 bad record\(s\):\n  row 2: 1 more field\(s\) than the header"):
        load_examples(tmp_path / "a.csv", chatml_tokenizer, DataConfig())


def test_chat_without_a_chat_template_is_a_clear_error(tmp_path):
    tok = make_tokenizer(CHATML)
    tok.chat_template = None
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match="row 1: chat messages need a base whose tokenizer has a chat template"):
        load_examples(write_jsonl(tmp_path / "pc.jsonl", rows), tok, DataConfig())


def test_saved_datasets_folder(chatml_tokenizer, tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}]).save_to_disk(str(tmp_path / "ds"))
    examples, report = load_examples(tmp_path / "ds", chatml_tokenizer, DataConfig())
    assert report.examples == 2


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "broken\n', "row 2: not valid JSON"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "row 2: not UTF-8 text (byte 0xe9"),
        (b"", "holds no records"),
        (b'{"text": "ok"}\n{"text": ""}\n', "row 2: field `text` is empty"),
        (b'{"text": "ok"}\n{"text": 5}\n', "row 2: field `text` must be text, got int"),
        (b'{"text": "ok"}\n{"txt": "x"}\n', "row 2: field `text` is missing"),
        (b'{"text": "ok"}\n[1, 2]\n', "row 2: a record must be an object"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "row 1: field `messages` has no assistant message"),
        (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', "row 1: field `messages[0].role` must be one of"),
        (b'{"messages": [{"role": "user", "content": 3}]}\n', "row 1: field `messages[0].content` must be text"),
        (b'{"messages": "hi"}\n', "row 1: field `messages` must be a non-empty list"),
        (b'{"instruction": "x", "output": ""}\n', "row 1: field `output` is empty"),
        (b'{"foo": 1}\n', "row 1: cannot tell the format from fields ['foo']"),
    ],
)
def test_bad_records_name_file_row_and_field(chatml_tokenizer, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_examples(path, chatml_tokenizer, DataConfig())
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_every_bad_record_is_listed(chatml_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": ""}, {"text": "ok"}, {"text": None}])
    with pytest.raises(DataError) as err:
        load_examples(path, chatml_tokenizer, DataConfig())
    assert "2 bad record(s)" in str(err.value) and "row 2" in str(err.value) and "row 4" in str(err.value)


def test_overlong_rows_are_truncated_and_counted_or_rejected(chatml_tokenizer, tmp_path):
    long = "the movie was great and the acting was wonderful " * 20
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"prompt": "hello", "completion": "four"},
            {"prompt": "hello", "completion": long},
            {"prompt": long, "completion": "four"},
        ],
    )
    examples, report = load_examples(path, chatml_tokenizer, DataConfig(max_length=32))
    assert report.truncated == 2 and all(len(e.input_ids) <= 32 for e in examples)
    # The prompt/completion row lost its completion to truncation: dropped, and the report says which row.
    assert report.dropped_no_target == [3] and report.examples == 2 and report.records == 3
    with pytest.raises(DataError, match=r"row 2: \d+ tokens is over data.max_length=32"):
        load_examples(path, chatml_tokenizer, DataConfig(max_length=32, overlong="reject"))


def test_duplicates_are_counted_not_dropped(chatml_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"text": "hello"}, {"text": "hello"}, {"text": "world"}])
    examples, report = load_examples(path, chatml_tokenizer, DataConfig())
    assert report.duplicates == 1 and report.examples == 3


def test_system_prompt_is_prepended(chatml_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT["messages"][1:3]}])
    examples, _ = load_examples(path, chatml_tokenizer, DataConfig(system_prompt="Answer briefly."))
    assert chatml_tokenizer.decode(examples[0].input_ids).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
