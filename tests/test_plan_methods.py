"""The plan of preference (DPO, KTO) and reward (GRPO) training against what trl 1.16's own trainers hold on a tiny
model: the rows a micro-batch trains, the tensors autograd saves, the LoRA weights (trl's bf16 cast and its frozen
reference copy), and GRPO's generation phase (the KV cache and the peak of `generate`). CPU, no network."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qtune.config import LoraConfig, ModelConfig, QuantConfig, RunConfig, TrainConfig
from qtune.lora import attach_lora
from qtune.models import load_base
from qtune.plan import GIB, PlanError, PlanInput, estimate, fit_to_vram, load_arch
from qtune.plan.methods import generation_bytes, kv_cache_bytes
from tests.test_plan import _peak_bytes

BATCH = 2
PAIRS = [
    {"prompt": "what is two plus two the answer is" * (1 + i % 3), "chosen": " four" * (2 + i), "rejected": " five" * 5}
    for i in range(4)
]


def _tiny(path, tokenizer, layers: int):
    """A tiny random Llama (GQA, every layout the plan models on CPU) with `tokenizer`, as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, chatml_tokenizer):
    made = {}

    def get(layers: int):
        if layers not in made:
            made[layers] = _tiny(tmp_path_factory.mktemp(f"tiny-{layers}"), chatml_tokenizer, layers)
        return made[layers]

    return get


def _policy(folder):
    """qtune's training model: the nf4 base (bf16 compute) with fresh LoRA r=8 on every linear layer."""
    base = load_base(
        folder, ModelConfig(name=str(folder), dtype="bf16"), QuantConfig(method="nf4"), train=TrainConfig()
    )
    return attach_lora(base, LoraConfig(r=8))


