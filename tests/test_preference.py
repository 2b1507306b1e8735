"""Preference and reward training (recipes/dpo.py, recipes/grpo.py) on a tiny random Llama: the adapters are plain
PEFT folders every other verb takes; the reference is never a second copy of the base; lora.from_adapter starts
from an adapter of the same base only; reward functions that cannot work stop the run before the model loads;
a killed DPO run resumes to the uninterrupted run's adapter, bit for bit."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtune import lora
from qtune.cli import main as cli_main
from qtune.config import ConfigError, load_config
from qtune.errors import AdapterError
from qtune.train import checkpoint
from recipes import dpo, grpo

from .conftest import make_model_folder, make_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["great", "dull", "fine", "boring", "wonderful", "terrible"]
REVIEWS = [f"the movie was {WORDS[i % 6]} {WORDS[(i * 5) % 6]} {i}" for i in range(24)]
LABELS = ["positive" if WORDS[i % 6] in ("great", "fine", "wonderful") else "negative" for i in range(24)]
# The chosen answer is the label; the rejected one a chatty sentence, as a base answers before tuning.
PAIRS = [
    {"prompt": [{"role": "user", "content": r}], "chosen": label, "rejected": "the movie was great and the acting"}
    for r, label in zip(REVIEWS, LABELS)
]
PROMPTS = [
    {"messages": [{"role": "user", "content": r}, {"role": "assistant", "content": label}]}
    for r, label in zip(REVIEWS, LABELS)
]


@pytest.fixture()
def run_args(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    return [
        f"model.name={tiny_model_dir}",
        "model.dtype=fp32",
        "quant.method=none",
        "lora.r=4",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.lr=5e-3",
        "train.logging_steps=1",
        f"output.dir={tmp_path / 'adapters'}",
        "eval.max_new_tokens=4",
    ]


def dpo_config(run_args, tmp_path, *more):
    return load_config(None, ["recipe=dpo", f"data.train={tmp_path / 'pairs.jsonl'}", *run_args, *more])


def grpo_config(run_args, tmp_path, *more):
    rewards = "grpo.rewards=recipes.rewards:exact_answer,recipes.rewards:brevity"
    prompts = f"data.train={tmp_path / 'prompts.jsonl'}"
    return load_config(None, ["recipe=grpo", prompts, rewards, "grpo.max_new_tokens=6", *run_args, *more])


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


# ---------------------------------------------------------------- DPO and KTO


def test_dpo_adapter_is_plain_peft_prefers_the_chosen_answers_and_names_its_method(run_args, tmp_path):
    out = dpo.main(dpo_config(run_args, tmp_path, "output.name=dpo", "data.eval_fraction=0.25"))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # one adapter: trl's "ref" copy is not saved
    meta = lora.read_meta(out)
    assert meta["training"]["method"] == "dpo" and meta["training"]["loss"] == "sigmoid"
    # Six held-out pairs the adapter never saw: it now ranks each chosen answer above its rejected one, by more
    # than the base does (the implicit reward margin is positive on every pair).
    metrics = meta["metrics"]
    assert metrics["pairs"] == 6 and metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 0
    assert {"accuracy", "answer_words", "preference_accuracy"} <= set(metrics)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(meta["base"]["path"])
    PeftModel.from_pretrained(base, str(out))  # plain PEFT loads it


def test_kto_trains_on_a_pair_file_as_judged_completions(run_args, tmp_path):
    out = dpo.main(dpo_config(run_args, tmp_path, "output.name=kto", "dpo.loss=kto"))
    meta = lora.read_meta(out)
    assert meta["training"]["method"] == "kto"
    assert meta["data"]["train"]["examples"] == 2 * len(PAIRS)  # one good and one bad completion per pair
    assert len(meta["training"]["loss_curve"]) == 6


def test_the_reference_is_the_base_itself_not_a_second_copy(run_args, tmp_path):
    """The DPO trainer holds one base: no reference model object, and once the adapter has moved, the reference
    log-probs it trains against are still the base's own."""
    from transformers import LlamaForCausalLM

    from qtune import data, models, train

    cfg = dpo_config(run_args, tmp_path, "output.name=ref")
    run = train.start(cfg)
    pairs, report = data.load_pairs(cfg.data.train, run.tokenizer, cfg.data)
    cfg = run.prepare(report, longest=max(map(data.longest, pairs)))
    base = models.load_base(run.base_path, cfg.model, cfg.quant, cfg.train)
    model = lora.attach_lora(base, cfg.lora)
    trainer = train.build_dpo_trainer(model, run.tokenizer, data.pairs_dataset(pairs), cfg, run.checkpoints)
    with torch.no_grad():  # as if trained: the adapter's log-probs now differ from the base's
        for name, p in model.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.add_(0.05)
    gc.collect()
    assert trainer.ref_model is None
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == 1

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    plain = models.load_base(run.base_path, cfg.model, cfg.quant)  # the base alone, loaded separately
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs[:4]] + [(p.prompt_ids, p.rejected_ids) for p in pairs[:4]]
    from qtune.evaluate import sequence_logps

    expected = sequence_logps(plain, [r[0] for r in rows], [r[1] for r in rows], run.tokenizer.pad_token_id)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), torch.tensor(expected), atol=1e-4)
    moved = sequence_logps(trainer.model, [r[0] for r in rows], [r[1] for r in rows], run.tokenizer.pad_token_id)
    assert not torch.allclose(torch.tensor(moved), torch.tensor(expected), atol=1e-2)  # (the check can fail)


