"""The adapter pool: mixed-adapter batches equal each adapter run alone, LRU residency, reloads, refusals,
classification adapters on a shared classifier base.

Adapters are made in seconds, not trained: peft's `init_lora_weights=False` gives random, non-zero
LoRA B matrices, so every adapter really changes the model's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtune.config import LoraConfig, ModelConfig, QuantConfig, RunConfig, to_dict
from qtune.errors import AdapterError
from qtune.meta import AdapterMeta
from qtune.models import fingerprint_base
from qtune.serve.decode import BASE, Row, Sampling
from qtune.serve.pool import AdapterPool
from tests.conftest import make_model_folder

PROMPTS = [
    "hello how are you",
    "the movie was great and the acting",
    "what is two plus",
    "a dull and boring film",
]
LABELS = {0: "negative", 1: "positive"}


def make_peft_adapter(base_dir: Path, out: Path, seed: int, task_type: str = "CAUSAL_LM") -> Path:
    """A plain PEFT adapter with random non-zero weights, saved as a folder (no qtune.json)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type=task_type
    )
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def make_qtune_adapter(base_dir: Path, out: Path, seed: int, system_prompt: str | None = None) -> Path:
    """A qtune adapter folder: PEFT files plus qtune.json recording the base's fingerprint and config."""
    make_peft_adapter(base_dir, out, seed)
    cfg = RunConfig(model=ModelConfig(name=str(base_dir), dtype="fp32"), quant=QuantConfig(method="none"))
    cfg.data.system_prompt = system_prompt
    meta = {
        "kind": "causal-lm",
        "base": {"id": str(base_dir), "fingerprint": fingerprint_base(base_dir)},
        "config": to_dict(cfg),
    }
    (out / "qtune.json").write_text(json.dumps(meta))
    return out


