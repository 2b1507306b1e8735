"""The command line as a user runs it: train (built-in and copied recipe), cp, generate, eval, errors; --version,
--help, ls, config, train --show-config; and how pyproject.toml installs qtune and its recipes."""

import json
from pathlib import Path

import pytest

from qtune.cli import main
from tests.test_train import ROWS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def workspace(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "run.yaml").write_text(
        f"# qtune train run.yaml\nmodel:\n  name: {tiny_model_dir}\n  dtype: fp32\nquant:\n  method: none\n"
        "data:\n  train: train.jsonl\ntrain:\n  max_steps: 2\n  batch_size: 4\n  lr: 1.0e-2\n"
    )
    return tmp_path


def test_train_generate_eval(workspace, capsys):
    main(["train", "run.yaml", "lora.r=2"])
    adapter = workspace / "adapters" / "run"
    assert (adapter / "adapter_model.safetensors").is_file()
    capsys.readouterr()

    main(["generate", str(adapter), "--prompt", "the movie was great", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    from qtune.evaluate import generate
    from qtune.lora import load_adapter

    model, tokenizer, cfg, _ = load_adapter(adapter)
    assert printed == generate(model, tokenizer, "the movie was great", cfg.data.system_prompt, 4) + "\n"
    main(["eval", str(adapter), "--data", "train.jsonl"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["adapter"] == str(adapter)
    assert result["examples"] == len(ROWS) and result["answered"] == len(ROWS)
    assert {"loss", "perplexity", "accuracy", "contains_accuracy"} <= set(result)
    main(["eval", str(adapter), "--data", "train.jsonl", "--base-only", "--limit", "3"])
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert base["adapter"] is None and base["examples"] == 3
    assert base["loss"] != result["loss"]


def test_cp_then_train_with_the_copied_recipe(workspace, capsys):
    main(["cp", "sft", "my_sft.py"])
    recipe = workspace / "my_sft.py"
    text = recipe.read_text()
    assert "def main(cfg: RunConfig)" in text
    # A user's edit: mark the run, to prove the copy (not the built-in) ran.
    recipe.write_text(text.replace("    run = train.start(cfg)", '    print("MY RECIPE")\n    run = train.start(cfg)'))
    main(["train", "run.yaml", "recipe=my_sft.py", "output.name=mine"])
    assert "MY RECIPE" in capsys.readouterr().out
    assert (workspace / "adapters" / "mine" / "qtune.json").is_file()
    with pytest.raises(SystemExit, match="exists"):
        main(["cp", "sft", "my_sft.py"])


def test_cp_a_config(workspace):
    main(["cp", "smollm2_sentiment.yaml", "."])
    assert (workspace / "smollm2_sentiment.yaml").read_text().startswith("# ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "run.yaml", "train.lrr=1"], "did you mean `train.lr`?"),
        (["train", "missing.yaml"], "config file missing.yaml does not exist"),
        (["train", "run.yaml", "data.train=nope.jsonl"], "nope.jsonl: no such file or folder"),
        (["train", "run.yaml", "model.name=./no/such/model"], "model.name"),
        (["train", "run.yaml", "lora.targets=[not_a_module]"], "lora.targets"),
        (["generate", "adapters/none", "--prompt", "x"], "adapters/none: no such adapter folder"),
    ],
)
def test_errors_exit_2_with_one_clear_line(workspace, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.replace("\r", "\n")  # progress bars share stderr
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert message in line
    assert not (workspace / "adapters").exists() or not any((workspace / "adapters").iterdir())


def test_unknown_recipe(workspace):
    with pytest.raises(SystemExit, match="neither a built-in"):
        main(["train", "run.yaml", "recipe=nope"])


def test_train_accepts_a_recipe_file_before_the_config(workspace, capsys):
    main(["cp", "sft", "mine.py"])
    recipe = workspace / "mine.py"
    recipe.write_text(
        recipe.read_text().replace("    run = train.start(cfg)", '    print("MINE")\n    run = train.start(cfg)')
    )
    main(["train", "mine.py", "run.yaml", "output.name=via-file"])
    assert "MINE" in capsys.readouterr().out
    assert (workspace / "adapters" / "via-file" / "adapter_model.safetensors").is_file()


def test_hub_id_without_network_is_a_clear_error(workspace, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(workspace / "hf-home"))  # an empty hub cache
    with pytest.raises(SystemExit):
        main(["train", "run.yaml", "model.name=someone/not-cached"])
    err = capsys.readouterr().err
    assert "error: model.name: could not get 'someone/not-cached' from the hub" in err


def test_plan_prints_a_breakdown_and_json(capsys):
    small = ["--seq", "1024", "--batch", "1", "--gradient-checkpointing", "on"]  # (defaults: a default config's)
    main(["plan", "llama-2-7b", "--vram", "8GB", *small])
    out = capsys.readouterr().out
    assert "llama-2-7b: nf4 + double quant, seq 1024 x batch 1" in out and "fits in 8.00 GiB" in out
    main(["plan", "llama-2-7b", "--vram", "8192MiB", *small, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["vram"] == 8 << 30 and data["fits"] is True and data["input"]["seq"] == 1024
    assert data["total"] == sum(data["breakdown"].values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "llama-2-7b", "--vram", "8 potatoes"], "--vram: cannot read '8 potatoes'"),
        (["plan", "nobody/nothing"], "unknown architecture 'nobody/nothing'"),
    ],
)
def test_plan_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_plan_rejects_impossible_numbers(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "llama-2-7b", "--seq", "0"])
    assert "--seq must be a positive integer, got 0" in capsys.readouterr().err


def test_fit_to_vram_in_a_recipe_config(workspace, capsys, tiny_model_dir):
    from qtune import plan

    # The tiny model needs a few hundred MiB at most: a budget that holds micro-batch 2 but not 4.
    arch = plan.load_arch(str(tiny_model_dir))
    main(["train", "run.yaml", "output.name=probe"])
    capsys.readouterr()
    from qtune.data import load_examples
    from qtune.models import load_tokenizer

    cfg_data = json.loads((workspace / "adapters" / "probe" / "qtune.json").read_text())["config"]["data"]
    from qtune.config import DataConfig

    examples, _ = load_examples("train.jsonl", load_tokenizer(tiny_model_dir), DataConfig(**cfg_data))
    longest = -(-max(len(e.input_ids) for e in examples) // 8) * 8  # batches are padded to a multiple of 8
    base = plan.PlanInput(seq=longest, lora_r=16, dtype="fp32", quant="none", gradient_checkpointing=False)
    need = {b: plan.estimate(arch, plan.PlanInput(**{**base.__dict__, "batch": b})).total for b in (2, 4)}
    budget = (need[2] + need[4]) // 2
    main(["train", "run.yaml", f"train.fit_to_vram={budget}B", "train.batch_size=4", "output.name=fitted"])
    out = capsys.readouterr().out
    assert "micro-batch 2 x grad_accum 2, gradient checkpointing off" in out
    assert f"(planned peak {need[2] / 2**30:.2f} GiB at {longest} tokens)" in out
    chosen = json.loads((workspace / "adapters" / "fitted" / "qtune.json").read_text())["config"]["train"]
    assert (chosen["batch_size"], chosen["grad_accum"]) == (2, 2)


def test_fit_to_vram_is_validated(workspace, capsys):
    with pytest.raises(SystemExit):
        main(["train", "run.yaml", "train.fit_to_vram=lots"])
    assert "train.fit_to_vram: --vram: cannot read 'lots'" in capsys.readouterr().err


def test_fit_to_vram_that_cannot_be_met_names_the_keys(workspace, capsys):
    with pytest.raises(SystemExit):
        main(["train", "run.yaml", "train.fit_to_vram=1MiB"])
    err = capsys.readouterr().err
    assert "error: train.fit_to_vram=1MiB cannot be met" in err and "data.max_length" in err
    assert not (workspace / "adapters").exists()


def test_plan_per_gpu_flags(capsys):
    main(["plan", "llama-2-7b", "--gpus", "2", "--sharding", "fsdp", "--json"])
    fsdp = json.loads(capsys.readouterr().out)
    main(["plan", "llama-2-7b", "--json"])
    one = json.loads(capsys.readouterr().out)
    assert fsdp["input"]["gpus"] == 2 and fsdp["total"] < one["total"]
    with pytest.raises(SystemExit):
        main(["plan", "llama-2-7b", "--gpus", "0"])
    assert "--gpus must be a positive integer, got 0" in capsys.readouterr().err


def test_a_changed_base_is_refused_unless_the_mismatch_is_ignored(workspace, capsys, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    main(["train", "run.yaml", "lora.r=2"])
    adapter = str(workspace / "adapters" / "run")
    capsys.readouterr()
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    changed = {k: v * 1.001 if i == 0 else v for i, (k, v) in enumerate(original.items())}
    save_file(changed, str(tiny_model_dir / "model.safetensors"), metadata={"format": "pt"})
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["generate", adapter, "--prompt", "hello", "--max-new-tokens", "2"])
        assert exit_.value.code == 2 and "--ignore-base-mismatch" in capsys.readouterr().err
        main(["generate", adapter, "--prompt", "hello", "--max-new-tokens", "2", "--ignore-base-mismatch"])
        captured = capsys.readouterr()
        assert captured.out.endswith("\n") and "error" not in captured.err  # generated (possibly empty) text
    finally:
        save_file(original, str(tiny_model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: set --token"),
        (["serve", "--adapters", "no/such/folder"], "no/such/folder"),
        (["serve", "--max-adapter-memory", "lots"], "--max-adapter-memory"),
    ],
)
def test_serve_refuses_bad_flags_before_loading_anything(capsys, argv, message, monkeypatch):
    from qtune.serve import pool

    monkeypatch.setattr(pool, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error:") and message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "adapters/x", "--data", "d.jsonl", "--limit", "-1"], "--limit must be a positive integer, got -1"),
        (["eval", "adapters/x", "--data", "d.jsonl", "--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
        (["generate", "adapters/x", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
    ],
)
def test_counts_on_the_command_line_must_be_positive(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- CLI habits: --version, --help, ls, config


def _exit_code(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


def test_version_is_the_installed_distribution_else_the_source_tree(capsys, monkeypatch):
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"qtune {importlib.metadata.version(pyproject['name'])}\n"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"qtune {pyproject['version']}\n"


def test_help_lists_each_verb_on_one_line_and_ends_with_an_example(capsys, monkeypatch):
    from qtune.cli import build_parser

    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: argparse wraps help at the terminal's width
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for verb in build_parser()._subparsers._group_actions[0].choices:
        (line,) = [line for line in lines if line.split()[:1] == [verb]]
        assert len(line.split()) > 2, line  # the verb and its help, on one line
    last = [line.split()[:2] for line in lines[-3:]]
    assert last == [["qtune", "new"], ["qtune", "train"], ["qtune", "serve"]], out


def test_ls_lists_recipes_configs_and_models(capsys):
    from qtune.models import EMBEDDED_ALIAS, ENCODER_ALIAS
    from qtune.plan import BUILTIN

    main(["ls"])
    out = capsys.readouterr().out
    assert "  sft          Supervised fine-tuning with (Q)LoRA" in out
    assert "  classify     " in out
    configs = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        description = path.read_text().splitlines()[0].lstrip("# ")
        assert f"  {path.name}" in out and description in out
    for name in (EMBEDDED_ALIAS, ENCODER_ALIAS, *BUILTIN):
        assert name in out


def test_config_prints_every_key_with_its_default_and_help(capsys):
    from qtune.config import valid_keys

    main(["config"])
    out = capsys.readouterr().out
    for key in valid_keys():
        assert f"\n{key}: " in out or out.startswith(f"{key}: ")
    assert "# train: Optimisation." in out
    assert "data.train[].weight: float = 1.0" in out  # a data.train source's fields too

    main(["config", "train.lr"])
    assert capsys.readouterr().out == "train.lr: float = 0.0002\n    Peak learning rate.\n"
    main(["config", "quant"])
    out = capsys.readouterr().out
    assert out.startswith("# quant: ") and "quant.method: nf4 | fp4 | int8 | none = nf4\n" in out
    assert {line.split(":")[0] for line in out.splitlines() if line[:1].isalpha()} == {
        "quant.method",
        "quant.double_quant",
    }


@pytest.mark.parametrize(
    "key, message",
    [
        ("train.lrr", "unknown config key `train.lrr`; did you mean `train.lr`"),
        ("lora.rnak", "did you mean `lora.r`"),
        ("optimizer", "`train.optim`"),
        ("zzzz.qqqq", "unknown config key `zzzz.qqqq`; `qtune config` lists every key"),
    ],
)
def test_config_unknown_key_is_one_line_with_close_matches(capsys, key, message):
    assert _exit_code(["config", key]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err


def test_train_show_config_prints_the_resolved_config_and_trains_nothing(workspace, capsys):
    import yaml

    from qtune.config import load_config

    main(["train", "run.yaml", "lora.r=2", "train.lr=3e-4", "--show-config"])
    printed = capsys.readouterr().out
    assert printed.startswith("# the resolved config of `qtune train run.yaml lora.r=2 train.lr=3e-4` (recipe: sft)")
    values = yaml.safe_load(printed)
    assert values["lora"]["r"] == 2 and values["train"]["lr"] == 3e-4 and values["output"]["name"] == "run"
    (workspace / "resolved.yaml").write_text(printed)
    assert load_config("resolved.yaml") == load_config("run.yaml", ["lora.r=2", "train.lr=3e-4"])
    main(["train", "--show-config", "run.yaml", "lora.r=3"])
    assert yaml.safe_load(capsys.readouterr().out)["lora"]["r"] == 3
    assert not (workspace / "adapters").exists()
    assert _exit_code(["train", "run.yaml", "lora.rr=3", "--show-config"]) == 2
    assert "did you mean `lora.r`" in capsys.readouterr().err


def test_serve_without_its_extra_names_the_extra(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: `import uvicorn` raises ImportError
    assert _exit_code(["serve", "--adapters", "adapters"]) == 2
    err = capsys.readouterr().err
    assert err == "error: qtune serve needs uvicorn: pip install 'qtune-lora[serve]'\n"


# ---------------------------------------------------------------- packaging


def test_pyproject_installs_every_package_and_recipes_under_qtune():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "qtune").rglob("__init__.py")}
    assert set(setuptools["packages"]) == tree | {"qtune.recipes", "qtune.recipes.configs"}
    assert setuptools["package-dir"] == {"qtune.recipes": "recipes"}
    assert not any(p == "recipes" or p.startswith("recipes.") for p in setuptools["packages"])
    # `make test` installs .[dev]: it brings every other extra, so the tests exercise them all.
    extras = project["project"]["optional-dependencies"]
    name = project["project"]["name"]
    (bundle,) = [r for r in extras["dev"] if r.startswith(f"{name}[")]
    assert set(bundle[len(name) + 1 : -1].split(",")) == set(extras) - {"dev"}


def test_the_built_in_recipes_load_as_qtune_recipes():
    from qtune import cli, recipes_package

    package, folder = recipes_package()
    assert package == "qtune.recipes" and folder.resolve() == (REPO / "recipes").resolve()
    assert cli._recipe_main("sft").__module__ == "qtune.recipes.sft"
