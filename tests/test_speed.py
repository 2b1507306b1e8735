"""The speed work changes how qtune computes, never what it learns: padding-free packing, the
trained-positions loss, length-grouped batches, padding to a multiple, checkpointing; each on and off
on a tiny random Llama (fp32)."""

import json
from pathlib import Path

import pytest
import torch

from qtune.config import load_config
from qtune.train import NonFiniteGuard, trained_positions_loss
from recipes import sft
from tests.conftest import tiny_run

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"review {i}: " + "the movie was " * (1 + i % 4) + w},
            {"role": "assistant", "content": "positive" if w in ("great", "wonderful") else "negative"},
        ]
    }
    for i, w in enumerate(["great", "boring", "great", "terrible", "wonderful", "dull", "great", "boring"] * 2)
]


def test_packed_and_padded_sequences_have_equal_per_sequence_losses(tiny_model_dir):
    """Three sequences of different lengths: one padding-free row with restarting position_ids gives the
    same per-token log-probabilities as each sequence alone (no attention across the boundaries)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(6, model.config.vocab_size, (n,), generator=g) for n in (7, 12, 4)]

    def token_logp(logits, ids):
        return logits[:-1].log_softmax(-1).gather(-1, ids[1:, None]).squeeze(-1)

    with torch.no_grad():
        alone = [token_logp(model(input_ids=s[None], use_cache=False).logits[0], s) for s in seqs]
        packed = torch.cat(seqs)[None]
        positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        # Without a cache, as in training: transformers reads packed sequences from position_ids only then.
        logits = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        leaky = model(input_ids=packed, use_cache=False).logits[0]  # no position_ids: one long sequence
    starts = [0, 7, 19, 23]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(token_logp(logits[starts[i] : starts[i + 1]], s), alone[i], rtol=1e-5, atol=1e-5)
    second = token_logp(leaky[7:19], seqs[1])
    assert not torch.allclose(second, alone[1], atol=1e-3)  # the check above can fail


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_trained_positions_loss_equals_cross_entropy_and_its_gradient(chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 50, generator=g, dtype=torch.float64).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (10,), generator=g)
    loss, entropy, hits = trained_positions_loss(logits, targets, chunk_rows)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits, targets, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad.float(), ref_logits.grad.to(torch.bfloat16).float())
    logp = ref_logits.detach().log_softmax(-1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum())
    assert hits == (ref_logits.argmax(-1) == targets).sum()


@pytest.fixture()
def speed_cfg(tmp_path, tiny_model_dir):
    make = tiny_run(
        tmp_path,
        tiny_model_dir,
        ROWS,
        "train.max_steps=8",
        "train.lr=1e-2",
        "train.logging_steps=1",
        "train.save_every=0",
    )
    return lambda *overrides: make(f"output.name=run-{len(list(tmp_path.glob('adapters/*')))}", *overrides)


def _losses(cfg) -> list[float]:
    from qtune.lora import read_meta

    out = sft.main(cfg)
    return [point[1] for point in read_meta(out)["training"]["loss_curve"]]


@pytest.mark.parametrize(
    "switch", ["train.padding_free", "train.chunked_loss", "train.group_by_length", "train.gradient_checkpointing"]
)
def test_each_speed_switch_leaves_the_loss_curve_unchanged(speed_cfg, switch):
    """8 steps with qtune's defaults against the same run with one switch flipped: the same losses."""
    from qtune.config import TrainConfig

    default = getattr(TrainConfig(), switch.split(".")[1])
    reference = _losses(speed_cfg())
    flipped = _losses(speed_cfg(f"{switch}={not default}"))
    assert len(reference) == len(flipped) == 8
    if switch == "train.group_by_length":  # a different data order: the same data, so losses close, not equal
        assert abs(sum(reference) - sum(flipped)) / sum(reference) < 0.25
    else:
        torch.testing.assert_close(torch.tensor(flipped), torch.tensor(reference), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding_free", [False, True])
def test_batches_are_padded_to_the_multiple_and_learn_the_same(speed_cfg, tmp_path, tiny_model_dir, padding_free):
    """train.pad_to_multiple_of (default 8) rounds every micro-batch's length up; the extra padding is
    masked, so 0 (no rounding) and 64 (every batch one shape) log the defaults' losses."""
    from qtune import data, models, train

    cfg = speed_cfg(f"train.padding_free={padding_free}")
    tokenizer = models.load_tokenizer(tiny_model_dir)
    examples, _ = data.load_examples(cfg.data.train, tokenizer, cfg.data)
    model = models.load_base(tiny_model_dir, cfg.model, cfg.quant, cfg.train)
    trainer = train.build_sft_trainer(model, tokenizer, data.to_dataset(examples), cfg, tmp_path / "ck")
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples[:3]]
    batch = trainer.data_collator(rows)
    real = sum(len(r["input_ids"]) for r in rows) if padding_free else max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape[1] % 8 == 0 and real <= batch["input_ids"].shape[1] < real + 8
    assert real % 8 != 0  # so the rounding above did something
    reference = _losses(speed_cfg(f"train.padding_free={padding_free}"))
    for multiple in (0, 64):
        losses = _losses(speed_cfg(f"train.padding_free={padding_free}", f"train.pad_to_multiple_of={multiple}"))
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-4, atol=1e-5)


