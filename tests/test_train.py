"""A few real training steps on a tiny random Llama: nf4, int8 and 16-bit; the adapter folder contract."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from qtune import atomic
from qtune.config import ConfigError, load_config
from qtune.data import DataConfig, load_examples
from qtune.errors import TrainingError
from qtune.lora import AdapterError, load_adapter, read_meta
from recipes import sft
from tests.conftest import plain_bnb, tiny_run

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"review {i}: the movie was {w}"},
            {"role": "assistant", "content": "positive" if w == "great" else "negative"},
        ]
    }
    for i, w in enumerate(["great", "boring", "great", "terrible", "great", "dull", "wonderful", "boring"])
]


@pytest.fixture()
def run_cfg(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    return tiny_run(
        tmp_path,
        tiny_model_dir,
        ROWS,
        "quant.method=nf4",
        f"data.eval={data}",
        "train.max_steps=3",
        "train.lr=1e-2",
        "train.logging_steps=1",
        "eval.max_new_tokens=3",
    )


def beside(folder) -> list[str]:
    """What is in an adapter's parent folder, but for the TensorBoard logs (`<name>.runs/`, train.report_to=auto
    with the tensorboard package installed; tests/test_observe.py checks them)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".runs"))


def base_weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def lora_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_training_changes_lora_only_and_reloads_identically(run_cfg, tiny_model_dir, tmp_path, quant):
    before = base_weights(tiny_model_dir)
    out = sft.main(run_cfg(f"quant.method={quant}"))

    # The contract: plain PEFT files + qtune.json + loss curve, and nothing else half-written beside it.
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "qtune.json", "loss.png"} <= files
    assert beside(out.parent) == ["run"]
    # readable by a serving container running as another user: the umask's mode, not safetensors' 0600
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {atomic.default_mode(directory=False)}
    meta = read_meta(out)
    assert meta["config"]["quant"]["method"] == quant
    assert meta["base"]["fingerprint"].startswith("sha256:")
    assert meta["training"]["steps"] == 3 and meta["training"]["loss_curve"]
    assert meta["data"]["train"]["examples"] == len(ROWS)
    assert {"loss", "perplexity", "accuracy"} <= set(meta["metrics"])
    assert meta["versions"]["peft"]

    # Base weights on disk are untouched; LoRA B matrices (initialised to zero) have moved.
    after = base_weights(tiny_model_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert not any("base_layer" in k for k in adapter)  # only adapter tensors are saved

    # Reload through qtune and through plain PEFT (no qtune involved): identical logits.
    model, tokenizer, _, _ = load_adapter(out)
    input_ids = torch.tensor([tokenizer("the movie was great")["input_ids"]])
    via_qtune = lora_logits(model, input_ids)
    base_only, *_ = load_adapter(out, base_only=True)
    assert not torch.allclose(via_qtune, lora_logits(base_only, input_ids))  # the adapter does something

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    qconfig = plain_bnb(quant)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=qconfig, dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain, str(out)).eval()
    torch.testing.assert_close(lora_logits(plain, input_ids), via_qtune, rtol=0, atol=0)


def test_existing_output_is_refused_before_training(run_cfg):
    cfg = run_cfg("quant.method=none")
    (cfg_out := sft.lora.output_dir(cfg)).mkdir(parents=True)
    with pytest.raises(AdapterError, match="already exists"):
        sft.main(cfg)
    assert list(cfg_out.iterdir()) == []


@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(run_cfg, tmp_path, monkeypatch, case):
    import os

    adapters = tmp_path / "adapters"
    if case == "a file":  # even with overwrite: it replaces an adapter folder, never a user's file
        adapters.mkdir()
        (adapters / "run").write_text("mine")
        message = f"{adapters / 'run'} is a file, not an adapter folder: pick another output.name or output.dir"
    elif case == "under a file":
        adapters.write_text("mine")
        message = f"cannot write {adapters / 'run'}: {adapters} is a file, not a folder; set output.dir"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        adapters.mkdir(mode=0o555)
        message = f"cannot write {adapters / 'run'}: {adapters} is not writable; set output.dir"

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sft.models, "load_base", no_model)
    with pytest.raises(AdapterError, match=re.escape(message)):
        sft.main(run_cfg("quant.method=none", "output.overwrite=true"))
    if case == "a file":
        assert (adapters / "run").read_text() == "mine"