def test_from_adapter_starts_from_its_weights_and_keeps_them_as_the_reference(run_args, tmp_path):
    sft_like = dpo.main(dpo_config(run_args, tmp_path, "output.name=start", "train.max_steps=2"))
    start = load_file(str(sft_like / lora.ADAPTER_WEIGHTS))
    out = dpo.main(dpo_config(run_args, tmp_path, "output.name=next", f"lora.from_adapter={sft_like}"))
    trained = load_file(str(out / lora.ADAPTER_WEIGHTS))
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    meta = lora.read_meta(out)
    assert meta["training"]["from_adapter"] == str(sft_like)


def test_from_adapter_of_another_base_or_kind_is_refused_before_the_model_loads(run_args, tmp_path, monkeypatch):
    other = make_model_folder(tmp_path / "other-base", make_tokenizer(), seed=1)
    elsewhere = [a.replace(a.split("=", 1)[1], str(other)) if a.startswith("model.name=") else a for a in run_args]
    adapter = dpo.main(dpo_config(elsewhere, tmp_path, "output.name=other", "train.max_steps=1"))
    monkeypatch.setattr(dpo.models, "load_base", no_model)
    with pytest.raises(AdapterError, match=r"lora.from_adapter: .*other was trained on another base"):
        dpo.main(dpo_config(run_args, tmp_path, "output.name=x", f"lora.from_adapter={adapter}"))
    with pytest.raises(AdapterError, match="is not a qtune adapter folder"):
        dpo.main(dpo_config(run_args, tmp_path, "output.name=x", f"lora.from_adapter={tmp_path}"))


