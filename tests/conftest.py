"""Shared fixtures: tiny tokenizers and tiny random Llama models built from config, no network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 style: the template writes BOS itself, and the tokenizer also adds BOS to plain text.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
    "' [/INST]' }}{% elif message['role'] == 'system' %}{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# A template that never writes EOS after a reply.
NO_EOS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

CORPUS = [
    "the movie was great and the acting was wonderful",
    "a dull and boring film with terrible acting",
    "review positive negative answer with one word",
    "hello how are you today i am fine thank you",
    "what is two plus two the answer is four",
    "Is this movie review positive or negative?",
] * 5


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run(tmp_path: Path, model_dir: Path, rows: list[dict], *defaults: str):
    """`make(*overrides)`: the RunConfig of a short fp32 run of the tiny model on `rows` (written to
    tmp_path/train.jsonl), LoRA r=4, batch 4, into tmp_path/adapters/run; `defaults`, then `overrides`, on top."""
    from qtune.config import load_config

    data = write_jsonl(tmp_path / "train.jsonl", rows)
    common = [f"model.name={model_dir}", "model.dtype=fp32", "quant.method=none", f"data.train={data}"]
    common += ["lora.r=4", "train.batch_size=4", f"output.dir={tmp_path / 'adapters'}", "output.name=run"]

    def make(*overrides: str):
        return load_config(None, [*common, *defaults, *overrides])

    return make


def make_tokenizer(template: str = CHATML, add_bos: bool = False):
    """A tiny byte-level BPE tokenizer (a few hundred tokens) with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    eos = "</s>" if template == BOS_TEMPLATE else "<|im_end|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = template
    return fast


def make_model_folder(path: Path, tokenizer, seed: int = 0, arch: str = "llama") -> Path:
    """Save a tiny random Llama (or Qwen2: tied embeddings, another MLP width) with `tokenizer` as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        arch
    ]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        # The Qwen2's MLP width differs from the Llama's, so an adapter swapped between them cannot load silently.
        intermediate_size=128 if arch == "llama" else 96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=arch == "qwen2",
    )
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def plain_bnb(quant: str, skip: list[str] | None = None):
    """A BitsAndBytesConfig written by hand, as a user of plain PEFT would (not through qtune)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return make_tokenizer(CHATML)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-llama"), chatml_tokenizer)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Fingerprint caches and converted models go to a per-test folder, except the embedded model's."""
    monkeypatch.setenv("QTUNE_HOME", os.environ.get("QTUNE_TEST_HOME", str(tmp_path / "qtune-home")))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real embedded SmolLM2-135M-Instruct tokenizer (ChatML, with its default system prompt), from its GGUF."""
    from transformers import AutoTokenizer

    from qtune.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