def make_classifier_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A qtune classification adapter: LoRA on the backbone plus a saved (random) head, as recipes/classify writes."""
    import dataclasses

    from qtune import lora
    from qtune.models import load_classifier, load_tokenizer

    cfg = RunConfig(
        recipe="classify",
        model=ModelConfig(name=str(base_dir), dtype="fp32"),
        quant=QuantConfig(method="none"),
        lora=LoraConfig(r=4, alpha=8),
    )
    tokenizer = load_tokenizer(base_dir)
    torch.manual_seed(seed)
    model, head = load_classifier(base_dir, cfg.model, cfg.quant, LABELS, pad_token_id=tokenizer.pad_token_id)
    cfg.lora = dataclasses.replace(cfg.lora, modules_to_save=list(head))  # peft extends the list in place
    model = lora.attach_lora(model, cfg.lora, task_type="SEQ_CLS")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    meta = {
        "kind": "sequence-classification",
        "base": {"id": str(base_dir), "fingerprint": fingerprint_base(base_dir)},
        "config": to_dict(cfg),
        "labels": {
            "id2label": {str(k): v for k, v in LABELS.items()},
            "label2id": {v: k for k, v in LABELS.items()},
            "head_modules": head,
        },
    }
    return lora.save_adapter(model, out, AdapterMeta.from_json(meta))


@pytest.fixture(scope="session")
def adapter_set(tmp_path_factory, chatml_tokenizer, tiny_model_dir):
    """A tiny base, an unrelated base, and an adapters/ folder: three PEFT adapters, one qtune, one classifier."""
    root = tmp_path_factory.mktemp("pool")
    folder = root / "adapters"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTUNE_HOME", str(root / "qtune-home"))
        for i, name in enumerate(["alpha", "beta", "gamma"]):
            make_peft_adapter(tiny_model_dir, folder / name, seed=100 + i)
        make_qtune_adapter(tiny_model_dir, folder / "qdemo", seed=200, system_prompt="Answer in one word.")
        make_classifier_adapter(tiny_model_dir, folder / "sentiment", seed=300)
        other = make_model_folder(root / "other-base", chatml_tokenizer, seed=1, arch="qwen2")
        make_qtune_adapter(other, root / "foreign-qtune", seed=400)
        make_peft_adapter(other, root / "foreign-peft", seed=401)
    (folder / "README.md").write_text("not an adapter\n")
    return {"base": tiny_model_dir, "adapters": folder, "root": root}


def rows_for(pool: AdapterPool, adapters: list[str], max_tokens: int = 10) -> list[Row]:
    return [Row(a, pool.encode(p), Sampling(max_tokens=max_tokens)) for a in adapters for p in PROMPTS]


@pytest.mark.parametrize("quant", ["none", "nf4", "int8"])
def test_mixed_batch_equals_each_adapter_alone(adapter_set, quant):
    pool = AdapterPool(str(adapter_set["base"]), quant=quant)
    assert pool.add_folder(adapter_set["adapters"]) == ["alpha", "beta", "gamma", "qdemo", "sentiment"]
    names = [BASE, "alpha", "beta", "gamma", "qdemo"]
    mixed = pool.generate(rows_for(pool, names))
    alone = [pool.generate([row])[0] for row in rows_for(pool, names)]
    assert [r.tokens for r in mixed] == [r.tokens for r in alone]
    assert all(r.finish_reason in ("length", "stop") for r in mixed)
    # The adapters really differ: each one's output differs from the base's on some prompt.
    by_adapter = {n: [r.tokens for r in mixed if r.adapter == n] for n in names}
    assert all(by_adapter[n] != by_adapter[BASE] for n in names[1:])
    assert len({json.dumps(v) for v in by_adapter.values()}) == len(names)


def test_in_bf16_a_mixed_batch_differs_from_each_row_alone_only_on_near_ties(adapter_set):
    """Padding changes the shapes of the matrix products, so in bf16 a row's logits in a batch differ from the row
    alone in the last bits, and a greedy pick between two near-tied tokens may flip. Check that every flip is one:
    where a row's tokens first differ, the two tokens' logits in the alone run are within a few bf16 steps."""
    from peft import PeftModel

    pool = AdapterPool(str(adapter_set["base"]), quant="none", dtype="bf16")
    pool.add_folder(adapter_set["adapters"])
    names = [BASE, "alpha", "beta", "gamma"]

    def make():
        prompts = [p + " " + q for p in PROMPTS for q in PROMPTS]
        return [Row(names[i % 4], pool.encode(p), Sampling(max_tokens=20)) for i, p in enumerate(prompts)]

    mixed = pool.generate(make())
    alone = [pool.generate([row])[0] for row in make()]
    for m, a in zip(mixed, alone):
        if m.tokens == a.tokens:
            continue
        k = next(i for i, (x, y) in enumerate(zip(m.tokens, a.tokens)) if x != y)
        ids = torch.tensor([a.prompt_ids + a.tokens[:k]])
        extra = {"adapter_names": ["__base__" if a.adapter == BASE else a.adapter]}
        assert isinstance(pool.model, PeftModel)
        with torch.no_grad():
            logits = pool.model(input_ids=ids, **extra).logits[0, -1].float()
        step = 2**-8 * float(logits.abs().max())  # one bf16 step at the logits' magnitude
        assert float(logits[a.tokens[k]] - logits[m.tokens[k]]) <= 4 * step, (a.adapter, k)


def test_rows_that_join_a_running_batch_equal_each_adapter_alone(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    pool.add_folder(adapter_set["adapters"])
    plan = [
        ("alpha", PROMPTS[0], 12),
        ("beta", PROMPTS[1], 3),  # finishes early: its padding columns are trimmed away
        (BASE, PROMPTS[2], 10),
        ("gamma", PROMPTS[3], 8),
        ("qdemo", PROMPTS[1] + " " + PROMPTS[3], 6),  # joins with a longer history than the batch's
        ("alpha", "hi", 5),
    ]

    def make():
        return [Row(a, pool.encode(p), Sampling(max_tokens=n)) for a, p, n in plan]

    alone = [pool.generate([row])[0] for row in make()]
    rows = make()
    arrivals = {0: rows[2:3], 2: rows[3:5], 6: rows[5:]}  # step -> rows that join then
    sizes = []

    def admit(running: int) -> list[Row]:
        sizes.append(running)
        return arrivals.pop(len(sizes) - 1, [])

    pool.generate(rows[:2], admit=admit)
    assert [r.tokens for r in rows] == [r.tokens for r in alone]
    assert [r.finish_reason for r in rows] == [r.finish_reason for r in alone]
    assert max(sizes) >= 4 and not arrivals


def test_a_long_prompt_is_prefilled_in_chunks_between_steps_and_short_ones_overtake_it(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    pool.add_folder(adapter_set["adapters"])
    long_prompt = " ".join(PROMPTS * 6)  # ~130 tokens: 17 chunks of 8

    def make():
        return [
            Row("alpha", pool.encode(PROMPTS[0]), Sampling(max_tokens=30)),
            Row("beta", pool.encode(long_prompt), Sampling(max_tokens=5)),
            Row(BASE, pool.encode(PROMPTS[2]), Sampling(max_tokens=5)),
        ]

    alone = [pool.generate([row])[0] for row in make()]
    running, long, short = make()
    assert len(long.prompt_ids) > 8 * 10
    arrivals = {1: [long], 3: [short]}  # the short one arrives while the long one is still filling
    admitted, order = [], []

    def admit(n: int) -> list[Row]:
        admitted.append(n)
        return arrivals.pop(len(admitted) - 1, [])

    def on_step(rows: list[Row]) -> None:
        order.extend((r.adapter, len(r.tokens)) for r in rows if r.tokens)

    pool.generate([running], on_step=on_step, admit=admit, prefill_chunk=8)
    assert [r.tokens for r in (running, long, short)] == [r.tokens for r in alone]
    # The running row kept getting tokens while the long prompt filled, and the short row finished first.
    first_long = order.index(("beta", 1))
    assert sum(1 for a, _ in order[:first_long] if a == "alpha") >= 10
    assert ("base", len(short.tokens)) in order[:first_long]


@pytest.mark.parametrize("chunk", [None, 4])
def test_a_row_past_its_deadline_stops_with_timeout(adapter_set, chunk):
    import time

    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    late = Row(BASE, pool.encode(PROMPTS[1]), Sampling(max_tokens=50), deadline=time.monotonic() - 1)
    fine = Row(BASE, pool.encode(PROMPTS[1]), Sampling(max_tokens=5))
    seen = []
    pool.generate(
        [late, fine], on_step=lambda rows: seen.extend(r for r in rows if r.finish_reason), prefill_chunk=chunk
    )
    assert late.finish_reason == "timeout" and len(late.tokens) <= 1 and late in seen
    assert fine.finish_reason == "length" and len(fine.tokens) == 5


def test_sampling_is_per_row_and_seeded(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    pool.add("alpha", adapter_set["adapters"] / "alpha")

    def sampled(seed, company=0):
        hot = Row("alpha", pool.encode("hello"), Sampling(temperature=1.5, top_p=0.95, seed=seed, max_tokens=12))
        greedy = [Row(BASE, pool.encode(p), Sampling(max_tokens=12)) for p in PROMPTS[:company]]
        pool.generate([hot, *greedy])
        return hot.tokens

    assert sampled(1) == sampled(1) == sampled(1, company=3)  # the seed, not the batch, decides
    assert len({tuple(sampled(s)) for s in range(5)}) > 1


def test_stop_strings_and_eos(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    pool.add("beta", adapter_set["adapters"] / "beta")
    full = pool.generate([Row("beta", pool.encode(PROMPTS[0]), Sampling(max_tokens=12))])[0]
    stop = full.text[3:5]
    cut = pool.generate([Row("beta", pool.encode(PROMPTS[0]), Sampling(max_tokens=12, stop=[stop]))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    k = next(i for i in range(1, len(full.tokens)) if full.tokens[i] not in full.tokens[:i])
    pool.eos_ids.add(full.tokens[k])  # as if that token were the end of the reply
    early = pool.generate([Row("beta", pool.encode(PROMPTS[0]), Sampling(max_tokens=12))])[0]
    assert early.finish_reason == "stop" and early.tokens == full.tokens[:k]


def test_lru_evicts_and_reloads(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none", max_adapters=2)
    assert pool.add_folder(adapter_set["adapters"])  # registers all five, loads the first two
    assert list(pool.resident) == ["alpha", "beta"]
    first = pool.generate(rows_for(pool, ["gamma"]))  # evicts alpha, the least recently used
    assert list(pool.resident) == ["beta", "gamma"]
    pool.generate(rows_for(pool, ["beta"]))
    pool.generate(rows_for(pool, ["alpha"]))  # reloads alpha from its folder, evicts gamma
    assert list(pool.resident) == ["beta", "alpha"] and pool.adapters["alpha"].loads == 2
    again = pool.generate(rows_for(pool, ["gamma"]))
    assert [r.tokens for r in again] == [r.tokens for r in first]  # a reloaded adapter gives the same output
    with pytest.raises(AdapterError, match="over max_adapters=2"):
        pool.generate(rows_for(pool, ["alpha", "beta", "gamma"]))
    # A byte budget: room for one adapter only.
    size = pool.adapters["alpha"].bytes
    small = AdapterPool(str(adapter_set["base"]), quant="none", max_adapter_bytes=int(size * 1.5))
    small.add("alpha", adapter_set["adapters"] / "alpha")
    small.add("beta", adapter_set["adapters"] / "beta")
    assert list(small.resident) == ["beta"]


def test_unload_and_back_to_the_bare_base(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    base = pool.generate(rows_for(pool, [BASE]))
    pool.add("alpha", adapter_set["adapters"] / "alpha")
    pool.remove("alpha")
    assert pool.names() == [BASE] and not pool.resident
    assert [r.tokens for r in pool.generate(rows_for(pool, [BASE]))] == [r.tokens for r in base]
    with pytest.raises(AdapterError, match="no adapter named 'alpha'"):
        pool.remove("alpha")
    with pytest.raises(AdapterError, match="no adapter named 'alpha'"):
        pool.generate(rows_for(pool, ["alpha"]))


def test_refusals(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    root = adapter_set["root"]
    before = [r.tokens for r in pool.generate(rows_for(pool, [BASE]))]
    with pytest.raises(AdapterError, match="trained on a base with fingerprint"):
        pool.add("foreign", root / "foreign-qtune")
    with pytest.raises(AdapterError, match="in_features=128 in the served base but 96 in the adapter"):
        pool.add("foreign", root / "foreign-peft")
    assert "foreign" not in pool.names()
    with pytest.raises(AdapterError, match="no such adapter folder"):
        pool.add("missing", root / "missing")
    with pytest.raises(AdapterError, match="reserved"):
        pool.add(BASE, adapter_set["adapters"] / "alpha")
    pool.add("alpha", adapter_set["adapters"] / "alpha")
    with pytest.raises(AdapterError, match="already loaded"):
        pool.add("alpha", adapter_set["adapters"] / "alpha")
    assert [r.tokens for r in pool.generate(rows_for(pool, [BASE]))] == before  # refusals left the base intact


def test_qtune_adapter_brings_its_system_prompt(adapter_set):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    pool.add("qdemo", adapter_set["adapters"] / "qdemo")
    pool.add("alpha", adapter_set["adapters"] / "alpha")
    messages = [{"role": "user", "content": "hello"}]
    assert "Answer in one word." in pool.tokenizer.decode(pool.chat_ids("qdemo", messages))
    assert "Answer in one word." not in pool.tokenizer.decode(pool.chat_ids("alpha", messages))


def test_classification_adapters_share_a_classifier_base(adapter_set, tmp_path):
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    pool.add("sentiment", adapter_set["adapters"] / "sentiment")
    make_classifier_adapter(adapter_set["base"], tmp_path / "sentiment2", seed=301)
    pool.add("sentiment2", tmp_path / "sentiment2")
    assert len(pool.classifiers) == 1  # one classifier base, two adapters (two heads) on it
    texts = PROMPTS[:2]
    mixed = pool.classify(["sentiment", "sentiment2", "sentiment", "sentiment2"], texts + texts)
    alone = [pool.classify([a], [t])[0] for a, t in zip(["sentiment", "sentiment2"] * 2, texts + texts)]
    for m, a in zip(mixed, alone):
        assert m["label"] == a["label"] and set(m["probabilities"]) == set(LABELS.values())
        assert m["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5)
        assert sum(m["probabilities"].values()) == pytest.approx(1.0)
    assert mixed[0]["probabilities"] != pytest.approx(mixed[1]["probabilities"], abs=1e-3)  # two different heads
    with pytest.raises(AdapterError, match="not a text-generation adapter"):
        pool.generate([Row("sentiment", pool.encode("hi"))])
    with pytest.raises(AdapterError, match="not a classification adapter"):
        pool.classify([BASE], ["hi"])