def test_trained_positions_loss_under_gradient_accumulation(speed_cfg):
    """2 micro-batches of 2 per step: the same normaliser (tokens of the whole step) as trl's own loss."""
    reference = _losses(speed_cfg("train.batch_size=2", "train.grad_accum=2", "train.chunked_loss=false"))
    chunked = _losses(speed_cfg("train.batch_size=2", "train.grad_accum=2"))
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(reference), rtol=1e-4, atol=1e-5)


def test_nonfinite_guard_finds_the_rows_of_a_padding_free_batch():
    import datasets

    dataset = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9], [5, 6]], "row": [3, 9, 12]})
    guard = NonFiniteGuard("stop", dataset)
    guard.saw({"input_ids": torch.tensor([[8, 9, 5, 6]]), "position_ids": torch.tensor([[0, 1, 0, 1]])}, False)
    assert guard.rows() == [9, 12]
    guard._batches.clear()
    padded = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    guard.saw(padded, False)
    assert guard.rows() == [3, 9]


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "smollm2_sentiment.yaml"


def _demo_trainer(tmp_path, tiny_model_dir):
    """The demo config's trainer (nf4, bf16, chunked loss, padding to 8, every 2nd layer recomputed), tiny Llama."""
    from qtune import data, lora, models, train

    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config(
        DEMO_CONFIG,
        [f"model.name={tiny_model_dir}", f"data.train={rows}", "data.eval=null", "train.max_steps=2"]
        + ["train.batch_size=4", "train.grad_accum=2", "train.save_every=0", f"output.dir={tmp_path}"],
    )
    tokenizer = models.load_tokenizer(tiny_model_dir)
    examples, _ = data.load_examples(cfg.data.train, tokenizer, cfg.data)
    model = lora.attach_lora(models.load_base(tiny_model_dir, cfg.model, cfg.quant, cfg.train), cfg.lora)
    return train.build_sft_trainer(model, tokenizer, data.to_dataset(examples), cfg, tmp_path / "ck"), cfg


def test_the_demo_setup_takes_the_trained_positions_loss_on_every_micro_batch(tmp_path, tiny_model_dir, capsys):
    """The loss-curve tests above compare with trl's own loss, so they pass whether or not qtune's fast path runs;
    this one fails as soon as one of the demo's training steps goes to trl's loss instead."""
    trainer, cfg = _demo_trainer(tmp_path, tiny_model_dir)
    assert cfg.quant.method == "nf4" and cfg.train.chunked_loss and cfg.train.checkpoint_every == 2
    trainer.train()
    assert trainer.qtune_fast_steps == cfg.train.max_steps * cfg.train.grad_accum
    assert "trl's own" not in capsys.readouterr().out


def test_a_trl_without_the_internals_the_loss_reads_falls_back_to_its_own_loss_and_says_so(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    from qtune.train import hooks

    monkeypatch.setattr(hooks, "TRL_INTERNALS", (*hooks.TRL_INTERNALS, "_renamed_in_a_new_trl"))
    trainer, _ = _demo_trainer(tmp_path, tiny_model_dir)
    assert "has no _renamed_in_a_new_trl" in capsys.readouterr().out and not trainer.qtune_chunked_loss
    result = trainer.train()
    assert trainer.qtune_fast_steps == 0 and result.training_loss == result.training_loss  # trl's loss, finite