def test_a_killed_dpo_run_resumes_to_the_same_adapter_bitwise(run_args, tmp_path):
    args = [*run_args, "train.max_steps=12", "train.batch_size=2", "train.save_every=2", "lora.dropout=0.1"]
    reference = dpo.main(dpo_config(args, tmp_path, "output.name=reference"))

    kill_after = random.choice([4, 6, 8])
    folder = tmp_path / "adapters" / "killed.checkpoints"
    config = tmp_path / "run.yaml"
    config.write_text("recipe: dpo\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    argv = [f"data.train={tmp_path / 'pairs.jsonl'}", *args, "output.name=killed"]
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "qtune.cli", "train", str(config), *argv], stdout=log, stderr=log, env=env, cwd=ROOT
        )
        deadline = time.monotonic() + 120
        while not (folder / f"checkpoint-{kill_after}").is_dir():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the child never reached its checkpoint"
            time.sleep(0.002)
        time.sleep(random.uniform(0, 0.05))
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    assert not (tmp_path / "adapters" / "killed").exists(), "the run finished before the kill: nothing was tested"
    steps = [checkpoint.step_of(p) for p in checkpoint.complete(folder)]

    resumed = dpo.main(dpo_config(args, tmp_path, "output.name=killed", "resume=auto"))
    assert lora.read_meta(resumed)["training"]["resumed_from_step"] == steps[-1]
    a, b = load_file(str(reference / lora.ADAPTER_WEIGHTS)), load_file(str(resumed / lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dpo_adapter_goes_through_generate_eval_merge_export_serve_and_push(run_args, tmp_path, capsys):
    import openai

    from qtune.serve import ServerThread, create_app
    from qtune.serve.pool import AdapterPool

    out = str(dpo.main(dpo_config(run_args, tmp_path, "output.name=dpo")))
    pool = AdapterPool(lora.read_meta(out)["base"]["path"], quant="none")
    pool.add_folder(tmp_path / "adapters")
    with ServerThread(create_app(pool)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert "dpo" in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(model="dpo", messages=PAIRS[0]["prompt"], max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    cli_main(["generate", out, "--prompt", REVIEWS[0], "--max-new-tokens", "4"])
    cli_main(["eval", out, "--data", str(tmp_path / "prompts.jsonl")])
    cli_main(["merge", out, str(tmp_path / "merged"), "--dtype", "fp32"])
    cli_main(["export", out, "--format", "gguf-lora", str(tmp_path / "lora.gguf")])
    cli_main(["push", out, "me/dpo-adapter", "--dry-run", "--out", str(tmp_path / "staged")])
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "lora.gguf").stat().st_size > 0
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "DPO (direct preference optimization) on preference pairs (loss sigmoid; beta 0.1)" in card
    assert "- dpo" in card and "pairs.jsonl" in card and str(tmp_path) not in card


# ---------------------------------------------------------------- GRPO


def test_grpo_trains_with_reward_functions_and_scores_held_out_prompts(run_args, tmp_path):
    out = grpo.main(grpo_config(run_args, tmp_path, "output.name=grpo", "data.eval_fraction=0.25"))
    meta = lora.read_meta(out)
    assert meta["training"]["method"] == "grpo" and meta["training"]["group_size"] == 4
    assert {"reward", "reward/exact_answer", "reward/brevity", "accuracy", "answer_words"} <= set(meta["metrics"])
    assert meta["metrics"]["reward/brevity"] <= 0


@pytest.mark.parametrize(
    "rewards, message",
    [
        ("nowhere_at_all:f", "nowhere_at_all:f: the module does not import: ModuleNotFoundError"),
        ("recipes.rewards:nothing", "recipes.rewards has no function 'nothing'"),
        ("{file}:raises", "{file}:raises failed on the first 4 records: ZeroDivisionError"),
        ("{file}:too_few", "{file}:too_few must return a list of one float per completion: for 4 completions it"),
        ("{file}:not_a_number", "{file}:not_a_number returned 'high'"),
        ("{missing}:f", "no file {missing}"),
    ],
)
def test_a_reward_that_cannot_work_stops_the_run_before_the_model_loads(
    run_args, tmp_path, monkeypatch, rewards, message
):
    file = tmp_path / "my_rewards.py"
    file.write_text(
        "def raises(completions, **kw):\n    return [1 / 0 for _ in completions]\n"
        "def too_few(completions, **kw):\n    return [1.0]\n"
        "def not_a_number(completions, **kw):\n    return ['high' for _ in completions]\n"
    )
    fill = {"file": file, "missing": tmp_path / "missing.py"}
    monkeypatch.setattr(grpo.models, "load_base", no_model)
    with pytest.raises(ConfigError, match="grpo.rewards: ") as e:
        grpo.main(grpo_config(run_args, tmp_path, "output.name=x", f"grpo.rewards={rewards.format(**fill)}"))
    assert message.format(**fill) in str(e.value)


def test_grpo_batch_must_hold_whole_groups(run_args, tmp_path):
    with pytest.raises(ConfigError, match=r"must be a multiple of grpo.group_size \(4\)"):
        grpo.main(grpo_config(run_args, tmp_path, "output.name=x", "train.batch_size=6"))
    with pytest.raises(ConfigError, match="grpo.group_size must be at least 2"):
        grpo_config(run_args, tmp_path, "grpo.group_size=1")
