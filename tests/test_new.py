"""`qtune new`: the config it writes loads, carries each key's schema help, and fits the VRAM by `qtune plan`; the
shipped family x GPU configs fit their tier and are exactly what the generator writes today."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from qtune import new
from qtune.config import load_config
from qtune.config.describe import config_keys
from qtune.errors import ConfigError, DataError, PlanError
from qtune.plan import PlanInput, estimate, load_arch, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_family_configs", ROOT / "recipes/configs/make_family_configs.py")
family = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(family)
TEXTS, SKIPPED = family.family_configs()  # (SKIPPED: the family x tier pairs that fit at no setting)
SHIPPED = [(f, gb) for f in family.FAMILIES for gb in family.TIERS_GB if family.config_path(f, gb) in TEXTS]


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Tests decide the GPU: none unless a test says otherwise (the device machine has one)."""
    monkeypatch.setattr(new, "detect_gpu", lambda: None)


def sharegpt(path: Path, n: int = 40, words: int = 12) -> Path:
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"Question {i}: " + "why " * words},
                {"from": "gpt", "value": f"Answer {i}: " + "because " * words},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def planned(cfg, vram: int):
    """`qtune plan` of a loaded config's run at its data.max_length and micro-batch, against `vram`."""
    inp = PlanInput.from_config(cfg, seq=cfg.data.max_length, batch=cfg.train.batch_size, vram=vram)
    return estimate(load_arch(cfg.model.name), inp)


def keys_and_comments(text: str) -> list[tuple[str, str]]:
    """(dotted key, the comment line just above it) for every key a config writes."""
    out, section, above = [], None, ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            above = line.strip()[2:]
            continue
        if not line.strip():
            continue
        key, _, value = line.partition(":")
        if not line.startswith(" ") and not value.strip():
            section = key
            continue
        out.append((f"{section}.{key.strip()}" if line.startswith(" ") else key, above))
    return out


def test_new_writes_a_config_that_loads_and_fits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sharegpt(tmp_path / "my.jsonl")
    written = new.new_config("llama-3.1-8b", "my.jsonl", "my.yaml", vram="12GB")
    cfg = load_config("my.yaml")
    assert cfg.model.name == "meta-llama/Llama-3.1-8B-Instruct" and cfg.output.name == "my"
    assert cfg.data.train == "my.jsonl" and cfg.data.format == "sharegpt"
    assert cfg.train.fit_to_vram == "12GB" and cfg.quant.method == "nf4" and cfg.model.dtype == "bf16"
    assert cfg.data.max_length >= written.choice.data.longest and cfg.data.max_length % new.SEQ_STEP == 0
    plan = planned(cfg, parse_bytes("12GB"))
    assert plan.fits and plan.total == written.choice.plan.total
    assert 0 < cfg.data.eval_fraction <= 0.1 and cfg.train.epochs == 3  # 40 records: a small file
    report = written.report()
    assert "sharegpt, 40 records" in report and "fits in 12.00 GiB" in report and "qtune train my.yaml" in report


def test_every_key_carries_its_schema_help_and_no_demo_setting(tmp_path):
    out = tmp_path / "x.yaml"
    new.new_config("smollm2-135m", str(sharegpt(tmp_path / "d.jsonl")), out, vram="8GB")
    text = out.read_text()
    helps = {k.key: k.help for k in config_keys()}  # the schema's help, as `qtune config` prints it
    pairs = keys_and_comments(text)
    assert len(pairs) > 15
    for key, comment in pairs:
        assert comment.startswith(helps[key]), key
    cfg = load_config(out)
    assert cfg.data.system_prompt is None and cfg.data.eval is None
    assert cfg.eval.max_new_tokens == 16 and cfg.output.name == "x"
    assert "positive or negative" not in text and "vader" not in text.lower() and "sentiment" not in text


