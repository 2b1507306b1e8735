"""The VRAM planner: exact weight bytes against what transformers + bitsandbytes load, activation
bytes against what autograd saves, and the planner's inputs, errors, search and fitting."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qtune.config import LoraConfig, ModelConfig, QuantConfig, TrainConfig
from qtune.lora import attach_lora
from qtune.models import load_base
from qtune.plan import (
    BUILTIN,
    COMPONENTS,
    GIB,
    MIB,
    PlanError,
    PlanInput,
    estimate,
    fit_to_vram,
    load_arch,
    parse_bytes,
    quant_constant_bytes,
    weight_bytes,
)
from qtune.plan.memory import _layer_activations
from tests.conftest import tiny_run

# Tiny decoders of every supported layout; shapes need no special multiples for bitsandbytes
# (4-bit packs the flattened weight, padding an odd count) but are kept round anyway.
TINY = {
    "llama": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),  # q, k, v biases
    "phi3": ("phi3", {}),  # fused qkv_proj and gate_up_proj
    "gemma2": ("gemma2", {"head_dim": 48}),  # tied, 4 norms, head_dim != hidden / heads, embed_scale buffer
}
QUANT_CASES = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int8", False), ("none", False)]


def _save_tiny(path, model_type: str, layers: int, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of tiny random models, keyed (variant, layers), written once per module."""
    made = {}

    def get(variant: str, layers: int = 2):
        if (variant, layers) not in made:
            model_type, extra = TINY[variant]
            folder = tmp_path_factory.mktemp(f"{variant}-{layers}")
            made[variant, layers] = _save_tiny(folder, model_type, layers, **extra)
        return made[variant, layers]

    return get


def _load(folder, quant: str, double_quant: bool, dtype: str = "bf16", **kwargs):
    return load_base(
        folder,
        ModelConfig(name=str(folder), dtype=dtype),
        QuantConfig(method=quant, double_quant=double_quant),
        **kwargs,
    )


def _quant_state_bytes(model) -> int:
    """Bytes of every distinct quantization-constant tensor bitsandbytes keeps outside parameters."""
    import bitsandbytes as bnb

    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        tensors = []
        if isinstance(weight, bnb.nn.Params4bit):
            qs = weight.quant_state
            tensors = [qs.absmax, qs.code, qs.offset]
            if qs.state2 is not None:
                tensors += [qs.state2.absmax, qs.state2.code]
        elif isinstance(weight, bnb.nn.Int8Params):
            tensors = [weight.SCB]
        for t in tensors:
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.nelement() * t.element_size()
    return sum(seen.values())


# ------------------------------------------------------------------------------ exact weights


@pytest.mark.parametrize("variant", list(TINY))
def test_weight_bytes_equal_get_memory_footprint_exactly(tiny, variant):
    folder = tiny(variant)
    arch = load_arch(str(folder))
    for quant, double_quant in QUANT_CASES:
        model = _load(folder, quant, double_quant)
        assert weight_bytes(arch, quant, double_quant, "bf16") == model.get_memory_footprint(), (quant, double_quant)
        # The constants get_memory_footprint leaves out are the quant_state / SCB tensors, to the byte.
        assert quant_constant_bytes(arch, quant, double_quant) == _quant_state_bytes(model), (quant, double_quant)


def test_weight_bytes_follow_the_load_dtype(tiny):
    folder = tiny("gemma2")
    arch = load_arch(str(folder))
    for quant in ("nf4", "none"):
        model = _load(folder, quant, True, dtype="fp32")
        assert weight_bytes(arch, quant, True, "fp32") == model.get_memory_footprint()


