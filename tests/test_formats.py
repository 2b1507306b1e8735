"""Every record format, token by token on the real SmolLM2 tokenizer: trained positions are exactly the
assistant's (or the completion's) tokens plus one EOS; ShareGPT roles, column mapping, held-out splits,
and the errors a user meets, each naming file, row and field."""

import pytest

from qtune.config import ConfigError, DataConfig, load_config
from qtune.data import IGNORE, DataError, encode, hold_out, load_examples
from qtune.data.formats import validate
from tests.conftest import write_jsonl

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "fine thank you"},
    {"role": "user", "content": "two plus 22"},
    {"role": "assistant", "content": "24, I think"},
]
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hello"},
        {"from": "gpt", "value": "fine thank you"},
        {"from": "human", "value": "two plus 22"},
        {"from": "gpt", "value": "24, I think"},
    ]
}


def trained_ids(ex):
    return [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]


def replies(tok, *texts):
    """The token ids that must be trained: each reply, then the end-of-turn token, tokenized as the model sees it."""
    return [i for t in texts for i in tok(t + tok.eos_token, add_special_tokens=False)["input_ids"]]


def load(tmp_path, tok, rows, **data):
    return load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, DataConfig(**data))


def test_chat_multi_turn_trains_exactly_the_replies(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    (ex,), report = load(tmp_path, tok, [{"messages": CHAT}])
    assert report.format == "chat"
    assert trained_ids(ex) == replies(tok, "fine thank you", "24, I think")
    assert ex.input_ids == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    # (SmolLM2 adds no BOS to plain text: the rendered template is the whole input, nothing put in front.)


def test_sharegpt_is_detected_and_equals_the_same_chat(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    (ex,), report = load(tmp_path, tok, [SHAREGPT])
    (chat,), _ = load(tmp_path, tok, [{"messages": CHAT}])
    assert report.format == "sharegpt"
    assert (ex.input_ids, ex.labels) == (chat.input_ids, chat.labels)


def test_sharegpt_variants_a_top_level_system_and_tool_turns(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    record = {
        "system": "Use the tools.",
        "messages": [  # ShareGPT turns under `messages`, as some exports write them
            {"from": "user", "value": "weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "Assistant", "value": "21 degrees."},
        ],
    }
    (ex,), report = load(tmp_path, tok, [record])
    assert report.format == "sharegpt"
    # The call and the answer are the assistant's (trained); the tool's result is not.
    assert trained_ids(ex) == replies(tok, '{"name": "weather", "arguments": {"city": "Paris"}}', "21 degrees.")
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nUse the tools.<|im_end|>")
    assert '<|im_start|>tool\n{"temp": 21}' in tok.decode(ex.input_ids)


@pytest.mark.parametrize(
    "record, trained, prompt_end",
    [
        ({"instruction": "add", "input": "1 2", "output": "three"}, "three", "<|im_start|>assistant\n"),
        ({"instruction": "say hi", "output": "hi"}, "hi", "<|im_start|>assistant\n"),
        ({"prompt": "Two plus two is", "completion": " four"}, " four", "Two plus two is"),
        (
            {
                "prompt": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
                "completion": [{"role": "assistant", "content": "bye now"}],
            },
            "bye now",
            "<|im_start|>assistant\n",
        ),
        ({"text": "just some text"}, "just some text", None),
    ],
    ids=["alpaca-input", "alpaca", "prompt-completion", "prompt-completion-messages", "text"],
)
def test_every_format_trains_exactly_its_answer_and_one_eos(smollm2_tokenizer, tmp_path, record, trained, prompt_end):
    tok = smollm2_tokenizer
    (ex,), _ = load(tmp_path, tok, [record])
    assert trained_ids(ex) == replies(tok, trained)
    assert trained_ids(ex).count(tok.eos_token_id) == 1
    if prompt_end:
        assert tok.decode(ex.prompt_ids).endswith(prompt_end)
        assert all(lab == IGNORE for lab in ex.labels[: len(ex.prompt_ids)])


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
@pytest.mark.parametrize("field", ["completion", "text"])
def test_a_text_that_ends_in_the_eos_text_ends_in_one_eos(smollm2_tokenizer, tmp_path, field, loss_on):
    """A completion (or text) written with the EOS text at its end is not given a second EOS."""
    tok = smollm2_tokenizer
    record = {"prompt": "Two plus two is", "completion": " four" + tok.eos_token}
    record = record if field == "completion" else {"text": "just some text" + tok.eos_token}
    (ex,), _ = load(tmp_path, tok, [record], loss_on=loss_on)
    answer = " four" if field == "completion" else "just some text"
    assert trained_ids(ex)[-len(replies(tok, answer)) :] == replies(tok, answer)
    assert ex.input_ids.count(tok.eos_token_id) == 1 and ex.input_ids[-1] == ex.labels[-1] == tok.eos_token_id


def test_the_mask_equals_the_tokenizers_own_assistant_mask_under_a_generation_template(smollm2_tokenizer):
    """Where a template marks the assistant's tokens ({% generation %}), transformers returns its own mask:
    qtune's must be the same, token for token."""
    tok = smollm2_tokenizer
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    original, tok.chat_template = tok.chat_template, template
    try:
        ex = encode(tok, {"messages": CHAT})
        own = tok.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    finally:
        tok.chat_template = original
    assert ex.input_ids == own["input_ids"]
    assert [int(lab != IGNORE) for lab in ex.labels] == own["assistant_masks"]


def test_columns_map_a_file_with_its_own_names(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    rows = [{"question": "Two plus two?", "answer": "Four.", "id": 7}]
    (ex,), report = load(tmp_path, tok, rows, columns={"prompt": "question", "response": "answer"})
    assert report.format == "prompt_completion" and trained_ids(ex) == replies(tok, "Four.")
    rows = [{"task": "add", "numbers": "1 2", "result": "three"}]
    columns = {"instruction": "task", "input": "numbers", "response": "result"}
    (ex,), report = load(tmp_path, tok, rows, columns=columns)
    assert report.format == "alpaca" and trained_ids(ex) == replies(tok, "three")
    (ex,), report = load(
        tmp_path, tok, [{"dialogue": SHAREGPT["conversations"]}], columns={"conversations": "dialogue"}
    )
    assert report.format == "sharegpt"
    # From the command line: data.columns={prompt: question, completion: answer}.
    cfg = load_config(None, ["data.columns={prompt: question, completion: answer}"])
    assert cfg.data.columns == {"prompt": "question", "completion": "answer"}


def test_bad_input_names_file_row_and_field(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    bad_role = {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "..."}]}
    with pytest.raises(
        DataError,
        match=r"(?s)d\.jsonl: 1 bad record.*row 2: field `conversations\[1\]\.from` must be one of .*, got 'narrator'",
    ):
        load(tmp_path, tok, [SHAREGPT, bad_role])
    # Mixed formats in one file: the format is the first record's; a record of another is named as such.
    with pytest.raises(DataError, match=r"row 2: field `messages\[0\]` is a chat message .* mixed formats"):
        load(tmp_path, tok, [SHAREGPT, {"messages": CHAT}])
    with pytest.raises(DataError, match=r"row 2: field `messages\[0\]` is a ShareGPT turn .* mixed formats"):
        load(tmp_path, tok, [{"messages": CHAT}, {"messages": SHAREGPT["conversations"]}])
    with pytest.raises(
        DataError, match=r"row 1: no column data\.columns\.prompt=question; its columns are \['q', 'r'\]"
    ):
        load(tmp_path, tok, [{"q": "x", "r": "y"}], columns={"prompt": "question", "completion": "r"})
    with pytest.raises(ConfigError, match="data.columns.reply: no such field"):
        load(tmp_path, tok, [{"q": "x"}], columns={"reply": "q"})
    rows = [{"question": "a", "answer": "b"}, {"question": "c"}]
    with pytest.raises(DataError, match=r"row 2: field `completion` is missing"):
        load(tmp_path, tok, rows, columns={"prompt": "question", "completion": "answer"})
    errors = []
    assert validate({"conversations": [{"from": "gpt", "value": ""}]}, "sharegpt", 3, errors) is None
    assert errors == ["row 3: field `conversations[0].value` is an empty gpt reply"]


def test_eval_fraction_holds_out_a_seeded_split(tmp_path):
    examples = list(range(100))
    train, held, report = hold_out(examples, 0.1, seed=42, file="d.jsonl")
    assert len(held) == report.examples == 10 and sorted(train + held) == examples
    assert hold_out(examples, 0.1, seed=42, file="d.jsonl")[1] == held != hold_out(examples, 0.1, 7, "d.jsonl")[1]
    assert len(hold_out(examples[:3], 0.01, 42, "d.jsonl")[1]) == 1  # at least one held out, one kept
    with pytest.raises(DataError, match="needs at least 2 examples"):
        hold_out(examples[:1], 0.5, 42, "d.jsonl")
    with pytest.raises(ConfigError, match="data.eval and data.eval_fraction both set"):
        load_config(None, ["data.eval=x.jsonl", "data.eval_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"data.eval_fraction must be in \[0, 1\)"):
        load_config(None, ["data.eval_fraction=1.5"])


def test_one_sharegpt_file_trains_and_evaluates_on_its_held_out_fraction(tiny_model_dir, tmp_path):
    from qtune.lora import read_meta
    from recipes import sft

    rows = [
        {"conversations": [{"from": "human", "value": f"review {i}: {w}"}, {"from": "gpt", "value": w}]}
        for i, w in enumerate(["good", "bad"] * 10)
    ]
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=fp32", "quant.method=none", "train.max_steps=2"]
    overrides += [f"data.train={write_jsonl(tmp_path / 'sharegpt.jsonl', rows)}", "data.eval_fraction=0.2"]
    out = sft.main(load_config(None, [*overrides, "train.save_every=0", f"output.dir={tmp_path}", "output.name=sg"]))
    meta = read_meta(out)
    assert meta["data"]["train"]["format"] == "sharegpt" and meta["metrics"]["answered"] == 4
    assert meta["data"]["eval"] == {
        "file": str(tmp_path / "sharegpt.jsonl"),
        "fraction": 0.2,
        "seed": 42,
        "examples": 4,
    }


# ---------------------------------------------------------------- chat templates and tool calls

TOOL_CHAT = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "tool_call_id": "1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
]
CALL = '{"name": "weather", "arguments": {"city": "Paris"}}'
# How each named template ends an assistant turn; where that is not the tokenizer's EOS, qtune adds the EOS.
# (On SmolLM2, Llama's, Mistral's and Gemma's markers are plain text; with their own tokenizers they are tokens.)
TURN_END = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "mistral": "", "gemma": "<end_of_turn>\n", "alpaca": ""}


@pytest.mark.parametrize("name", list(TURN_END))
def test_named_templates_train_exactly_the_replies_and_tool_calls_never_tool_results(smollm2_tokenizer, name):
    from qtune.data import TEMPLATES

    tok = smollm2_tokenizer
    original, tok.chat_template = tok.chat_template, TEMPLATES[name]
    try:
        ex = encode(tok, {"messages": validate({"messages": TOOL_CHAT}, "chat", 1, errors := [])["messages"]})
        own = tok.apply_chat_template(TOOL_CHAT, return_dict=True, return_assistant_tokens_mask=True)
    finally:
        tok.chat_template = original
    assert errors == []
    end = TURN_END[name] if TURN_END[name] == tok.eos_token else TURN_END[name] + tok.eos_token
    call = ("[TOOL_CALLS] " if name == "mistral" else "") + CALL  # Mistral marks a call; it is the model's to write
    assert tok.decode(trained_ids(ex)) == f"{call}{end}21 degrees.{end}"
    assert '{"temp": 21}' in tok.decode(ex.input_ids) and "Use the tools." in tok.decode(ex.input_ids)
    if name == "chatml":  # turns end in EOS and start with special tokens: transformers' whole-text mask is ours
        assert ex.input_ids == own["input_ids"]
        assert [int(lab != IGNORE) for lab in ex.labels] == own["assistant_masks"]


def test_a_template_that_drops_tool_calls_is_refused_and_unknown_templates_name_the_key(smollm2_tokenizer, tmp_path):
    from qtune.data import resolve_template

    with pytest.raises(DataError, match=r"row 1: the chat template leaves tool_calls out.*data.chat_template"):
        load(tmp_path, smollm2_tokenizer, [{"messages": TOOL_CHAT}])  # SmolLM2's own template ignores tool_calls
    with pytest.raises(ConfigError, match="data.chat_template: unknown template 'llama3'; use base .* chatml"):
        resolve_template("llama3")
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_template(str(jinja)) == jinja.read_text() and resolve_template("base") is None
    with pytest.raises(ConfigError, match="data.chat_template: .*missing.jinja is not a file"):
        resolve_template(str(tmp_path / "missing.jinja"))


def test_chat_data_on_a_base_without_a_template_names_the_key(tmp_path):
    from tests.conftest import make_tokenizer

    bare = make_tokenizer(None)
    with pytest.raises(DataError, match=r"chat records need a chat template .*: set data.chat_template"):
        load(tmp_path, bare, [{"messages": CHAT}])
    with pytest.raises(DataError, match=r"sharegpt records need a chat template"):
        load(tmp_path, bare, [SHAREGPT])


def test_alpaca_data_on_a_base_without_a_template_uses_the_named_alpaca_template(tmp_path, capsys):
    """One prompt for Alpaca records everywhere: the named template, set on the tokenizer, so the adapter stores it."""
    from qtune.data import TEMPLATES
    from tests.conftest import make_tokenizer

    bare = make_tokenizer(None)
    (ex,), report = load(tmp_path, bare, [{"instruction": "add", "input": "1 2", "output": "three"}])
    assert bare.chat_template == TEMPLATES["alpaca"] and "data.chat_template=alpaca" in capsys.readouterr().out
    assert bare.decode(ex.prompt_ids) == "### Instruction:\nadd\n\n1 2\n\n### Response:\n"
    assert trained_ids(ex) == replies(bare, "three")


def test_the_template_trained_with_is_stored_and_used_by_generate_and_serve(tiny_model_dir, tmp_path):
    from qtune.data import TEMPLATES
    from qtune.lora import load_adapter, read_meta
    from qtune.serve.pool import AdapterPool
    from recipes import sft

    rows = [{"instruction": f"label {i}", "output": w} for i, w in enumerate(["good", "bad"] * 4)]
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=fp32", "quant.method=none", "train.max_steps=1"]
    overrides += [f"data.train={write_jsonl(tmp_path / 'a.jsonl', rows)}", "data.chat_template=alpaca"]
    out = sft.main(load_config(None, [*overrides, "train.save_every=0", f"output.dir={tmp_path}", "output.name=al"]))
    assert read_meta(out)["chat_template"] == TEMPLATES["alpaca"]
    _, tokenizer, _, _ = load_adapter(out)
    assert tokenizer.chat_template == TEMPLATES["alpaca"]
    pool = AdapterPool(str(tiny_model_dir), quant="none")
    pool.add("al", out)
    prompt = [{"role": "user", "content": "label 1"}]
    assert pool.tokenizer.decode(pool.chat_ids("al", prompt)) == "### Instruction:\nlabel 1\n\n### Response:\n"
    assert pool.tokenizer.decode(pool.chat_ids("base", prompt)).startswith("<|im_start|>user")


def test_arrow_files_and_hub_dataset_ids(smollm2_tokenizer, tmp_path, monkeypatch):
    import datasets

    from qtune.data import fingerprint_data

    datasets.Dataset.from_list([SHAREGPT, SHAREGPT]).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    examples, report = load_examples(arrow, smollm2_tokenizer, DataConfig())
    assert report.format == "sharegpt" and len(examples) == 2 and fingerprint_data(arrow).startswith("sha256:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    with pytest.raises(
        DataError, match="someone/chats:test: no such file, and as a hub dataset .*HF_HUB_OFFLINE is set"
    ):
        load_examples("someone/chats:test", smollm2_tokenizer, DataConfig())
    with pytest.raises(DataError, match=r"data/typo\.jsonl: no such file or folder"):
        load_examples("data/typo.jsonl", smollm2_tokenizer, DataConfig())
    # A dot in a dataset id is no file suffix (teknium/OpenHermes-2.5); a data file's suffix is.
    with pytest.raises(DataError, match="someone/chats-2.5: no such file, and as a hub dataset"):
        load_examples("someone/chats-2.5", smollm2_tokenizer, DataConfig())
    with pytest.raises(DataError, match=r"someone/chats\.parquet: no such file or folder"):
        load_examples("someone/chats.parquet", smollm2_tokenizer, DataConfig())


def test_review_cases_tool_call_shapes_columns_and_broken_templates(smollm2_tokenizer, tmp_path):
    from qtune.data import TEMPLATES

    tok = smollm2_tokenizer
    # A call with no arguments renders; an empty tool_calls list is no call; ShareGPT turns written as role/content.
    no_args = [{"role": "user", "content": "now?"}, {"role": "assistant", "tool_calls": [{"function": {"name": "t"}}]}]
    original, tok.chat_template = tok.chat_template, TEMPLATES["chatml"]
    try:
        (ex,), _ = load(tmp_path, tok, [{"messages": no_args}])
        assert tok.decode(trained_ids(ex)) == '{"name": "t", "arguments": {}}<|im_end|>'
        # A reply that names the tool in its text does not hide a template that drops the call itself.
        tok.chat_template = original
        named = [{"role": "user", "content": "?"}, {**no_args[1], "content": "calling t"}]
        with pytest.raises(DataError, match="leaves tool_calls out"):
            load(tmp_path, tok, [{"messages": named}])
        # A template that breaks is one line naming data.chat_template, not a traceback.
        tok.chat_template = "{% for m in messages %}{{ m['content'] }{% endfor %}"
        with pytest.raises(DataError, match=r"row 1: the chat template cannot render .*data.chat_template"):
            load(tmp_path, tok, [{"messages": CHAT}])
    finally:
        tok.chat_template = original
    plain = [{**m, "tool_calls": []} for m in CHAT]
    (ex,), _ = load(tmp_path, tok, [{"messages": plain}])
    assert trained_ids(ex) == replies(tok, "fine thank you", "24, I think")
    (ex,), report = load(tmp_path, tok, [{"conversations": CHAT}])
    assert report.format == "sharegpt" and trained_ids(ex) == replies(tok, "fine thank you", "24, I think")
    # `response` is an Alpaca file's output when the file has an instruction column.
    rows = [{"instruction": "add", "input": "1 2", "answer": "three"}]
    (ex,), report = load(tmp_path, tok, rows, columns={"response": "answer"})
    assert report.format == "alpaca" and trained_ids(ex) == replies(tok, "three")
    # A record without the mapped column never falls back to a field of the same name it happens to have.
    rows = [{"q": "x", "a": "y"}, {"a": "z", "prompt": "stale"}]
    with pytest.raises(DataError, match=r"row 2: field `prompt` is missing"):
        load(tmp_path, tok, rows, columns={"prompt": "q", "completion": "a"})


def test_a_published_adapter_never_carries_a_local_template_path():
    from qtune.hub import public_meta

    meta = {"config": {"data": {"chat_template": "/home/alice/templates/mine.jinja", "train": "/home/alice/d.jsonl"}}}
    assert public_meta(meta)["config"]["data"] == {"chat_template": "mine.jinja", "train": "d.jsonl"}
    named = {"config": {"data": {"chat_template": "llama-3"}}}
    assert public_meta(named)["config"]["data"]["chat_template"] == "llama-3"


@pytest.mark.parametrize("name", list(TURN_END))
def test_one_render_of_a_named_template_splits_replies_as_the_prefix_renders_do(smollm2_tokenizer, name):
    """qtune's named templates are split from their {% generation %} blocks in one render; the same template
    with a comment appended (so not recognised) is split by rendering every prefix. Both must agree."""
    import copy

    from qtune.data import TEMPLATES

    fast, slow = copy.deepcopy(smollm2_tokenizer), copy.deepcopy(smollm2_tokenizer)
    fast.chat_template, slow.chat_template = TEMPLATES[name], TEMPLATES[name] + "{#- unrecognised -#}"
    records = [
        {"messages": CHAT},
        {"messages": TOOL_CHAT},
        {"messages": CHAT[1:] + [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "done"}]},
        {"messages": CHAT[1:3] + CHAT[3:], "n_prompt": 3},  # prompt/completion as messages: the last reply only
    ]
    from qtune.data.encode import _marked_segments

    # One render where each reply ends in the tokenizer's EOS (SmolLM2's is <|im_end|>); else prefix renders.
    assert (_marked_segments(fast, CHAT, 0) is not None) == (name in ("chatml", "mistral", "alpaca"))
    for record in records:
        a, b = encode(fast, copy.deepcopy(record)), encode(slow, copy.deepcopy(record))
        assert (a.input_ids, a.labels, a.prompt_ids) == (b.input_ids, b.labels, b.prompt_ids), (name, record)
