from pathlib import Path

import pytest

from qtune.config import ConfigError, RunConfig, from_dict, load_config, parse_overrides, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "recipes" / "configs").glob("*.yaml"))


def test_defaults_are_qlora_nf4_all_linear():
    cfg = RunConfig()
    assert cfg.quant.method == "nf4" and cfg.quant.double_quant
    assert cfg.lora.targets == "all-linear"
    assert cfg.model.name == "smollm2-135m"


def test_yaml_and_typed_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: some/model\ntrain:\n  lr: 1.0e-4\n  batch_size: 4\n")
    cfg = load_config(
        path,
        [
            "train.lr=5e-5",
            "lora.targets=[q_proj,v_proj]",
            "quant.method=int8",
            "train.gradient_checkpointing=on",
            "model.revision=null",
        ],
    )
    assert cfg.model.name == "some/model"
    assert cfg.train.lr == pytest.approx(5e-5)  # "5e-5" is a string to YAML 1.1; coerced by the field type
    assert cfg.train.batch_size == 4
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert load_config(None, ["lora.targets=q_proj,v_proj"]).lora.targets == ["q_proj", "v_proj"]
    assert cfg.quant.method == "int8"
    assert cfg.train.gradient_checkpointing is True
    assert cfg.output.name == "run"  # defaults to the config file's stem


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key `train.lrr`; did you mean `train.lr`?"),
        ("trian.lr=1", "unknown config key `trian`; did you mean `train`?"),
        ("lora.rank=8", "did you mean `lora.r`?"),
        ("data.max_len=8", "did you mean `data.max_length`?"),
        ("quant.method=nf5", "`quant.method` must be one of nf4, fp4, int8, none; got 'nf5'"),
        ("lora.r=abc", "`lora.r` must be an integer; got 'abc'"),
        ("train.batch_size=0", "train.batch_size must be positive"),
        ("lora.r=0", "lora.r must be a positive integer"),
        ("train.gradient_checkpointing=maybe", "`train.gradient_checkpointing` must be true or false"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be positive, got 0"),
        ("train.pad_to_multiple_of=-8", "train.pad_to_multiple_of must be >= 0 (0: no extra padding), got -8"),
        ("train.lr", "not of the form key=value"),
        ("model.name.x=1", "`model.name` must be a string"),
        ("eval.batch_size=0", "eval.batch_size must be positive"),
        ("eval.limit=-1", "eval.limit must be positive or null"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    path.write_text("train:\n  epochz: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key `train.epochz`; did you mean `train.epochs`"):
        load_config(path)


def test_round_trip_through_dict():
    cfg = load_config(None, ["lora.r=4", "data.system_prompt=Be brief."])
    assert from_dict(to_dict(cfg)) == cfg


def test_parse_overrides_nests_and_keeps_text_as_typed():
    assert parse_overrides(["a.b=1", "a.c=x", "a.d=[1, 2]"]) == {"a": {"b": "1", "c": "x", "d": [1, 2]}}
    cfg = load_config(
        None,
        ["data.system_prompt=Answer with one word: yes or no.", "train.epochs=2", "output.name=null", "eval.limit=5"],
    )
    assert cfg.data.system_prompt == "Answer with one word: yes or no."
    assert cfg.train.epochs == 2.0 and cfg.output.name is None and cfg.eval.limit == 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_say_how_to_run(path):
    cfg = load_config(path)
    assert cfg.recipe
    head = path.read_text().splitlines()[:3]
    assert any(line.startswith("#") and f"qtune train recipes/configs/{path.name}" in line for line in head)


def test_there_is_a_shipped_config():
    assert CONFIGS


def test_a_renamed_key_still_loads_with_a_note_and_both_names_are_refused(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  keep_checkpoints: 5\n")
    assert load_config(old).train.save_limit == 5
    assert "train.keep_checkpoints -> train.save_limit" in capsys.readouterr().out
    assert load_config(None, ["train.keep_checkpoints=4"]).train.save_limit == 4
    with pytest.raises(ConfigError, match="`train.keep_checkpoints` is the old name of `train.save_limit`"):
        load_config(old, ["train.save_limit=3"])
    # An adapter's qtune.json written before the rename: its recorded config still reads, and is not changed.
    recorded = to_dict(RunConfig())
    recorded["train"]["keep_checkpoints"] = recorded["train"].pop("save_limit")
    assert from_dict(recorded).train.save_limit == 2 and "keep_checkpoints" in recorded["train"]


@pytest.mark.parametrize("recorded", [None, [], "x"])
def test_a_recorded_config_that_is_not_a_mapping_is_a_clear_error(recorded):
    from qtune.errors import AdapterError
    from qtune.meta import AdapterMeta

    with pytest.raises(ConfigError, match="must be a mapping"):
        from_dict(recorded)
    with pytest.raises(AdapterError, match="qtune.json: its recorded config is invalid"):
        AdapterMeta.from_json({"config": recorded, "base": {"fingerprint": "sha256:0"}})


@pytest.mark.parametrize("key", ["train.lr", "train.epochs", "train.warmup", "lora.alpha", "data.eval_fraction"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_naming_the_key(key, value, tmp_path):
    with pytest.raises(ConfigError, match=rf"`{key}` must be a finite number"):
        load_config(None, [f"{key}={value}"])
    section, leaf = key.split(".")
    yaml_file = tmp_path / "c.yaml"  # YAML's own .nan / .inf are floats already
    yaml_file.write_text(f"{section}:\n  {leaf}: {'.nan' if value == 'nan' else value.replace('inf', '.inf')}\n")
    with pytest.raises(ConfigError, match=rf"c.yaml: `{key}` must be a finite number"):
        load_config(yaml_file)


def test_another_process_training_into_the_same_output_is_refused_by_name(tmp_path):
    import subprocess
    import sys

    from qtune.train.run import lock_output, unlock_output

    out = tmp_path / "adapters" / "mine"
    holder = "from pathlib import Path; import sys, time; from qtune.train.run import lock_output; "
    holder += f"lock_output(Path({str(out)!r})); print('locked', flush=True); time.sleep(60)"
    other = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"{out} is being trained by pid {other.pid} on .*: wait for that run"):
            lock_output(out)
    finally:
        other.kill()
        other.wait()
    lock_output(out)  # the OS released the killed process's lock
    lock_output(out)  # and this process may start again (a retry after an error)
    unlock_output(out)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_grad_norm=-1", r"train.max_grad_norm must be >= 0 \(0: no clipping\), got -1.0"),
        ("train.weight_decay=-0.1", r"train.weight_decay must be >= 0"),
        ("lora.alpha=0", r"lora.alpha must be positive"),
    ],
)
def test_values_outside_their_meaning_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