def test_bad_data_fails_before_anything_is_written(run_cfg, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": []}\n')
    with pytest.raises(Exception, match=r"row 2: field `messages` must be a non-empty list"):
        sft.main(run_cfg("quant.method=none", f"data.train={bad}"))
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


def test_crash_during_save_leaves_no_adapter_folder_and_resume_finishes_it(run_cfg, tmp_path, monkeypatch):
    from qtune.train import run as train_run

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(train_run, "loss_curve_png", boom)
        with pytest.raises(OSError, match="No space left"):
            sft.main(run_cfg("quant.method=none"))
    adapters = tmp_path / "adapters"
    assert not (adapters / "run").exists()
    # The trained weights are not lost: the final checkpoint is there, and resume=auto only writes the adapter.
    assert [p.name for p in (adapters / "run.checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    with pytest.raises(ConfigError, match="resume=auto"):
        sft.main(run_cfg("quant.method=none"))
    out = sft.main(run_cfg("quant.method=none", "resume=auto"))
    meta = read_meta(out)
    assert meta["training"]["resumed_from_step"] == 3 and meta["training"]["steps"] == 3
    assert beside(adapters) == ["run"]  # the checkpoints went with success


def test_a_save_killed_mid_write_leaves_nothing_once_the_next_run_starts(run_cfg, tmp_path):
    from qtune import train
    from qtune.train.run import unlock_output
    from tests.test_atomic import _killed_mid_write

    adapters = tmp_path / "adapters"
    _killed_mid_write(adapters / "run", replace=True)  # SIGKILL during the final save: a `.run.partial-*` stays
    assert [p.name.startswith(".run.partial-") for p in adapters.iterdir()] == [True]
    run = train.start(run_cfg("quant.method=none"))  # holds the output's lock: that staging folder is stale
    unlock_output(run.out_dir)
    assert list(adapters.iterdir()) == []


def test_overwrite_through_a_link_replaces_the_adapter_it_points_to_and_leaves_nothing_beside(run_cfg, tmp_path):
    real = sft.main(run_cfg("quant.method=none", "output.name=real", "train.max_steps=1"))
    before = (real / "adapter_model.safetensors").read_bytes()
    (link := real.parent / "run").symlink_to(real.name)
    out = sft.main(run_cfg("quant.method=none", "output.overwrite=true", "train.max_steps=1", "train.seed=7"))
    assert out == link and link.is_symlink() and beside(real.parent) == ["real", "run"]
    assert (real / "adapter_model.safetensors").read_bytes() != before and read_meta(link)["training"]["steps"] == 1


def test_full_disk_during_save_keeps_the_previous_adapter(run_cfg, tmp_path, monkeypatch):
    out = sft.main(run_cfg("quant.method=none"))
    previous = (out / "adapter_model.safetensors").read_bytes()
    import peft.peft_model

    def full_disk(tensors, filename, metadata=None):  # writes a few bytes, then the disk is full
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    with pytest.raises(AdapterError, match=r"nothing was written \(the previous adapter there is kept\).*No space"):
        sft.main(run_cfg("quant.method=none", "output.overwrite=true", "train.seed=7", "train.save_every=0"))
    assert (out / "adapter_model.safetensors").read_bytes() == previous
    assert beside(out.parent) == ["run", "run.checkpoints"]


def test_full_disk_during_a_checkpoint_keeps_the_complete_ones(run_cfg, tmp_path, monkeypatch):
    import peft.peft_model

    real_save, saves = peft.peft_model.safe_save_file, []

    def full_on_second(tensors, filename, metadata=None):  # the second checkpoint finds the disk full
        saves.append(filename)
        if len(saves) == 2:
            with open(filename, "wb") as f:
                f.write(b"\x00" * 100)
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_on_second)
    with pytest.raises(TrainingError, match=r"No space left.*checkpoint-1.*resume=auto"):
        sft.main(run_cfg("quant.method=none", "train.save_every=1"))
    folder = tmp_path / "adapters" / "run.checkpoints"
    assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-1"]
    monkeypatch.undo()
    out = sft.main(run_cfg("quant.method=none", "train.save_every=1", "resume=auto"))
    assert read_meta(out)["training"]["resumed_from_step"] == 1


def test_a_bare_exception_while_writing_a_checkpoint_says_free_space_then_resume(run_cfg, tmp_path, monkeypatch):
    """The tokenizers library reports a full disk as a bare Exception, not an OSError."""
    from transformers import PreTrainedTokenizerFast

    real_save = PreTrainedTokenizerFast.save_pretrained

    def full_on_second(self, save_directory, *args, **kwargs):
        if "checkpoint-2" in str(save_directory):
            raise Exception("No space left on device (os error 28)")
        return real_save(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full_on_second)
    with pytest.raises(TrainingError) as err:
        sft.main(run_cfg("quant.method=none", "train.save_every=1"))
    assert re.search(
        r"while writing checkpoint-2: Exception: No space left on device \(os error 28\)\. Complete checkpoints in "
        r".*run\.checkpoints: checkpoint-1; .*free .*then resume=auto continues from the newest",
        str(err.value),
    )
    monkeypatch.undo()
    out = sft.main(run_cfg("quant.method=none", "train.save_every=1", "resume=auto"))
    assert read_meta(out)["training"]["resumed_from_step"] == 1


def test_adapter_refuses_a_different_base(run_cfg, tmp_path, tiny_model_dir):
    out = sft.main(run_cfg("quant.method=none"))
    # Change one weight of the base on disk: the fingerprint no longer matches.
    from safetensors.torch import save_file

    weights = base_weights(tiny_model_dir)
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    save_file(weights, str(tiny_model_dir / "model.safetensors"), metadata={"format": "pt"})
    try:
        with pytest.raises(AdapterError, match="refusing to use it with a different base"):
            load_adapter(out)
    finally:
        weights[key] = weights[key] - 1
        save_file(weights, str(tiny_model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture()
def adapter_on_own_base(run_cfg, tmp_path):
    """An adapter trained on a base of its own, which the test may then replace on disk."""
    from tests.conftest import make_model_folder, make_tokenizer

    base = make_model_folder(tmp_path / "base", make_tokenizer())
    return sft.main(run_cfg("quant.method=none", f"model.name={base}", "output.name=own")), base


@pytest.mark.parametrize(
    "replacement, message",
    [
        ("qwen2", r"architecture LlamaForCausalLM, but .* has Qwen2ForCausalLM"),
        ("bigger_vocab", r"vocabulary size \d+, but .* has \d+"),
    ],
)
def test_adapter_refuses_another_architecture_or_vocabulary_before_loading(
    adapter_on_own_base, monkeypatch, replacement, message
):
    import shutil

    from qtune import lora
    from tests.conftest import make_model_folder, make_tokenizer

    out, base = adapter_on_own_base
    tokenizer = make_tokenizer()
    if replacement == "bigger_vocab":
        tokenizer.add_tokens([f"<extra{i}>" for i in range(8)])
    shutil.rmtree(base)
    make_model_folder(base, tokenizer, arch="qwen2" if replacement == "qwen2" else "llama")
    monkeypatch.setattr(lora, "load_base", lambda *a, **k: pytest.fail("the base was loaded before the check"))
    with pytest.raises(AdapterError, match=message + ".*--ignore-base-mismatch"):
        load_adapter(out)


def test_a_deliberate_base_mismatch_can_be_overridden(adapter_on_own_base):
    from safetensors.torch import save_file

    out, base = adapter_on_own_base
    weights = base_weights(base)
    key = next(iter(weights))
    weights[key] = weights[key] * 1.001  # e.g. the same base, re-saved after a round trip
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(out)
    model, *_ = load_adapter(out, check_base=False)
    assert type(model).__name__ == "PeftModelForCausalLM"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_adapter_file_is_a_clear_error_before_loading(adapter_on_own_base, monkeypatch, damage):
    from qtune import lora

    out, _ = adapter_on_own_base
    path = out / "adapter_model.safetensors"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    monkeypatch.setattr(lora, "load_base", lambda *a, **k: pytest.fail("the base was loaded before the check"))
    with pytest.raises(AdapterError, match="corrupt or truncated safetensors"):
        load_adapter(out)


def test_loss_only_on_answers_reaches_the_trainer(run_cfg, tiny_model_dir):
    from qtune.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = run_cfg()
    examples, _ = load_examples(cfg.data.train, tok, DataConfig())
    trained = sum(lab != -100 for e in examples for lab in e.labels)
    assert trained == sum(
        len(tok(r["messages"][1]["content"], add_special_tokens=False)["input_ids"]) + 1 for r in ROWS
    )


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gradient_checkpointing_trains_the_same(run_cfg, quant):
    # Checkpointing with PEFT must not fail with "element 0 of tensors does not require grad" (huggingface/peft#137),
    # and (non-reentrant, no dropout) must not change what is learned.
    plain = read_meta(sft.main(run_cfg(f"quant.method={quant}", "output.name=plain")))
    ckpt = read_meta(
        sft.main(run_cfg(f"quant.method={quant}", "output.name=ckpt", "train.gradient_checkpointing=true"))
    )
    assert ckpt["config"]["train"]["gradient_checkpointing"] is True
    losses = [loss for _, loss in plain["training"]["loss_curve"]]
    assert [loss for _, loss in ckpt["training"]["loss_curve"]] == pytest.approx(losses, rel=1e-4)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_load_base_for_training_switches_checkpointing_and_freezes(tiny_model_dir, quant):
    from qtune.config import ModelConfig, QuantConfig, TrainConfig
    from qtune.lora import attach_lora
    from qtune.models import load_base

    model = load_base(
        tiny_model_dir, ModelConfig(dtype="fp32"), QuantConfig(method=quant), TrainConfig(gradient_checkpointing=True)
    )
    assert model.is_activation_checkpointing and model.config.use_cache is False
    peft_model = attach_lora(model, load_config(None, ["lora.r=2"]).lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_a_quantized_base_is_frozen_in_the_compute_dtype_and_a_new_head_trains_in_fp32(tiny_model_dir, quant):
    """Not peft's prepare_model_for_kbit_training: norms and embeddings stay bf16 (fp32 ones would make
    every 4-bit layer's output, and so every activation, fp32); only a module trained in full is fp32."""
    from qtune.config import ModelConfig, QuantConfig, TrainConfig
    from qtune.models import load_base, load_classifier

    model = load_base(tiny_model_dir, ModelConfig(dtype="bf16"), QuantConfig(method=quant), TrainConfig())
    floats = {n: p for n, p in model.named_parameters() if p.dtype.is_floating_point}
    assert floats and {p.dtype for p in floats.values()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    classifier, head = load_classifier(
        tiny_model_dir, ModelConfig(dtype="bf16"), QuantConfig(method=quant), {0: "neg", 1: "pos"}, train=TrainConfig()
    )
    assert head == ["score"]
    assert classifier.score.weight.dtype == torch.float32
    assert classifier.model.norm.weight.dtype == torch.bfloat16


def test_checkpoint_every_recomputes_every_kth_layer_and_learns_the_same(run_cfg, tiny_model_dir):
    from qtune.config import ModelConfig, QuantConfig, TrainConfig
    from qtune.models import load_base

    model = load_base(
        tiny_model_dir,
        ModelConfig(dtype="fp32"),
        QuantConfig(method="none"),
        TrainConfig(gradient_checkpointing=True, checkpoint_every=2),
    )
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    plain = read_meta(sft.main(run_cfg("quant.method=none", "output.name=plain")))
    half = read_meta(
        sft.main(
            run_cfg(
                "quant.method=none",
                "output.name=half",
                "train.gradient_checkpointing=true",
                "train.checkpoint_every=2",
            )
        )
    )
    losses = [loss for _, loss in plain["training"]["loss_curve"]]
    assert [loss for _, loss in half["training"]["loss_curve"]] == pytest.approx(losses, rel=1e-4)


@pytest.mark.parametrize("switch", ["lora.dora=true", "lora.rslora=true"])
def test_dora_and_rslora_switches_reach_the_adapter_config(run_cfg, switch):
    out = sft.main(run_cfg("quant.method=none", switch))
    config = json.loads((out / "adapter_config.json").read_text())
    key = "use_dora" if "dora" in switch else "use_rslora"
    assert config[key] is True
    assert config["r"] == 4 and config["lora_alpha"] == 32
    model, tokenizer, _, _ = load_adapter(out)  # and it loads back
    assert model.peft_config["default"].__dict__[key] is True


def test_adapter_folder_gets_ordinary_permissions(run_cfg):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = sft.main(run_cfg("quant.method=none"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's private 0700
