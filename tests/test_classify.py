"""Classification: head detection, save/restore, label maps, padding sides, metrics, predict — tiny BERT and Llama."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtune.classify import metrics
from qtune.cli import main as cli
from qtune.config import load_config
from qtune.data import DataError
from qtune.lora import AdapterError, load_adapter
from qtune.models import new_modules
from recipes import classify as recipe
from tests.conftest import plain_bnb

WORDS = "the movie was great good wonderful a dull boring terrible film awful fine bad joy".split()
TEXTS = [
    ("the movie was great", "pos"),
    ("a dull boring film", "neg"),
    ("wonderful film", "pos"),
    ("terrible awful movie", "neg"),
    ("good fine joy", "pos"),
    ("bad boring film", "neg"),
] * 2


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # bitsandbytes' CPU 4-bit inference path needs rows of at least one 64-block
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)  # an encoder checkpoint without any classification head
    tokenizer.save_pretrained(path)
    return path


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def cls_cfg(tmp_path):
    data = write(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in TEXTS])

    def make(model_dir, *overrides):
        return load_config(
            None,
            [
                "recipe=classify",
                f"model.name={model_dir}",
                "model.dtype=fp32",
                f"data.train={data}",
                f"data.eval={data}",
                "train.max_steps=4",
                "train.batch_size=4",
                "train.lr=5e-3",
                "lora.r=4",
                f"output.dir={tmp_path / 'adapters'}",
                "output.name=cls",
                *overrides,
            ],
        )

    return make


def test_new_head_modules_are_detected(tiny_bert_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert new_modules(tiny_bert_dir, AutoModelForSequenceClassification, num_labels=2) == ["classifier"]
    assert new_modules(tiny_model_dir, AutoModelForSequenceClassification, num_labels=3) == ["score"]
    assert new_modules(tiny_model_dir, AutoModelForCausalLM) == []


def probabilities(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.softmax(-1)


@pytest.mark.parametrize("base, quant", [("bert", "nf4"), ("bert", "int8"), ("llama", "nf4"), ("llama", "none")])
def test_head_is_trained_saved_and_restored(cls_cfg, tiny_bert_dir, tiny_model_dir, base, quant):
    model_dir = tiny_bert_dir if base == "bert" else tiny_model_dir
    out = recipe.main(cls_cfg(model_dir, f"quant.method={quant}"))
    meta = json.loads((out / "qtune.json").read_text())
    head = "classifier" if base == "bert" else "score"
    assert meta["kind"] == "sequence-classification" and meta["labels"]["head_modules"] == [head]
    assert meta["labels"]["id2label"] == {"0": "neg", "1": "pos"}
    assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(meta["metrics"])
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(f".{head}." in k for k in saved), "the full head must be saved with the adapter"

    # Reload with qtune, twice (a fresh random init each time) and with plain PEFT: identical predictions.
    texts = ["the movie was great", "a dull boring film", "joy"]
    model, tokenizer, _, _ = load_adapter(out)
    ours = probabilities(model, tokenizer, texts)
    again, *_ = load_adapter(out)
    torch.testing.assert_close(probabilities(again, tokenizer, texts), ours, rtol=0, atol=0)

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    qconfig = plain_bnb(quant, [head])
    plain = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir),
        num_labels=2,
        quantization_config=qconfig,
        dtype=torch.float32,
        pad_token_id=tokenizer.pad_token_id,
    )
    plain = PeftModel.from_pretrained(plain, str(out)).eval()
    torch.testing.assert_close(probabilities(plain, tokenizer, texts), ours, rtol=0, atol=0)


def test_an_adapter_without_its_head_is_refused(cls_cfg, tiny_bert_dir):
    out = recipe.main(cls_cfg(tiny_bert_dir, "quant.method=none"))
    weights = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".classifier." not in k}, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="no saved weights for `classifier`.*re-initialise it at random"):
        load_adapter(out)


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_pools_the_last_real_token_with_either_padding_side(cls_cfg, tiny_model_dir, side):
    out = recipe.main(cls_cfg(tiny_model_dir, "quant.method=none"))
    model, tokenizer, _, _ = load_adapter(out)
    tokenizer.padding_side = side
    texts = ["the movie was great and wonderful", "bad", "a dull film"]
    batched = probabilities(model, tokenizer, texts)
    alone = torch.cat([probabilities(model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_integer_labels_keep_their_order(tmp_path, tiny_bert_dir, cls_cfg):
    data = write(tmp_path / "ints.jsonl", [{"text": t, "label": 2 if lab == "pos" else 0} for t, lab in TEXTS])
    out = recipe.main(cls_cfg(tiny_bert_dir, "quant.method=none", f"data.train={data}", f"data.eval={data}"))
    assert json.loads((out / "qtune.json").read_text())["labels"]["id2label"] == {"0": "0", "1": "2"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "good", "label": "pos"}, {"text": "bad"}], "row 2: field `label` is missing"),
        ([{"text": "good", "label": "pos"}, {"text": "", "label": "neg"}], "row 2: field `text` is empty"),
        ([{"text": "good", "label": "pos"}, {"label": "neg"}], "row 2: field `text` is missing"),
        (
            [{"text": "good", "label": "pos"}, {"text": "bad", "label": 1}],
            "row 2: field `label` is int (1) but row 1 has str labels",
        ),
        ([{"text": "good", "label": "pos"}, {"text": "bad", "label": 1.5}], "row 2: field `label` must be text or"),
        ([{"text": "good", "label": "pos"}, {"text": "fine", "label": "pos"}], "a classifier needs at least two"),
    ],
)
def test_bad_labelled_data(tmp_path, tiny_bert_dir, cls_cfg, rows, message):
    data = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        recipe.main(cls_cfg(tiny_bert_dir, "quant.method=none", f"data.train={data}"))
    assert str(data) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "adapters").exists()


def test_unknown_label_at_evaluation(tmp_path, tiny_bert_dir, cls_cfg):
    held_out = write(tmp_path / "held.jsonl", [{"text": "good", "label": "pos"}, {"text": "meh", "label": "mixed"}])
    with pytest.raises(DataError, match=r"held.jsonl: 1 bad record\(s\):\n  row 2: field `label` has label 'mixed'"):
        recipe.main(cls_cfg(tiny_bert_dir, "quant.method=none", f"data.eval={held_out}"))


def test_metrics_by_hand():
    m = metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], {0: "a", 1: "b", 2: "c"})
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5) and m["per_class"]["c"]["recall"] == 1.0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["majority_baseline"] == pytest.approx(0.5)


def test_predict_and_eval_commands(cls_cfg, tiny_bert_dir, tmp_path, capsys):
    out = recipe.main(cls_cfg(tiny_bert_dir, "quant.method=none"))
    capsys.readouterr()
    cli(["predict", str(out), "--text", "the movie was great"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["text"] == "the movie was great" and line["label"] in ("neg", "pos")
    assert set(line["probabilities"]) == {"neg", "pos"} and sum(line["probabilities"].values()) == pytest.approx(1)
    assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)

    cli(["predict", str(out), "--data", str(tmp_path / "train.jsonl")])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == len(TEXTS) and lines[0]["text"] == TEXTS[0][0]

    bad = write(tmp_path / "bad.jsonl", [{"text": "good"}, {"text": ""}, {"txt": "x"}])
    with pytest.raises(SystemExit):
        cli(["predict", str(out), "--data", str(bad)])
    err = capsys.readouterr().err
    assert (
        "2 bad record(s)" in err and "row 2: field `text` is empty" in err and "row 3: field `text` is missing" in err
    )

    cli(["eval", str(out), "--data", str(tmp_path / "train.jsonl")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == len(TEXTS) and 0 <= result["accuracy"] <= 1 and "macro_f1" in result

    with pytest.raises(SystemExit):
        cli(["predict", str(out)])  # neither --text nor --data
    with pytest.raises(SystemExit) as exit_:
        cli(["generate", str(out), "--prompt", "hi"])
    assert exit_.value.code == 2 and "use `qtune predict" in capsys.readouterr().err


def test_classification_resumes_from_a_checkpoint_to_the_same_adapter(cls_cfg, tiny_bert_dir, tmp_path):
    """The classifier trainer checkpoints too: resumed from the middle, it ends where the full run ends."""
    import shutil

    from qtune.train import checkpoint

    full = ["quant.method=none", "train.max_steps=6", "train.batch_size=2", "train.save_every=2"]
    reference = recipe.main(cls_cfg(tiny_bert_dir, *full, "output.keep_checkpoints=true", "train.save_limit=3"))
    folder = reference.parent / "cls.checkpoints"
    assert [p.name for p in checkpoint.complete(folder)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # A run interrupted after step 2: its folder holds that checkpoint only.
    shutil.copytree(folder, reference.parent / "cut.checkpoints", ignore=shutil.ignore_patterns("checkpoint-[46]"))
    resumed = recipe.main(cls_cfg(tiny_bert_dir, *full, "output.name=cut", "resume=auto"))
    assert json.loads((resumed / "qtune.json").read_text())["training"]["resumed_from_step"] == 2
    a = load_file(str(reference / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_a_bf16_classifier_fresh_from_training_predicts_outside_the_trainer(
    cls_cfg, tiny_model_dir, quant, monkeypatch
):
    """The base stays bf16 and the new head trains in fp32: a run whose training is already finished (crashed in
    evaluation, then resume=auto) evaluates that model without the trainer's autocast, and must still work."""
    from qtune import classify as qc

    args = ("model.dtype=bf16", f"quant.method={quant}", "train.save_every=4", "output.name=bf16")
    evaluate = qc.evaluate

    def crash(*a, **k):
        raise KeyboardInterrupt("crash in evaluation")

    monkeypatch.setattr(qc, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(cls_cfg(tiny_model_dir, *args))
    monkeypatch.setattr(qc, "evaluate", evaluate)
    out = recipe.main(cls_cfg(tiny_model_dir, *args, "resume=auto"))
    meta = json.loads((out / "qtune.json").read_text())
    assert meta["training"]["resumed_from_step"] == 4 and meta["metrics"]["examples"] == len(TEXTS)