def test_double_quant_changes_the_true_storage_not_the_reported_footprint(tiny):
    arch = load_arch(str(tiny("llama")))
    assert weight_bytes(arch, "nf4", True, "bf16") == weight_bytes(arch, "nf4", False, "bf16")
    # On tiny layers the nested 256-entry code table (1 KiB per weight) outweighs the savings.
    assert quant_constant_bytes(arch, "nf4", True) > quant_constant_bytes(arch, "nf4", False)
    big = load_arch("llama-2-7b")
    assert quant_constant_bytes(big, "nf4", True) < quant_constant_bytes(big, "nf4", False)
    # QLoRA paper (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): NF4 is 4.5 bits per weight,
    # ~4.127 with double quantization.
    linear = 4 * 4096 * 4096 + 3 * 4096 * 11008
    bits = [8 * (linear // 2 + quant_constant_bytes(big, "nf4", dq) / 32) / linear for dq in (False, True)]
    assert bits[0] == pytest.approx(4.5, abs=0.01) and bits[1] == pytest.approx(4.127, abs=0.01)


def test_weight_components_match_qtunes_training_model_and_peft_kbit_preparation(tiny):
    """qtune's training path keeps the non-quantized weights in the compute dtype; peft's
    prepare_model_for_kbit_training (PlanInput.upcast_kbit) casts them to fp32. The plan's two
    weight components add up to each model's footprint."""
    from peft import prepare_model_for_kbit_training

    folder = tiny("llama-tied-bias")
    arch = load_arch(str(folder))
    kept = estimate(arch, PlanInput(seq=64, lora_r=8))
    model = _load(folder, "nf4", True, train=TrainConfig())
    assert {p.dtype for p in model.parameters() if p.dtype.is_floating_point} == {torch.bfloat16}
    assert kept.breakdown["quantized weights"] + kept.breakdown["16-bit weights"] == model.get_memory_footprint()
    assert kept.reported_weights == weight_bytes(arch, "nf4", True, "bf16")
    upcast = estimate(arch, PlanInput(seq=64, lora_r=8, upcast_kbit=True))
    prepared = prepare_model_for_kbit_training(_load(folder, "nf4", True), use_gradient_checkpointing=False)
    assert upcast.breakdown["quantized weights"] + upcast.breakdown["16-bit weights"] == prepared.get_memory_footprint()
    assert upcast.breakdown["16-bit weights"] > kept.breakdown["16-bit weights"]


# ------------------------------------------------------------------------------ LoRA parameters


def test_lora_params_of_llama2_7b_r16_all_linear_match_the_published_count():
    plan = estimate(load_arch("llama-2-7b"), PlanInput(lora_r=16, targets="all-linear"))
    assert plan.lora_params == 39_976_960  # PEFT's print_trainable_parameters() for this config
    assert plan.breakdown["optimizer states"] == 8 * 39_976_960  # AdamW: two fp32 states (320 MB)


@pytest.mark.parametrize(
    ("variant", "targets"), [("llama", "all-linear"), ("llama", ["q_proj", "v_proj"]), ("phi3", "all-linear")]
)
def test_lora_params_equal_peft_trainable_params(tiny, variant, targets):
    folder = tiny(variant)
    model = attach_lora(_load(folder, "nf4", True), LoraConfig(r=8, targets=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(load_arch(str(folder)), PlanInput(lora_r=8, targets=targets)).lora_params == trainable


# ------------------------------------------------------------------------------ activations


def _saved_bytes(folder, quant: str, checkpointing: bool, targets, batch: int, seq: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one forward (trl's autocast)."""
    model = _load(
        folder,
        quant,
        True,
        train=TrainConfig(
            gradient_checkpointing=bool(checkpointing),
            checkpoint_every=1 if isinstance(checkpointing, bool) else checkpointing,
        ),
    )
    model = attach_lora(model, LoraConfig(r=8, targets=targets))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)
    ids = torch.randint(3, 512, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, : seq // 4] = 0  # a padded micro-batch when batch > 1: the case the plan assumes
    if batch == 1:
        mask[:] = 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("variant", "quant", "checkpointing", "targets", "batch"),
    [
        ("llama", "nf4", False, "all-linear", 1),
        ("llama", "nf4", False, "all-linear", 2),
        ("llama", "nf4", True, "all-linear", 1),
        ("llama", "nf4", 2, "all-linear", 1),
        ("llama", "none", False, ["q_proj", "v_proj"], 1),
        ("phi3", "nf4", False, "all-linear", 2),
        ("gemma2", "nf4", False, "all-linear", 1),
    ],
)
def test_activation_model_matches_what_autograd_saves_per_layer(tiny, variant, quant, checkpointing, targets, batch):
    """One more decoder layer adds what the plan says it adds (activations, plus the 16-bit
    autocast copies of the LoRA weights, which the plan books under LoRA parameters).
    `checkpointing` 2: every second layer is checkpointed; 4 layers against 2 add one checkpointed
    layer (its input) and one that keeps everything."""
    seq = 64
    small, large = (2, 4) if checkpointing not in (True, False) else (1, 2)
    measured = _saved_bytes(tiny(variant, large), quant, checkpointing, targets, batch, seq) - _saved_bytes(
        tiny(variant, small), quant, checkpointing, targets, batch, seq
    )
    every = 1 if isinstance(checkpointing, bool) else checkpointing
    inp = PlanInput(
        seq=seq,
        batch=batch,
        quant=quant,
        lora_r=8,
        targets=targets,
        gradient_checkpointing=bool(checkpointing),
        checkpoint_every=every,
    )
    one, two = (estimate(load_arch(str(tiny(variant, n))), inp) for n in (small, large))
    copies = (two.breakdown["LoRA parameters"] - 4 * two.lora_params) - (
        one.breakdown["LoRA parameters"] - 4 * one.lora_params
    )
    if checkpointing is True:
        copies = 0  # the copies are made again while recomputing; none are kept per layer
    predicted = two.breakdown["activations"] - one.breakdown["activations"] + copies
    assert predicted == pytest.approx(measured, rel=0.02)


# ------------------------------------------------------------------------------ planner behaviour


def test_checkpointing_every_kth_layer_plans_between_none_and_all():
    """Backward frees the layers above the one it recomputes: with k >= L (only layer 0 checkpointed) the
    plan is still below no checkpointing, and k = 2 lies between all layers and none."""
    arch = load_arch("llama-2-7b")

    def activations(**kw):
        return estimate(arch, PlanInput(seq=2048, **kw)).breakdown["activations"]

    off, every = activations(gradient_checkpointing=False), activations(gradient_checkpointing=True)
    half = activations(gradient_checkpointing=True, checkpoint_every=2)
    assert every < half < off
    assert all(activations(gradient_checkpointing=True, checkpoint_every=k) < off for k in (32, 64))
    # 32 layers, k = 2: layers 0, 2, ..., 30 keep their inputs, the 16 others everything; layer 31 is not
    # checkpointed, so at the start of backward no layer is being recomputed while those 16 are all held.
    full = _layer_activations(arch, PlanInput(seq=2048), upcast=False)
    layer_input = 2048 * arch["hidden_size"] * 2
    assert off - half == 16 * (full - layer_input)
    assert half - every == 15 * full - 16 * layer_input


def test_monotone_in_sequence_batch_and_checkpointing():
    arch = load_arch("llama-3.1-8b")
    plans = [estimate(arch, PlanInput(seq=s)) for s in (512, 1024, 2048, 4096)]
    assert all(a.total < b.total for a, b in zip(plans, plans[1:]))
    assert all(a.breakdown["activations"] < b.breakdown["activations"] for a, b in zip(plans, plans[1:]))
    assert estimate(arch, PlanInput(batch=1)).total < estimate(arch, PlanInput(batch=2)).total
    on, off = (estimate(arch, PlanInput(seq=2048, gradient_checkpointing=gc)) for gc in (True, False))
    assert on.breakdown["activations"] < off.breakdown["activations"]
    assert on.breakdown["logits and loss"] == off.breakdown["logits and loss"]


def test_quantization_and_optimizer_choices_order_as_expected():
    arch = load_arch("mistral-7b")
    weights = {
        q: sum(estimate(arch, PlanInput(quant=q)).breakdown[k] for k in COMPONENTS[:3]) for q in ("nf4", "int8", "none")
    }
    assert weights["nf4"] < weights["int8"] < weights["none"]
    states = {o: estimate(arch, PlanInput(optim=o)).breakdown["optimizer states"] for o in ("adamw", "adamw8bit")}
    assert states["adamw8bit"] < states["adamw"] / 3
    assert estimate(arch, PlanInput(lora_r=8)).lora_params * 2 == estimate(arch, PlanInput(lora_r=16)).lora_params


def test_builtin_plans_need_no_network(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise AssertionError("the planner reached for the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for name in BUILTIN:
        plan = estimate(load_arch(name), PlanInput(vram=24 * GIB))
        assert set(plan.breakdown) == set(COMPONENTS) and all(v >= 0 for v in plan.breakdown.values())
        assert plan.total > plan.reported_weights
    assert load_arch("meta-llama/Llama-2-7b-hf") == load_arch("llama-2-7b")
    assert load_arch("HuggingFaceTB/SmolLM2-135M-Instruct")["hidden_size"] == 576


def test_max_seq_and_max_batch_are_the_edges_of_what_fits():
    arch = load_arch("llama-3.1-8b")
    plan = estimate(arch, PlanInput(seq=2048, batch=1, vram=24 * GIB))
    assert plan.max_seq and plan.max_batch
    at, past = (estimate(arch, PlanInput(seq=n, vram=24 * GIB)) for n in (plan.max_seq, plan.max_seq + 1))
    assert at.fits and not past.fits
    at, past = (
        estimate(arch, PlanInput(seq=2048, batch=n, vram=24 * GIB)) for n in (plan.max_batch, plan.max_batch + 1)
    )
    assert at.fits and not past.fits
    tight = estimate(arch, PlanInput(quant="none", vram=8 * GIB))
    assert tight.fits is False and tight.max_seq == 0 and tight.max_batch == 0
    assert estimate(arch, PlanInput()).fits is None and estimate(arch, PlanInput()).max_seq is None


def test_to_dict_is_json_and_format_names_every_component():
    plan = estimate(load_arch("qwen2.5-7b"), PlanInput(seq=1024, vram=parse_bytes("16GB")))
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["total"] == plan.total == sum(data["breakdown"].values()) and data["fits"] == plan.fits
    text = plan.format()
    assert all(name in text for name in COMPONENTS) and "16.00 GiB" in text and "longest seq" in text


def test_fit_to_vram_keeps_the_effective_batch_and_prefers_no_checkpointing():
    small = load_arch("smollm2-135m")
    micro, accum = fit_to_vram(small, PlanInput(seq=512, batch=4), 24 * GIB)
    assert (micro.batch, accum, micro.gradient_checkpointing, micro.vram) == (4, 1, False, 24 * GIB)

    arch = load_arch("llama-3.1-8b")
    micro, accum = fit_to_vram(arch, PlanInput(seq=2048, batch=8), 16 * GIB)
    assert micro.batch * accum == 8 and estimate(arch, micro).fits
    if micro.gradient_checkpointing:  # checkpointing only when no micro-batch fits without it
        assert not estimate(arch, dataclasses.replace(micro, batch=1, gradient_checkpointing=False)).fits
    else:  # and the largest divisor of 8 that fits
        bigger = [d for d in (2, 4, 8) if d > micro.batch]
        assert all(not estimate(arch, dataclasses.replace(micro, batch=d)).fits for d in bigger)


def test_fit_to_vram_turns_checkpointing_on_when_it_must():
    arch = load_arch("llama-3.1-8b")
    micro, accum = fit_to_vram(arch, PlanInput(seq=4096, batch=2), 24 * GIB)
    assert micro.gradient_checkpointing and (micro.batch, accum) == (2, 1)
    assert not estimate(arch, dataclasses.replace(micro, batch=1, gradient_checkpointing=False)).fits
    micro, accum = fit_to_vram(arch, PlanInput(seq=8192, batch=2), 24 * GIB)
    assert micro.gradient_checkpointing and (micro.batch, accum) == (1, 2)
    assert not estimate(arch, dataclasses.replace(micro, batch=2)).fits


def test_fit_to_vram_says_the_longest_sequence_that_would_fit():
    arch = load_arch("llama-3.1-8b")
    with pytest.raises(PlanError, match=r"^--seq 65536: even micro-batch 1 with gradient checkpointing") as e:
        fit_to_vram(arch, PlanInput(seq=65536), 12 * GIB)
    longest = int(str(e.value).rsplit("is ", 1)[1].split(" tokens")[0].replace(",", ""))
    frugal = PlanInput(gradient_checkpointing=True, vram=12 * GIB)
    assert estimate(arch, dataclasses.replace(frugal, seq=longest)).fits
    assert not estimate(arch, dataclasses.replace(frugal, seq=longest + 1)).fits
    with pytest.raises(PlanError, match="does not fit even at seq 1"):
        fit_to_vram(arch, PlanInput(quant="none"), 8 * GIB)
    with pytest.raises(PlanError, match="^--vram must be a positive number of bytes, got 0$"):
        fit_to_vram(arch, PlanInput(), 0)


# ------------------------------------------------------------------------------ inputs and errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GB", 8 * GIB),
        ("8 GB", 8 * GIB),
        ("8G", 8 * GIB),
        ("8gb", 8 * GIB),
        ("8GiB", 8 * GIB),
        ("8192MiB", 8 * GIB),
        ("24000MB", 24000 * MIB),
        ("8", 8 * GIB),
        ("7.5", 7 * GIB + GIB // 2),
        ("512 mib", 512 * MIB),
        ("1T", 1024 * GIB),
        ("4096B", 4096),
    ],
)
def test_parse_bytes_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["8 potatoes", "", "GB", "8 GB GB", "eight"])
def test_parse_bytes_unreadable(text):
    with pytest.raises(PlanError, match=rf"^--vram: cannot read '{text}'; use e.g. 8GB, 8G, 8192MiB$"):
        parse_bytes(text)


@pytest.mark.parametrize("text", ["0", "-8GB", "0 GiB", "0.1B"])
def test_parse_bytes_not_positive(text):
    with pytest.raises(PlanError, match=rf"^--vram must be a positive size, got '{text}'$"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq": 0}, "--seq must be a positive integer, got 0"),
        ({"seq": 2.5}, "--seq must be a positive integer, got 2.5"),
        ({"batch": -1}, "--batch must be a positive integer, got -1"),
        ({"lora_r": 0}, "--lora-r must be a positive integer, got 0"),
        ({"quant": "q4"}, "--quant must be one of nf4, fp4, int8, none; got 'q4'"),
        ({"optim": "sgd"}, "--optim must be one of adamw, adamw8bit, paged_adamw8bit; got 'sgd'"),
        ({"dtype": "fp8"}, "--dtype must be one of bf16, fp16, fp32; got 'fp8'"),
        ({"targets": []}, "--targets is empty: use 'all-linear' or name at least one module, e.g. q_proj,v_proj"),
        ({"targets": " , "}, "--targets is empty: use 'all-linear' or name at least one module, e.g. q_proj,v_proj"),
        ({"vram": 0}, "--vram must be a positive number of bytes, got 0"),
        ({"vram": "8GB"}, "--vram must be a positive number of bytes, got '8GB'"),
        ({"gradient_checkpointing": "yes"}, "--gradient-checkpointing must be true or false, got 'yes'"),
        ({"checkpoint_every": 0}, "--checkpoint-every must be a positive integer, got 0"),
    ],
)
def test_plan_input_errors_name_the_flag(kwargs, message):
    with pytest.raises(PlanError) as e:
        PlanInput(**kwargs)
    assert str(e.value) == message


def test_targets_accept_a_comma_list_and_reject_unknown_modules():
    assert PlanInput(targets="q_proj, v_proj").targets == ["q_proj", "v_proj"]
    with pytest.raises(PlanError, match=r"^--targets: no module named gate_proj in phi-3-mini \(phi3\); choose from"):
        estimate(load_arch("phi-3-mini"), PlanInput(targets=["qkv_proj", "gate_proj"]))
    head = estimate(load_arch("llama-2-7b"), PlanInput(targets=["q_proj", "lm_head"], lora_r=8)).lora_params
    assert head == 32 * 8 * (4096 + 4096) + 8 * (4096 + 32000)


def test_weight_bytes_reject_unknown_quant_and_dtype():
    arch = load_arch("llama-2-7b")
    with pytest.raises(PlanError, match="^--quant must be one of"):
        weight_bytes(arch, "nf3", True, "bf16")
    with pytest.raises(PlanError, match="^--dtype must be one of"):
        weight_bytes(arch, "nf4", True, "float16")


def test_unknown_models_are_explained(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(PlanError) as e:
        load_arch("nobody/nothing-7b")
    assert str(e.value).startswith("--model: unknown architecture 'nobody/nothing-7b': not built in (llama-2-7b, ")
    assert str(e.value).endswith("not a folder with config.json, the hub is not reachable (OSError)")
    with pytest.raises(PlanError, match="not a hub id like org/name$"):
        load_arch("llama-9b")
    with pytest.raises(PlanError, match="the folder has no config.json"):
        load_arch(str(tmp_path))

    def write(config):
        (tmp_path / "config.json").write_text(json.dumps(config))
        return str(tmp_path)

    with pytest.raises(
        PlanError, match=r"model_type 'gpt2' has no integer hidden_size, intermediate_size, num_hidden_layers"
    ):
        load_arch(write({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "vocab_size": 50257}))
    llama_like = {**BUILTIN["smollm2-135m"], "model_type": "granite"}
    with pytest.raises(PlanError, match=r"mixture-of-experts models \(num_local_experts\) are not supported"):
        load_arch(write({**llama_like, "num_local_experts": 8}))
    with pytest.raises(PlanError, match="not a multiple of num_key_value_heads"):
        load_arch(write({**llama_like, "num_key_value_heads": 4}))
    plan = estimate(load_arch(write(llama_like)), PlanInput())
    assert any("treated as llama-like" in note for note in plan.notes)


# ------------------------------------------------------------------------------ the real model


@pytest.mark.integration
def test_embedded_smollm2_nf4_footprint_is_exact(tmp_path, monkeypatch):
    import os

    from qtune.models import ensure_embedded_model

    monkeypatch.setenv("QTUNE_HOME", os.environ.get("QTUNE_TEST_HOME", str(tmp_path / "qtune-home")))
    folder = ensure_embedded_model()
    arch = load_arch(str(folder))
    sizing = [k for k in BUILTIN["smollm2-135m"] if k != "max_position_embeddings"]
    assert {k: arch[k] for k in sizing} == {k: load_arch("smollm2-135m")[k] for k in sizing}
    model = _load(folder, "nf4", True)
    assert weight_bytes(arch, "nf4", True, "bf16") == model.get_memory_footprint()
    assert quant_constant_bytes(arch, "nf4", True) == _quant_state_bytes(model)


def test_data_parallel_and_fsdp_plans_are_per_gpu():
    arch = load_arch("llama-2-7b")
    one = estimate(arch, PlanInput(seq=2048))
    ddp = estimate(arch, PlanInput(seq=2048, gpus=2, sharding="ddp"))
    fsdp2 = estimate(arch, PlanInput(seq=2048, gpus=2, sharding="fsdp"))
    fsdp4 = estimate(arch, PlanInput(seq=2048, gpus=4, sharding="fsdp"))
    # DDP: a full copy per GPU, plus the gradient buckets (one more copy of the LoRA gradients).
    assert ddp.breakdown["data-parallel buffers"] == one.breakdown["LoRA gradients"] > 0
    assert ddp.total > one.total
    # FSDP: weights, gradients and optimizer states split; activations are per GPU and stay.
    for key in ("quantized weights", "optimizer states", "LoRA gradients"):
        assert fsdp2.breakdown[key] == -(-one.breakdown[key] // 2)
        assert fsdp4.breakdown[key] == -(-one.breakdown[key] // 4)
    assert fsdp2.breakdown["activations"] == one.breakdown["activations"]
    assert one.total > fsdp2.total > fsdp4.total
    # The gathered units (embeddings + lm_head + two layers) are counted: 4 GPUs save less than 4x.
    assert fsdp4.breakdown["data-parallel buffers"] > one.breakdown["16-bit weights"]
    assert estimate(arch, PlanInput(seq=2048, gpus=1, sharding="fsdp")).total == one.total
    assert "per GPU of 2 (fsdp)" in fsdp2.format()


@pytest.mark.parametrize("kwargs, flag", [({"gpus": 0}, "--gpus"), ({"sharding": "zero3"}, "--sharding")])
def test_bad_parallel_inputs_name_the_flag(kwargs, flag):
    with pytest.raises(PlanError, match=flag):
        PlanInput(**kwargs)


# ------------------------------------------------------------------------------ the loss qtune runs


def _peak_bytes(step) -> int:
    """The peak of CPU bytes allocated while `step` runs, above what was allocated before it: the running sum of
    the allocator's events (torch.profiler with profile_memory), so every tensor an op materializes counts."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def _vocab_arch(tmp_path, vocab: int, softcap: float | None = None) -> dict:
    """A small architecture with a large vocabulary, from a config.json alone (the loss is all about V)."""
    config = {
        "model_type": "gemma2" if softcap else "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }
    if softcap:
        config["final_logit_softcapping"] = softcap
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_arch(str(tmp_path))


def _loss_peak(arch: dict, batch: int, seq: int, trained: int, loss: str) -> int:
    """Peak bytes of the LM head and the loss of one micro-batch, forward and backward, on top of the final norm's
    output: exactly what qtune's SFTTrainer does after the decoder (qtune/train/hooks.py, `logits_to_keep` as
    transformers slices it), or transformers' own loss on every position."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.modeling_utils import slice_logits_to_keep

    from qtune.train.hooks import trained_positions_loss

    torch.manual_seed(0)
    h, vocab = arch["hidden_size"], arch["vocab_size"]
    head = torch.nn.Linear(h, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(batch, seq, h, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, : seq - trained] = -100  # a prompt, then `trained` answer tokens
    cap = arch.get("final_logit_softcapping")

    def project(states):
        logits = head(states)
        if cap:  # as Gemma2ForCausalLM does
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        return logits

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if loss == "full":
                total = ForCausalLMLoss(project(hidden), labels, vocab)  # the logits die with the model's outputs
            else:
                shifted = labels[:, 1:]
                trained_here = shifted != -100
                keep = torch.zeros_like(labels, dtype=torch.bool)
                keep[:, :-1] = trained_here
                loss_sum, _, _ = trained_positions_loss(
                    project(slice_logits_to_keep(hidden, keep)), shifted[trained_here]
                )
                total = loss_sum / trained_here.sum()
        total.backward()

    return _peak_bytes(step)


@pytest.mark.parametrize(
    ("vocab", "batch", "seq", "trained", "softcap"),
    [
        (65536, 2, 640, 600, None),  # 1,200 trained positions in chunks of 256 rows: the checkpointed path
        (65536, 1, 640, 100, None),  # 100 positions: one chunk, no checkpoint
        (32768, 2, 512, 512, 30.0),  # soft-capped logits (Gemma-2): the tanh output is kept too
    ],
)
def test_chunked_loss_plan_matches_the_bytes_it_allocates(tmp_path, vocab, batch, seq, trained, softcap):
    """The planner's "logits and loss" for qtune's chunked loss is the peak the loss really allocates on top of the
    decoder's output, counted by the allocator (CPU), for the trained positions only (`trained_tokens`)."""
    arch = _vocab_arch(tmp_path, vocab, softcap)
    measured = _loss_peak(arch, batch, seq, trained, "chunked")
    # `trained` labels per row, each predicted by the position before it (a label at position 0 has none).
    inp = PlanInput(seq=seq, batch=batch, trained_tokens=min(trained, seq - 1), loss="chunked")
    planned = estimate(arch, inp).breakdown["logits and loss"]
    assert planned == pytest.approx(measured, rel=0.01)


def test_full_loss_plan_matches_the_bytes_it_allocates(tmp_path):
    """transformers' own loss (what plain HF scripts run; the published peers' rows): fp32 logits at every
    position, 12 bytes per position per vocabulary entry at the peak."""
    arch = _vocab_arch(tmp_path, 32768)
    measured = _loss_peak(arch, 2, 512, 512, "full")
    planned = estimate(arch, PlanInput(seq=512, batch=2, loss="full")).breakdown["logits and loss"]
    assert planned == pytest.approx(measured, rel=0.01)


def test_the_chunked_loss_plans_below_the_full_loss_and_scales_with_trained_positions():
    arch = load_arch("llama-3.1-8b")

    def loss(**kw):
        return estimate(arch, PlanInput(seq=2048, **kw)).breakdown["logits and loss"]

    assert loss(loss="fused") < loss(loss="chunked", trained_tokens=256) < loss(loss="chunked") < loss(loss="full")
    # Every position trained: 16-bit logits, their accumulated gradient and one more chunk's (6 bytes per entry),
    # and the 16-bit gradient of one chunk of 2**24 / V rows.
    vocab = arch["vocab_size"]
    assert loss(loss="chunked") == 6 * 2048 * vocab + 2 * (2**24 // vocab) * vocab
    assert loss(loss="full") == 12 * 2048 * arch["vocab_size"]
    assert loss(loss="chunked", trained_tokens=4096) == loss(loss="chunked")  # at most seq positions


# ------------------------------------------------------------------------------ 8-bit and paged optimizers


def test_8bit_optimizer_states_match_bitsandbytes(tiny):
    """bitsandbytes' 8-bit AdamW (what train.optim adamw8bit runs) on the LoRA weights of a tiny model: the states it
    allocates are the plan's, to the byte (8-bit blockwise for tensors of >= 4096 values, fp32 below, the two
    256-entry quantization maps once)."""
    import bitsandbytes as bnb

    folder = tiny("llama")
    model = attach_lora(_load(folder, "none", False, dtype="fp32"), LoraConfig(r=32, targets="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW(params, optim_bits=8, is_paged=False)  # transformers' adamw_bnb_8bit
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    plan = estimate(load_arch(str(folder)), PlanInput(lora_r=32, optim="adamw8bit"))
    assert {p.numel() >= 4096 for p in params} == {True, False}  # both kinds of tensor are in the test
    assert plan.breakdown["optimizer states"] == sum(storages.values())
    assert plan.paged == 0


def test_paged_states_are_counted_on_the_gpu_but_outside_torchs_allocator():
    arch = load_arch("llama-3.1-8b")
    plain, paged = (estimate(arch, PlanInput(lora_r=64, optim=o)) for o in ("adamw8bit", "paged_adamw8bit"))
    assert plain.breakdown["optimizer states"] == paged.breakdown["optimizer states"]
    # States of >= 1e5 values are in unified memory: not in torch.cuda.max_memory_allocated, not in its headroom.
    assert 0 < paged.paged < paged.breakdown["optimizer states"]
    assert paged.peak_allocated == plain.peak_allocated - paged.paged
    assert paged.total < plain.total
    assert any("unified memory" in note for note in paged.notes)
    assert paged.to_dict()["paged_optimizer_states"] == paged.paged


# ------------------------------------------------------------------------------ the same defaults as training


def test_plan_defaults_are_a_default_training_configs():
    from qtune.config import DataConfig, RunConfig

    cfg = RunConfig()
    inp = PlanInput.from_config(cfg, seq=2048, batch=1)
    assert inp == PlanInput(seq=2048, batch=1)  # checkpointing off, adamw, nf4 + dq, r=16 all-linear, chunked loss
    assert not inp.gradient_checkpointing and inp.optim == "adamw" and inp.loss == "chunked"
    assert PlanInput.from_config(cfg, seq=8, batch=1, gpus=1).loss == "chunked"
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, chunked_loss=False))
    assert PlanInput.from_config(off, seq=8, batch=1).loss == "fused"
    assert DataConfig.__dataclass_fields__["max_length"].default == 1024  # what `qtune plan` defaults --seq to


def test_cli_plan_defaults_equal_a_default_config(capsys):
    from qtune.cli import main
    from qtune.config import RunConfig

    main(["plan", "llama-3.1-8b", "--json"])
    shown = json.loads(capsys.readouterr().out)
    cfg = RunConfig()
    expected = PlanInput.from_config(cfg, seq=cfg.data.max_length, batch=cfg.train.batch_size)
    assert shown["input"] == dataclasses.asdict(expected)
    assert shown["breakdown"] == estimate(load_arch("llama-3.1-8b"), expected).breakdown  # the full breakdown
    assert shown["trained_positions"] == cfg.data.max_length * cfg.train.batch_size


# ------------------------------------------------------------------------------ bad input to `qtune plan`


def _plan_error(capsys, *argv) -> str:
    from qtune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err.strip()


def test_plan_bad_vram_is_one_line_naming_the_flag(capsys):
    assert _plan_error(capsys, "llama-2-7b", "--vram", "abc") == (
        "error: --vram: cannot read 'abc'; use e.g. 8GB, 8G, 8192MiB"
    )
    for argv in (["--vram=-8GB"], ["--vram", "-8GB"], ["--vram", "-0.5G"]):
        assert _plan_error(capsys, "llama-2-7b", *argv).startswith("error: --vram must be a positive size, got '-")
    assert _plan_error(capsys, "llama-2-7b", "--vram", "0") == "error: --vram must be a positive size, got '0'"
    # A real option after --vram is still an option: argparse's own line, naming --vram.
    assert "--vram" in _plan_error(capsys, "llama-2-7b", "--vram", "--json")


def test_plan_unknown_model_says_what_is_known(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _plan_error(capsys, "llama-9b")
    assert err.startswith("error: --model: unknown architecture 'llama-9b': not built in (")
    assert all(name in err for name in BUILTIN)


def test_plan_vram_too_small_for_any_setting_names_the_smallest_that_fits(capsys):
    err = _plan_error(capsys, "llama-3.1-8b", "--vram", "2GB")
    arch = load_arch("llama-3.1-8b")
    least = estimate(arch, PlanInput(seq=1, batch=1, gradient_checkpointing=True)).total
    assert err.startswith("error: --vram 2.00 GiB is too small for llama-3.1-8b (nf4, LoRA r=16, adamw) at any")
    assert f"the smallest that fits is {least / GIB:.2f} GiB (seq 1, micro-batch 1, checkpointing on)" in err
    # Not at the default micro-batch, but at a smaller one: a plan that says so, not an error.
    from qtune.cli import main

    main(["plan", "llama-3.1-8b", "--vram", "12GB"])
    out = capsys.readouterr().out
    assert "does NOT fit in 12.00 GiB" in out and "largest batch at seq 1024" in out


# ------------------------------------------------------------------------------ train.vram


@pytest.fixture()
def sft_cfg(tmp_path, tiny_model_dir):
    rows = [
        {"messages": [{"role": "user", "content": f"review {i}: it was {w}"}, {"role": "assistant", "content": w}]}
        for i, w in enumerate(["great", "dull", "fine", "bad"] * 2)
    ]
    return tiny_run(tmp_path, tiny_model_dir, rows, "train.max_steps=1")


def _longest(cfg) -> int:
    """The longest tokenized example of the config's data, padded as batched (what the check plans at)."""
    from qtune.data import load_train
    from qtune.models import load_tokenizer

    examples, _ = load_train(cfg.data, load_tokenizer(cfg.model.name), cfg.train.seed)
    longest = max(examples.lengths())
    return -(-longest // 8) * 8


def test_train_vram_refuses_a_run_that_does_not_fit_before_the_model_loads(sft_cfg, monkeypatch, tmp_path):
    from qtune.config import ConfigError
    from recipes import sft

    monkeypatch.setattr(sft.models, "load_base", lambda *a, **k: pytest.fail("the base was loaded before the check"))
    probe = sft_cfg()
    arch, seq = load_arch(str(probe.model.name)), _longest(probe)
    need = {b: estimate(arch, PlanInput.from_config(probe, seq=seq, batch=b)).total for b in (2, 4)}
    budget = (need[2] + need[4]) // 2  # holds micro-batch 2, not 4
    cfg = sft_cfg(f"train.vram={budget}B")
    with pytest.raises(ConfigError) as e:
        sft.main(cfg)
    message = str(e.value)
    assert message.startswith(
        f"train.vram={budget}B: this run needs {need[4] / GIB:.2f} GiB at seq {seq} (longest example) x batch 4"
    )
    assert "lower train.batch_size (fits at 2)" in message
    assert f"train.fit_to_vram={budget}B (it would choose micro-batch 2 x grad_accum 2" in message
    assert not (tmp_path / "adapters" / "run").exists()


def test_train_vram_that_fits_lets_the_run_go_on(sft_cfg, monkeypatch, capsys):
    from recipes import sft

    class Loaded(Exception):
        pass

    def load_base(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(sft.models, "load_base", load_base)
    with pytest.raises(Loaded):
        sft.main(sft_cfg("train.vram=24GB"))
    assert "train.vram 24GB: planned peak" in capsys.readouterr().out


def test_train_vram_nothing_fits_names_max_length(sft_cfg, monkeypatch):
    from qtune.config import ConfigError
    from recipes import sft

    monkeypatch.setattr(sft.models, "load_base", lambda *a, **k: pytest.fail("the base was loaded before the check"))
    with pytest.raises(ConfigError, match=r"^train.vram=1MiB: this run needs .*use a smaller base"):
        sft.main(sft_cfg("train.vram=1MiB"))


@pytest.mark.parametrize("value", ["lots", "-8GB", "0"])
def test_train_vram_is_validated_when_read(value):
    from qtune.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"^train\.vram: --vram"):
        TrainConfig(vram=value)
