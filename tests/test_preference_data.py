"""Preference data (DPO pairs, KTO judged completions, GRPO prompts): every record form tokenized as SFT tokenizes
it, token for token on the real SmolLM2 tokenizer; truncation; and every bad input named by file, row and field."""

import json

import pytest

from qtune.config import ConfigError, DataConfig, SourceConfig
from qtune.data import (
    DataError,
    hold_out,
    judged_dataset,
    load_judged,
    load_pairs,
    load_prompts,
    longest,
    pairs_dataset,
    prompts_dataset,
)
from tests.conftest import BOS_TEMPLATE, make_tokenizer, write_jsonl

HISTORY = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "two plus two"},
]
GOOD, BAD = "four", "five, I think"
SHAREGPT_HISTORY = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in HISTORY]


def reply(text):
    return [{"role": "assistant", "content": text}]


def load(loader, tmp_path, tok, rows, **data):
    return loader(write_jsonl(tmp_path / "prefs.jsonl", rows), tok, DataConfig(**data))


def error_of(loader, tmp_path, tok, rows, **data) -> str:
    with pytest.raises(DataError) as e:
        load(loader, tmp_path, tok, rows, **data)
    return str(e.value)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Every record form, token for token


CHAT_FORMS = {
    "pairs-chat": {"prompt": HISTORY, "chosen": reply(GOOD), "rejected": reply(BAD)},
    "pairs-chat (replies as text)": {"prompt": HISTORY, "chosen": GOOD, "rejected": BAD},
    "pairs-implicit": {"chosen": HISTORY + reply(GOOD), "rejected": HISTORY + reply(BAD)},
    "pairs-sharegpt": {
        "conversations": SHAREGPT_HISTORY,
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
}


@pytest.mark.parametrize("form, record", CHAT_FORMS.items(), ids=CHAT_FORMS.keys())
def test_chat_pairs_are_the_template_render_split_at_the_reply(smollm2_tokenizer, tmp_path, form, record):
    tok = smollm2_tokenizer
    (pair,), report = load(load_pairs, tmp_path, tok, [record])
    assert report.format == form.split(" ")[0]
    # The prompt is what generation sees; prompt + chosen is the whole conversation up to the reply's EOS, and no
    # untrained template text (ChatML's newline) after it.
    assert tok.decode(pair.prompt_ids) == tok.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
    for completion, text in ((pair.chosen_ids, GOOD), (pair.rejected_ids, BAD)):
        full = tok.apply_chat_template(HISTORY + reply(text), tokenize=False)
        assert tok.decode(pair.prompt_ids + completion) == full[: full.rindex(tok.eos_token) + len(tok.eos_token)]
        assert completion == ids(tok, text + tok.eos_token)
        assert completion.count(tok.eos_token_id) == 1 and completion[-1] == tok.eos_token_id
    assert pair.answer == GOOD and pair.row == 1
    assert report.records == report.examples == 1
    assert report.trained_tokens == len(pair.chosen_ids) + len(pair.rejected_ids)
    assert report.tokens == len(pair.prompt_ids) + report.trained_tokens


def test_text_pairs_are_prompt_then_reply_and_one_eos(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    record = {"prompt": "Two plus two is", "chosen": " four", "rejected": " five" + tok.eos_token}
    (pair,), report = load(load_pairs, tmp_path, tok, [record])
    assert report.format == "pairs"
    assert pair.prompt_ids == ids(tok, "Two plus two is")
    assert pair.chosen_ids == ids(tok, " four") + [tok.eos_token_id]
    assert pair.rejected_ids == ids(tok, " five") + [tok.eos_token_id]  # its own EOS text and encode's: one EOS
    assert pair.answer == " four"


def test_a_text_prompt_in_a_chat_pair_is_one_user_message_and_system_prompt_applies(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    rows = [{"prompt": "hello", "chosen": reply("fine"), "rejected": reply("bad")}]
    (pair,), _ = load(load_pairs, tmp_path, tok, rows, system_prompt="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert tok.decode(pair.prompt_ids) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_one_bos_at_the_start_and_one_eos_at_the_end_with_a_bos_writing_template(tmp_path):
    """Llama-2 style: the template writes BOS and the tokenizer adds one to text; a pair keeps exactly one."""
    tok = make_tokenizer(BOS_TEMPLATE, add_bos=True)
    for rows in (
        [{"prompt": [{"role": "user", "content": "hello"}], "chosen": "fine", "rejected": "bad"}],
        [{"prompt": "hello", "chosen": " fine", "rejected": " bad"}],
    ):
        (pair,), _ = load(load_pairs, tmp_path, tok, rows)
        assert pair.prompt_ids[0] == tok.bos_token_id and pair.prompt_ids.count(tok.bos_token_id) == 1
        for completion in (pair.chosen_ids, pair.rejected_ids):
            assert completion[-1] == tok.eos_token_id and completion.count(tok.eos_token_id) == 1


def test_unpaired_records_and_pairs_become_judged_completions(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    rows = [
        {"prompt": [{"role": "user", "content": "hello"}], "completion": reply("fine"), "label": True},
        {"prompt": "hello", "completion": "bad", "label": 0},
    ]
    judged, report = load(load_judged, tmp_path, tok, rows)
    assert report.format == "unpaired-chat"  # the first record's form: text in a later one is one message
    assert [(j.row, j.label) for j in judged] == [(1, True), (2, False)]
    assert judged[0].prompt_ids == judged[1].prompt_ids
    assert judged[0].completion_ids == ids(tok, "fine<|im_end|>")
    assert longest(judged[0]) == len(judged[0].prompt_ids) + len(judged[0].completion_ids)
    (text,), report = load(load_judged, tmp_path, tok, [{"prompt": "hello", "completion": " fine", "label": False}])
    assert report.format == "unpaired" and text.prompt_ids == ids(tok, "hello") and text.label is False

    pairs = [{"prompt": "hello", "chosen": f" {w}", "rejected": " bad"} for w in ("fine", "great")]
    judged, report = load(load_judged, tmp_path, tok, pairs)
    # Every chosen reply first, then every rejected one: trl's KTO pairs each completion with its neighbour's
    # prompt for the KL term, and a pair's two replies side by side would share one.
    assert [(j.row, j.label) for j in judged] == [(1, True), (2, True), (1, False), (2, False)]
    assert report.examples == 4 and report.records == 2
    assert report.tokens == sum(len(j.prompt_ids) + len(j.completion_ids) for j in judged)
    ds = judged_dataset(judged)
    assert ds.column_names == ["prompt_ids", "completion_ids", "label", "row"] and ds[2]["label"] is False


def test_columns_map_the_files_own_fields(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    plain, _ = load(load_pairs, tmp_path, tok, [{"prompt": "hello", "chosen": " fine", "rejected": " bad"}])
    mapped, _ = load(
        load_pairs,
        tmp_path,
        tok,
        [{"question": "hello", "good": " fine", "poor": " bad", "chosen": "unused"}],
        columns={"prompt": "question", "chosen": "good", "rejected": "poor"},
    )
    assert mapped == plain
    with pytest.raises(ConfigError, match="data.columns.answer: no such field; map one of prompt, chosen, rejected"):
        load(load_pairs, tmp_path, tok, [{"prompt": "a"}], columns={"answer": "x"})
    message = error_of(load_pairs, tmp_path, tok, [{"prompt": "a", "chosen": "b"}], columns={"rejected": "worse"})
    assert "row 1: no column data.columns.rejected=worse" in message


def test_a_long_completion_is_cut_and_counted_or_rejected(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    long = " ".join(["the movie was great"] * 20)
    rows = [
        {"prompt": "hello", "chosen": " fine", "rejected": long},
        {"prompt": "hi", "chosen": " a", "rejected": " b"},
    ]
    pairs, report = load(load_pairs, tmp_path, tok, rows, max_length=30)
    assert report.truncated == 1
    assert len(pairs[0].prompt_ids) + len(pairs[0].rejected_ids) == longest(pairs[0]) == 30
    assert pairs[0].rejected_ids == ids(tok, long)[:29]  # its end is cut (no EOS), its start kept
    message = error_of(load_pairs, tmp_path, tok, rows, max_length=30, overlong="reject")
    assert "1 bad record(s)" in message
    assert "row 1: fields `prompt` + `rejected` are" in message and "over data.max_length=30" in message


def test_a_prompt_that_fills_max_length_is_an_error_not_an_empty_completion(chatml_tokenizer, tmp_path):
    long = " ".join(["the movie was great"] * 20)
    rows = [{"prompt": long, "chosen": " fine", "rejected": " bad"}]
    message = error_of(load_pairs, tmp_path, chatml_tokenizer, rows, max_length=30)
    assert "row 1: field `prompt` alone is" in message and "nothing of `chosen` is left to train" in message


# ---------------------------------------------------------------------------------------------
# Bad input: every bad row listed at once, each with its field


def test_every_bad_pair_is_listed_with_its_row_and_field(chatml_tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "hello", "chosen": " fine", "rejected": " bad"},
        [1, 2],
        {"prompt": "hello", "rejected": " bad"},
        {"prompt": "hello", "chosen": " fine", "rejected": "  "},
        {"prompt": 7, "chosen": " fine", "rejected": " bad"},
        {"prompt": "hello", "chosen": " same", "rejected": " same"},
        {"prompt": "hello", "chosen": reply("fine"), "rejected": " bad"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    with pytest.raises(DataError) as e:
        load_pairs(path, chatml_tokenizer, DataConfig())
    message = str(e.value)
    assert message.startswith(f"{path}: 7 bad record(s):")
    for line in (
        "row 2: a record must be an object with named fields, got list",
        "row 3: field `chosen` is missing",
        "row 4: field `rejected` is empty",
        "row 5: field `prompt` must be text, got int",
        "row 6: fields `chosen` and `rejected` are the same reply",
        "row 7: field `chosen` is a list of messages in a file of text records",
        "row 8: not valid JSON",
    ):
        assert line in message


CHAT_ERRORS = {
    "chosen ends on a user turn": (
        {"prompt": HISTORY, "chosen": [{"role": "user", "content": "x"}], "rejected": "no"},
        "row 1: field `chosen` must end in an assistant message, got user",
    ),
    "a bad message": (
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
        "row 1: field `prompt[0].role` must be one of",
    ),
    "implicit pairs that diverge early": (
        {"chosen": HISTORY + reply("a"), "rejected": [HISTORY[0], *reply("other"), HISTORY[2], *reply("b")]},
        "row 1: fields `chosen` and `rejected` differ before their last assistant message",
    ),
    "implicit pair without a prompt": (
        {"chosen": reply("a"), "rejected": reply("b")},
        "row 1: field `chosen` has no message before its reply",
    ),
    "a ShareGPT reply from the human": (
        {"conversations": SHAREGPT_HISTORY, "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "x"}},
        "row 1: field `rejected.from` must be one of",
    ),
    "a label that is not a boolean": (
        {"prompt": "hello", "completion": "fine", "label": "good"},
        "row 1: field `label` must be true or false (or 1 or 0), got 'good'",
    ),
    "a label that is missing": ({"prompt": "hello", "completion": "fine"}, "row 1: field `label` is missing"),
    "an empty completion": ({"prompt": "hello", "completion": "", "label": 1}, "row 1: field `completion` is empty"),
}


@pytest.mark.parametrize("record, expected", CHAT_ERRORS.values(), ids=CHAT_ERRORS.keys())
def test_bad_records_of_every_form(chatml_tokenizer, tmp_path, record, expected):
    assert expected in error_of(load_judged, tmp_path, chatml_tokenizer, [record])


def test_file_level_errors(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    kto = [{"prompt": "hello", "completion": "fine", "label": True}]
    assert "unpaired records (prompt, completion, label) train with dpo.loss=kto" in error_of(
        load_pairs, tmp_path, tok, kto
    )
    assert "cannot tell preference data from fields ['text']" in error_of(load_pairs, tmp_path, tok, [{"text": "a"}])
    message = error_of(load_pairs, tmp_path, tok, [{"question": "a", "chosen": "b", "rejected": "c"}])
    assert "row 1: `chosen` and `rejected` without a `prompt` must be whole conversations" in message
    plain = make_tokenizer()
    plain.chat_template = None
    chat = [{"prompt": HISTORY, "chosen": "a", "rejected": "b"}]
    assert "row 1: pairs-chat records need a chat template" in error_of(load_pairs, tmp_path, plain, chat)
    with pytest.raises(ConfigError, match="data.format=chat is an SFT format"):
        load(load_pairs, tmp_path, tok, chat, format="chat")
    with pytest.raises(ConfigError, match="data.loss_on=all is for SFT"):
        load(load_pairs, tmp_path, tok, chat, loss_on="all")


def test_a_template_that_rewrites_history_is_named_by_row(chatml_tokenizer, tmp_path, monkeypatch):
    from qtune.data import preference

    split = preference.split_ids
    calls = iter(range(10))  # the second reply's prompt comes back different, as under such a template

    def rewriting(tokenizer, prompt, reply, max_tokens):
        prompt_ids, completion = split(tokenizer, prompt, reply, max_tokens)
        return (prompt_ids + [0] if next(calls) % 2 else prompt_ids), completion

    monkeypatch.setattr(preference, "split_ids", rewriting)
    message = error_of(load_pairs, tmp_path, chatml_tokenizer, [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    assert "row 1: field `rejected`: the prompt tokenizes differently before it than before `chosen`" in message


# ---------------------------------------------------------------------------------------------
# Sources, datasets, held-out splits


def test_a_list_of_sources_is_read_whole_and_reported_per_source(chatml_tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "chosen": " a", "rejected": " b"}] * 2)
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": "hello", "chosen": reply("x"), "rejected": reply("y")}])
    cfg = DataConfig(train=[SourceConfig(str(a)), SourceConfig(str(b), columns={"prompt": "q"})])
    pairs, report = load_pairs(cfg.train, chatml_tokenizer, cfg)
    assert [p.row for p in pairs] == [1, 2, 1]
    assert (report.records, report.examples, report.duplicates) == (3, 3, 1)
    assert report.format == "pairs+pairs-chat" and [s["format"] for s in report.sources] == ["pairs", "pairs-chat"]
    with pytest.raises(ConfigError, match=r"data.train\[1\] .*weight and cap apply to SFT data"):
        load_pairs([SourceConfig(str(a)), SourceConfig(str(b), cap=1)], chatml_tokenizer, cfg)
    bad = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hi", "chosen": " a"}])
    with pytest.raises(DataError, match=r"data.train\[1\] .*c.jsonl: 1 bad record"):
        load_pairs([SourceConfig(str(a)), SourceConfig(str(bad))], chatml_tokenizer, cfg)


def test_pairs_become_the_dataset_trls_preference_collator_takes(chatml_tokenizer, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [
        {"prompt": "hello", "chosen": " fine", "rejected": " bad"},
        {"prompt": "hi", "chosen": " a", "rejected": " b"},
    ]
    pairs, report = load(load_pairs, tmp_path, chatml_tokenizer, rows)
    ds = pairs_dataset(pairs)
    assert ds.column_names == ["prompt_ids", "chosen_ids", "rejected_ids", "row"]
    batch = DataCollatorForPreference(pad_token_id=chatml_tokenizer.pad_token_id)([ds[0], ds[1]])
    assert int(batch["completion_mask"].sum()) == report.trained_tokens
    train, held, split = hold_out(pairs, 0.5, seed=0, file="prefs.jsonl")  # a plain list splits as Examples do
    assert len(train) == len(held) == split.examples == 1 and {train[0].row, held[0].row} == {1, 2}


# ---------------------------------------------------------------------------------------------
# GRPO prompts


def test_grpo_prompts_from_chat_records_end_before_the_last_reply(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    rows = [{"messages": HISTORY + reply("four")}, {"messages": HISTORY}]
    prompts, report = load(load_prompts, tmp_path, tok, rows, system_prompt="Be brief.")
    assert report.format == "chat" and report.examples == 2
    system = [{"role": "system", "content": "Be brief."}]
    assert [(p.prompt, p.reference) for p in prompts] == [(system + HISTORY, "four"), (system + HISTORY, None)]
    rendered = tok.apply_chat_template(system + HISTORY, tokenize=False, add_generation_prompt=True)
    assert prompts[0].prompt_ids == ids(tok, rendered) and longest(prompts[0]) == len(prompts[0].prompt_ids)
    ds = prompts_dataset(prompts)
    assert ds.column_names == ["prompt", "reference", "row"] and ds[0]["reference"] == "four"


@pytest.mark.parametrize(
    "rows, fmt, prompt, reference",
    [
        ([{"prompt": "Two plus two is", "completion": " four"}], "prompt_completion", "Two plus two is", " four"),
        ([{"prompt": "Two plus two is"}], "prompt", "Two plus two is", None),
        (
            [{"instruction": "add", "input": "2 2", "output": "4"}],
            "alpaca",
            [{"role": "user", "content": "add\n\n2 2"}],
            "4",
        ),
        ([{"conversations": SHAREGPT_HISTORY}], "sharegpt", HISTORY, None),
        ([{"prompt": HISTORY, "completion": reply("four")}], "prompt_completion", HISTORY, "four"),
    ],
    ids=["prompt-completion", "prompt-alone", "alpaca", "sharegpt", "prompt-completion-messages"],
)
def test_grpo_prompts_from_every_sft_format(chatml_tokenizer, tmp_path, rows, fmt, prompt, reference):
    (item,), report = load(load_prompts, tmp_path, chatml_tokenizer, rows)
    assert (report.format, item.prompt, item.reference) == (fmt, prompt, reference)
    if isinstance(prompt, str):
        assert item.prompt_ids == ids(chatml_tokenizer, prompt)


def test_grpo_prompt_errors(chatml_tokenizer, tmp_path):
    tok = chatml_tokenizer
    long = " ".join(["the movie was great"] * 20)
    rows = [{"prompt": "hi"}, {"prompt": long}, {"prompt": reply("x")}, {"prompt": ""}]
    with pytest.raises(DataError) as e:
        load_prompts(write_jsonl(tmp_path / "p.jsonl", rows), tok, DataConfig(max_length=64), max_new_tokens=32)
    message = str(e.value)
    assert "3 bad record(s)" in message
    assert "row 2: field `prompt`: the prompt is" in message
    assert "over data.max_length - grpo.max_new_tokens = 32" in message
    assert "row 3: field `prompt` is a list of messages in a file of text records" in message
    assert "row 4: field `prompt` is empty" in message
    assert "text records hold no prompt" in error_of(load_prompts, tmp_path, tok, [{"text": "a"}])
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        load_prompts(tmp_path / "p.jsonl", tok, DataConfig(max_length=32), max_new_tokens=32)