def test_length_comes_from_the_data_and_is_capped_by_the_context(tmp_path):
    short = new.read_data(sharegpt(tmp_path / "short.jsonl", words=5))
    long = new.read_data(sharegpt(tmp_path / "long.jsonl", words=800))
    assert short.format == "sharegpt" and short.records == 40 and short.longest < 64
    assert long.longest > 1000
    assert new.choose("llama-3.1-8b", short, "24GB").seq == 64
    assert new.choose("llama-3.1-8b", long, "24GB").seq == -(-long.longest // 64) * 64
    huge = new.read_data(sharegpt(tmp_path / "huge.jsonl", words=10_000))
    choice = new.choose("llama-2-7b", huge, "80GB")  # trained context 4096
    assert choice.seq == 4096 and any("beyond llama-2-7b's context" in n for n in choice.notes)


def test_alpaca_and_text_are_detected(tmp_path):
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add", "input": "1 2", "output": "3"}) + "\n")
    assert new.read_data(alpaca).format == "alpaca"
    text = tmp_path / "t.csv"
    text.write_text("text\nhello world\n")
    assert new.read_data(text).format == "text"


def test_without_a_gpu_the_config_is_for_the_cpu(tmp_path):
    out = tmp_path / "cpu.yaml"
    written = new.new_config("smollm2-135m", str(sharegpt(tmp_path / "d.jsonl")), out)
    cfg = load_config(out)
    assert cfg.model.dtype == "fp32" and cfg.quant.method == "none" and cfg.train.fit_to_vram is None
    assert cfg.model.name == "smollm2-135m"
    assert "no CUDA GPU here: a CPU config" in written.report()


def test_the_local_gpu_memory_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(new, "detect_gpu", lambda: (int(10.5 * 2**30), "Fake GPU", False))
    out = tmp_path / "gpu.yaml"
    written = new.new_config("llama-3.1-8b", str(sharegpt(tmp_path / "d.jsonl")), out)
    cfg = load_config(out)
    assert cfg.train.fit_to_vram == "10.5GB" and cfg.model.dtype == "fp16"  # no bf16 on this card
    assert planned(cfg, parse_bytes("10.5GB")).fits
    assert "GPU: Fake GPU" in written.report()


def test_a_small_gpu_gets_a_shorter_sequence_said_in_the_config(tmp_path):
    out = tmp_path / "g.yaml"
    written = new.new_config("gemma-2-9b", None, out, vram="8GB")
    cfg = load_config(out)
    assert cfg.data.max_length < new.DEFAULT_SEQ and cfg.data.train == new.PLACEHOLDER
    assert planned(cfg, parse_bytes("8GB")).fits
    assert f"# note: data.max_length {cfg.data.max_length}, not {new.DEFAULT_SEQ}" in out.read_text()
    assert "CHANGE THIS" in out.read_text() and written.choice.seq == cfg.data.max_length


def test_too_small_a_gpu_names_the_smallest_that_fits(tmp_path):
    with pytest.raises(PlanError, match=r"too small for llama-3.1-8b .* smallest VRAM that fits is (\d+)GB") as e:
        new.new_config("llama-3.1-8b", None, tmp_path / "x.yaml", vram="3GB")
    assert "\n" not in str(e.value)
    smallest = re.search(r"fits is (\d+)GB", str(e.value)).group(1)
    new.new_config("llama-3.1-8b", None, tmp_path / "x.yaml", vram=f"{smallest}GB")  # and it does fit
    assert load_config(tmp_path / "x.yaml").data.max_length >= new.MIN_SEQ


def test_a_base_folder_is_planned_from_its_config(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}
    config |= {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text("{}")  # no chat template: chat data gets chatml
    out = tmp_path / "f.yaml"
    written = new.new_config(str(folder), str(sharegpt(tmp_path / "d.jsonl", words=2000)), out, vram="8GB")
    cfg = load_config(out)
    assert cfg.model.name == str(folder) and cfg.data.max_length == 512  # its context
    assert cfg.data.chat_template == "chatml" and written.choice.plan.arch == str(folder)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(base="no-such-model"), PlanError, "--base: unknown architecture 'no-such-model'"),
        (dict(vram="lots"), PlanError, "--vram: cannot read 'lots'"),
        (dict(data="missing.jsonl"), DataError, "missing.jsonl: no such file"),
        (dict(data="notes.txt"), DataError, "notes.txt: unsupported file type"),
        (dict(data="bad.jsonl"), DataError, "bad.jsonl: row 1: "),
        (dict(data="odd.jsonl"), DataError, "odd.jsonl: row 1: cannot tell the format"),
        (dict(data="empty.jsonl"), DataError, "empty.jsonl: holds no records"),
        (dict(out="exists.yaml"), ConfigError, "exists.yaml exists: .* --force"),
        (dict(out="my.json"), ConfigError, "a config is a .yaml file"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("hi")
    Path("bad.jsonl").write_text("{not json\n")
    Path("odd.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    Path("empty.jsonl").write_text("\n")
    Path("exists.yaml").write_text("recipe: sft\n")
    sharegpt(Path("ok.jsonl"))
    args = dict(base="smollm2-135m", data="ok.jsonl", out="out.yaml", vram="8GB") | kwargs
    with pytest.raises(error, match=match) as e:
        new.new_config(args["base"], args["data"], args["out"], vram=args["vram"])
    assert "\n" not in str(e.value)
    assert Path("exists.yaml").read_text() == "recipe: sft\n"


def test_force_replaces_and_the_cli_prints_one_line_errors(tmp_path, monkeypatch, capsys):
    from qtune.cli import main

    monkeypatch.chdir(tmp_path)
    sharegpt(Path("d.jsonl"))
    Path("my.yaml").write_text("old\n")
    with pytest.raises(SystemExit) as e:
        main(["new", "--base", "smollm2-135m", "--data", "d.jsonl", "--vram", "8GB", "-o", "my.yaml"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    main(["new", "--base", "smollm2-135m", "--data", "d.jsonl", "--vram", "8GB", "-o", "my.yaml", "--force"])
    assert "wrote my.yaml" in capsys.readouterr().out and load_config("my.yaml").output.name == "my"


@pytest.mark.parametrize("family_name, gb", SHIPPED, ids=[f"{f}_{gb}gb" for f, gb in SHIPPED])
def test_shipped_config_fits_its_tier(family_name, gb):
    path = ROOT / family.config_path(family_name, gb)
    cfg = load_config(path)
    assert cfg.train.fit_to_vram == f"{gb}GB" and cfg.data.train == new.PLACEHOLDER
    assert planned(cfg, parse_bytes(f"{gb}GB")).fits
    assert "CHANGE THIS" in path.read_text()


def test_every_shipped_base_is_fetched_from_the_hub_by_its_id(monkeypatch):
    """Each shipped config's model.name reaches the hub as it is ('meta-llama/Llama-3.1-8B-Instruct' was once refused
    for the dot in it, taken for a file suffix): the download is the first thing that fails here, offline."""
    import huggingface_hub

    from qtune.errors import ModelError
    from qtune.models import resolve_base

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kw: asked.append(name) or 1 / 0)
    names = sorted({load_config(ROOT / family.config_path(f, gb)).model.name for f, gb in SHIPPED})
    for name in names:
        with pytest.raises(ModelError, match="could not get"):
            resolve_base(name)
    assert asked == names and any("." in n for n in names)


def test_shipped_configs_are_what_the_generator_writes_today():
    """A planner change that moves a shipped config fails here: run `python recipes/configs/make_family_configs.py`."""
    stale = [p for p, text in TEXTS.items() if not (ROOT / p).is_file() or (ROOT / p).read_text("utf-8") != text]
    stale += [p for p in SKIPPED if (ROOT / p).exists()]
    assert not stale, f"regenerate with `{family.REGENERATE}`: {stale}"


@pytest.mark.parametrize("family_name, gb", SHIPPED, ids=[f"{f}_{gb}gb" for f, gb in SHIPPED])
def test_qtune_new_with_data_fits_every_family_and_tier(tmp_path, family_name, gb):
    out = tmp_path / "run.yaml"
    new.new_config(family_name, str(sharegpt(tmp_path / "d.jsonl", n=500, words=400)), out, vram=f"{gb}GB")
    cfg = load_config(out)
    assert planned(cfg, parse_bytes(f"{gb}GB")).fits
    assert yaml.safe_load(out.read_text())["output"]["name"] == "run"