def _trainer(method: str, folder, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    common = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=BATCH,
        bf16=True,
        use_cpu=True,
        report_to="none",
        activation_checkpointing=False,  # (qtune switches checkpointing on itself, when asked)
    )
    if method == "dpo":
        args, cls, rows = DPOConfig(**common), DPOTrainer, PAIRS
    else:  # a pair file gives KTO one good and one bad record per pair
        args, cls = KTOConfig(**common, train_sampling_strategy="sequential"), KTOTrainer
        rows = [
            {"prompt": p["prompt"], "completion": p[answer], "label": answer == "chosen"}
            for p in PAIRS
            for answer in ("chosen", "rejected")
        ]
    return cls(model=_policy(folder), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _saved(trainer, step) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves while `step` runs (under the trainer's autocast)."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer.compute_loss_context_manager():
        step()
    return sum(saved.values())


def _lora_bytes(model) -> int:
    """Bytes of every LoRA weight the model holds: the trained adapter and trl's reference copy."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" in name)


# ------------------------------------------------------------------------------ DPO and KTO


def test_dpo_plan_matches_what_trls_dpo_step_saves(tiny, chatml_tokenizer, tmp_path):
    """A real DPOTrainer loss (policy with grad, reference without, on the same model) on tiny models of 1 and 2
    layers: chosen and rejected run as one batch of 2 x batch rows; one more layer saves what the plan's
    activations add for that batch (the reference forward saves nothing); trl's bf16 cast of the trained adapter
    and its fp32 reference copy are the plan's LoRA parameters, to the byte."""
    measured, seq = {}, None
    for layers in (1, 2):
        trainer = _trainer("dpo", tiny(layers), chatml_tokenizer, tmp_path)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 2 * BATCH and list(trainer.model.peft_config) == ["default", "ref"]
        seq = batch["input_ids"].shape[1]
        measured[layers] = _saved(trainer, lambda t=trainer, b=batch: t.compute_loss(t.model, b))
        plan = estimate(load_arch(str(tiny(layers))), PlanInput(seq=seq, batch=BATCH, lora_r=8, method="dpo"))
        assert plan.input.lora_dtype == "bf16" and plan.input.loss == "fused"
        assert plan.breakdown["LoRA parameters"] == _lora_bytes(trainer.model)
        assert plan.breakdown["LoRA gradients"] == plan.lora_params * 2  # bf16 gradients
        measured[layers, "plan"] = plan.breakdown["activations"]
    assert measured[2, "plan"] - measured[1, "plan"] == pytest.approx(measured[2] - measured[1], rel=0.02)


def test_kto_trains_its_batch_and_its_kl_and_reference_forwards_save_nothing(tiny, chatml_tokenizer, tmp_path):
    """A real KTOTrainer loss: `batch` completions with grad; the KL batch (each completion after a neighbour's
    prompt) and the reference run without grad, so the loss saves what the policy's forward alone saves (and the
    loss's per-example scalars)."""
    trainer = _trainer("kto", tiny(2), chatml_tokenizer, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == BATCH and "KL_input_ids" in batch
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    policy = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    alone = _saved(trainer, lambda: trainer.model(**policy, labels=labels, fused_lm_head=True))
    full = _saved(trainer, lambda: trainer.compute_loss(trainer.model, batch))
    assert alone <= full < alone + 1024  # and the loss's own per-example scalars
    plan = estimate(
        load_arch(str(tiny(2))), PlanInput(seq=batch["input_ids"].shape[1], batch=BATCH, lora_r=8, method="kto")
    )
    assert plan.breakdown["LoRA parameters"] == _lora_bytes(trainer.model)
    sft = estimate(
        load_arch(str(tiny(2))), PlanInput(seq=plan.input.seq, batch=BATCH, lora_r=8, loss="fused", lora_dtype="bf16")
    )
    assert plan.breakdown["activations"] == sft.breakdown["activations"]


def test_dpo_holds_twice_the_rows_of_kto():
    arch = load_arch("llama-3.1-8b")
    dpo, kto = (estimate(arch, PlanInput(seq=1024, batch=4, method=m)) for m in ("dpo", "kto"))
    rows8 = estimate(arch, PlanInput(seq=1024, batch=8, method="kto"))
    assert dpo.breakdown["activations"] == rows8.breakdown["activations"] > kto.breakdown["activations"]
    assert dpo.breakdown["KV cache"] == 0 and dpo.phases == {}
    assert dpo.breakdown["LoRA parameters"] == (2 + 4) * dpo.lora_params  # bf16 trained + fp32 reference copy


# ------------------------------------------------------------------------------ GRPO


def test_grpo_generation_phase_matches_trls_generate(tiny, chatml_tokenizer, tmp_path):
    """A real GRPOTrainer (beta > 0: trl copies the adapter as the reference) samples batch x grad_accum completions
    at once; its model.generate, as trl calls it, leaves the KV cache the plan books, to the byte, and peaks within
    5% of the plan's generation phase (CPU allocator, from the prefill)."""
    from datasets import Dataset
    from transformers import GenerationConfig
    from trl import GRPOConfig, GRPOTrainer

    batch, accum, group, gen, prompt = 4, 2, 4, 16, 48
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        num_generations=group,
        max_completion_length=gen,
        beta=0.04,
        bf16=True,
        use_cpu=True,
        report_to="none",
        activation_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=_policy(tiny(2)),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "hello how are you"}] * 8),
        processing_class=chatml_tokenizer,
    )
    rows = args.generation_batch_size
    assert rows == batch * accum
    arch = load_arch(str(tiny(2)))
    inp = PlanInput(
        seq=prompt + gen, batch=batch, grad_accum=accum, group_size=group, gen_tokens=gen, lora_r=8, method="grpo"
    )
    plan = estimate(arch, dataclasses.replace(inp, beta=0.04))
    assert plan.breakdown["LoRA parameters"] == _lora_bytes(trainer.model)

    torch.manual_seed(0)
    ids = torch.randint(6, len(chatml_tokenizer), (rows, prompt))
    mask = torch.ones_like(ids)
    mask[0, : prompt // 3] = 0  # trl left-pads the prompts
    ids[0, : prompt // 3] = chatml_tokenizer.pad_token_id
    config = GenerationConfig(**{**trainer.generation_config.to_dict(), "min_new_tokens": gen})
    config.return_dict_in_generate = True
    out = {}

    def generate():
        with torch.no_grad():
            out["generated"] = trainer.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    peak = _peak_bytes(generate)
    cache = out["generated"].past_key_values
    held = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
    assert out["generated"].sequences.shape == (rows, prompt + gen)
    assert held == kv_cache_bytes(arch, inp, rows, prompt + gen - 1)  # the last sampled token is never fed back
    assert sum(generation_bytes(arch, inp, 2).values()) == pytest.approx(peak, rel=0.05)


def test_grpo_trains_batch_completions_and_holds_the_group_factor():
    """--batch counts completions, as trl's per-device batch does: the training phase is the SFT micro-batch of those
    rows with logits at the sampled positions. A micro-batch of P prompts' groups holds G times the activations of
    an SFT micro-batch of the P prompts (the shared rotary cos/sin aside). The generation phase samples batch x
    grad_accum rows at once, so gradient accumulation grows it and not the training phase."""
    arch = load_arch("llama-3.1-8b")
    prompts, group, seq = 2, 4, 1024
    grpo = estimate(arch, PlanInput(seq=seq, batch=prompts * group, group_size=group, method="grpo"))
    sft = estimate(arch, PlanInput(seq=seq, batch=prompts, loss="fused", lora_dtype="bf16"))
    same_rows = estimate(
        arch, PlanInput(seq=seq, batch=prompts * group, loss="fused", lora_dtype="bf16", trained_tokens=32)
    )
    assert grpo.phases["training"] == same_rows.total and grpo.total == max(grpo.phases.values())
    rope = 2 * arch["head_dim"] * 2 * seq
    assert grpo.breakdown["activations"] - rope == group * (sft.breakdown["activations"] - rope)
    assert grpo.breakdown["logits and loss"] < sft.breakdown["logits and loss"]  # 32 sampled positions per row

    checkpointed = PlanInput(seq=seq, batch=prompts * group, method="grpo", gradient_checkpointing=True)
    one, accumulated = (estimate(arch, dataclasses.replace(checkpointed, grad_accum=n)) for n in (1, 8))
    assert accumulated.phases["training"] == one.phases["training"]
    assert accumulated.phases["generation"] > one.phases["generation"]
    assert one.phases["training"] > one.phases["generation"]
    assert accumulated.phases["generation"] > accumulated.phases["training"]  # 64 sampled rows at once
    # It peaks at the end of the prefill: the cache of 64 rows of 992 prompt tokens and the prefill's working set.
    assert accumulated.breakdown["KV cache"] == kv_cache_bytes(arch, accumulated.input, 64, seq - 32)
    assert accumulated.breakdown["LoRA gradients"] == 0  # set to None after each optimizer step
    assert "peak in the generation phase" in accumulated.format()
    reference = estimate(arch, PlanInput(seq=seq, batch=8, method="grpo", beta=0.04))
    assert reference.breakdown["LoRA parameters"] - grpo.breakdown["LoRA parameters"] == 4 * grpo.lora_params


def test_grpo_fit_to_vram_keeps_the_generation_batch():
    arch = load_arch("llama-3.1-8b")
    wanted = PlanInput(seq=1024, batch=16, method="grpo")
    micro, accum = fit_to_vram(arch, wanted, 16 * GIB)
    assert micro.batch * accum == 16 and micro.grad_accum == accum and estimate(arch, micro).fits
    uneven = estimate(arch, PlanInput(seq=512, batch=6, method="grpo"))
    assert any("multiple of --group-size 4" in note for note in uneven.notes)


# ------------------------------------------------------------------------------ config, CLI, errors


def test_from_config_picks_the_method():
    cfg = RunConfig()
    assert PlanInput.from_config(cfg, seq=512, batch=4).method == "sft"
    dpo = dataclasses.replace(cfg, recipe="dpo")
    assert PlanInput.from_config(dpo, seq=512, batch=4).method == "dpo"
    kto = dataclasses.replace(dpo, dpo=dataclasses.replace(cfg.dpo, loss="kto"))
    assert PlanInput.from_config(kto, seq=512, batch=4).method == "kto"
    grpo = dataclasses.replace(
        cfg,
        recipe="grpo",
        grpo=dataclasses.replace(cfg.grpo, group_size=8, max_new_tokens=64, beta=0.04),
        train=dataclasses.replace(cfg.train, grad_accum=2),
    )
    inp = PlanInput.from_config(grpo, seq=512, batch=8)
    assert (inp.method, inp.group_size, inp.gen_tokens, inp.beta, inp.grad_accum) == ("grpo", 8, 64, 0.04, 2)
    assert cfg.train.chunked_loss and inp.loss == "fused" and inp.lora_dtype == "bf16"  # trl's fused head and cast
    unquantized = dataclasses.replace(dpo, quant=dataclasses.replace(cfg.quant, method="none"))
    assert PlanInput.from_config(unquantized, seq=512, batch=4).lora_dtype == "fp32"  # trl casts only a 4/8-bit base


def test_cli_plan_method_flags(capsys):
    from qtune.cli import main

    main(["plan", "llama-3.1-8b", "--method", "dpo", "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert (shown["input"]["method"], shown["input"]["loss"], shown["input"]["lora_dtype"]) == ("dpo", "fused", "bf16")
    expected = PlanInput(seq=1024, batch=8, method="dpo")
    assert shown["breakdown"] == estimate(load_arch("llama-3.1-8b"), expected).breakdown
    main(["plan", "llama-3.1-8b", "--method", "grpo", "--group-size", "8", "--gen-tokens", "64", "--grad-accum", "2"])
    text = capsys.readouterr().out
    assert "method: grpo: --batch counts completions (8 per prompt); generation: 8 x 2 = 16 rows of 960" in text
    assert "KV cache" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "dpo", "--chunked-loss", "on"], "error: --method dpo runs trl's fused LM head, not the chunked"),
        (["--method", "grpo", "--trained-tokens", "8"], "error: --trained-tokens: GRPO trains the sampled completions"),
        (["--method", "ppo"], "argument --method: invalid choice: 'ppo'"),
        (["--method", "grpo", "--group-size", "1"], "error: --group-size must be at least 2"),
        (["--method", "grpo", "--beta", "-1"], "error: --beta must be a number >= 0, got -1.0"),
    ],
)
def test_cli_plan_method_errors(capsys, argv, message):
    from qtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "llama-3.1-8b", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_plan_input_method_errors_name_the_flag():
    with pytest.raises(PlanError, match=r"^--method must be one of sft, dpo, kto, grpo; got 'ppo'$"):
        PlanInput(method="ppo")
    with pytest.raises(PlanError, match=r"^--gen-tokens must be a positive integer, got 0$"):
        PlanInput(method="grpo", gen_tokens=0)
    with pytest.raises(PlanError, match=r"^--lora-dtype must be one of fp32, bf16; got 'fp8'$"):
        PlanInput(lora_dtype="fp8")
    assert PlanInput(method="kto", batch=1).batch == 1  # trl refuses it; the plan says so
    assert any("--batch >= 2" in n for n in estimate(load_arch("llama-2-7b"), PlanInput(method="kto", batch=1)).notes)
