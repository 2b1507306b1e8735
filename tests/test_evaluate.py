import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from qtune.data import IGNORE, DataError, encode
from qtune.evaluate import (
    answer_accuracy,
    contains_answer,
    evaluate_loss,
    generate,
    generate_ids,
    normalize_answer,
)
from qtune.models import load_tokenizer

RECORDS = [
    {"messages": [{"role": "user", "content": "the movie was great"}, {"role": "assistant", "content": "positive"}]},
    {
        "messages": [
            {"role": "user", "content": "a dull and boring film with terrible acting"},
            {"role": "assistant", "content": "negative answer"},
        ]
    },
    {"prompt": "what is two plus two", "completion": " four"},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval(), load_tokenizer(tiny_model_dir)


def test_batched_left_padded_loss_equals_per_example_full_logits(model_and_tokenizer):
    model, tok = model_and_tokenizer
    examples = [encode(tok, r) for r in RECORDS]
    total, count = 0.0, 0
    for e in examples:  # the obvious way: one example at a time, full logits
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        labels = torch.tensor(e.labels[1:])
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    got = evaluate_loss(model, examples, tok.pad_token_id, batch_size=3)
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batched_generation_equals_one_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [encode(tok, r).prompt_ids for r in RECORDS]
    alone = [generate_ids(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert generate_ids(model, tok, prompts, max_new_tokens=5, batch_size=3) == alone


def test_generate_refuses_a_prompt_that_is_not_unicode(model_and_tokenizer):
    """Bytes that are not UTF-8 reach sys.argv as lone surrogates: one DataError naming the flag, not a traceback."""
    model, tok = model_and_tokenizer
    with pytest.raises(DataError, match=r"^--prompt holds a lone surrogate"):
        generate(model, tok, "is it \udcff good?")
    with pytest.raises(DataError, match=r"^the adapter's data.system_prompt holds a lone surrogate"):
        generate(model, tok, "is it good?", system_prompt="be \ud800 brief")


def test_answer_accuracy_counts_exact_and_contained(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    examples = [encode(tok, r) for r in RECORDS]
    import qtune.evaluate as ev

    monkeypatch.setattr(ev, "generate_ids", lambda *a, **k: ["Positive.", "it is negative answer", "five"])
    metrics, samples = answer_accuracy(model, tok, examples)
    assert metrics == {"accuracy": pytest.approx(1 / 3), "contains_accuracy": pytest.approx(2 / 3), "answered": 3}
    assert [s["correct"] for s in samples] == [True, False, False]
    # Each sample keeps its prompt as the model saw it (chat template applied), for the studio and for a reader.
    assert [s["prompt"] for s in samples] == [tok.decode(e.prompt_ids) for e in examples]
    assert RECORDS[0]["messages"][0]["content"] in samples[0]["prompt"]
    # Naming a rival answer too is not a lenient match.
    monkeypatch.setattr(ev, "generate_ids", lambda *a, **k: ["positive, not four", "negative answer", "four"])
    metrics, samples = answer_accuracy(model, tok, examples)
    assert [s["contains"] for s in samples] == [False, True, True]


@pytest.mark.parametrize(
    "output, answer, exact, contains",
    [
        ("Positive.", "positive", True, True),
        ("The review is positive", "positive", False, True),
        ("positively", "positive", False, False),
        (" four", "four", True, True),
    ],
)
def test_normalisation(output, answer, exact, contains):
    assert (normalize_answer(output) == normalize_answer(answer)) is exact
    assert contains_answer(output, answer) is contains
