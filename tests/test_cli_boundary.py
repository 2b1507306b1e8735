"""Every verb of the command line against a corpus of bad inputs: one `error:` line, a non-zero exit, no
traceback, nothing half-written. And the boundary itself: an unexpected exception is one line naming the
verb and its input, with the traceback only under --debug (or QTUNE_DEBUG=1); Ctrl-C exits 130.

Inputs are written per case into the test's folder from markers in the argv:
  <missing> <dir> <file>          a path that does not exist, an empty folder, a text file
  <KIND.SUFFIX>                   a file of KIND (see FILES) named KIND.SUFFIX, e.g. <binary.jsonl>
  <adapter> <classifier>          copies of a good causal-LM and a good classification adapter
  <adapter:HARM>                  a copy of the causal-LM adapter with one harm done (see ADAPTER_HARMS)
  <base:HARM>                     a copy of the tiny base model's folder with one harm done (see BASE_HARMS)
  <model:KIND>                    a model folder holding only config.json, a KIND file (for `plan`)
  <run.yaml>                      a valid training config (tiny base, good data, output.dir in the test folder)
  <out-new> <out-file>            an output path that does not exist (and must not afterwards), an existing file
Adapters are not trained: saved with random LoRA weights on the tiny random Llama (tests/test_pool.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qtune import cli
from qtune.cli import main
from tests.test_pool import make_classifier_adapter, make_qtune_adapter
from tests.test_train import ROWS

# File contents by kind: each one kind of bad file a user hands in.
FILES = {
    "empty": b"",
    "binary": bytes(range(256)) * 3,
    "badutf8": b'{"text": "na\xefve \xff\xfe"}\n',
    "list": b"[]",
    "surrogate": (
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "ok"}]}\n'
    ),
    "labelled-surrogate": b'{"text": "a\\ud800b", "label": "positive"}\n',
    "nan": b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": NaN}',
}


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _set_json(name: str, text: bytes):
    return lambda folder: (folder / name).write_bytes(text)


def _surrogate_system_prompt(folder: Path) -> None:
    meta = json.loads((folder / "qtune.json").read_text())
    meta["config"]["data"]["system_prompt"] = "\ud800"
    (folder / "qtune.json").write_text(json.dumps(meta))  # ensure_ascii: written as the escape "\ud800"


def _weights_folder(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()


# One harm done to a copy of a good adapter folder.
ADAPTER_HARMS = {
    "list-meta": _set_json("qtune.json", b"[]"),
    "list-config": _set_json("adapter_config.json", b"[]"),
    "empty-meta": _set_json("qtune.json", b""),
    "binary-meta": _set_json("qtune.json", FILES["binary"]),
    "badutf8-meta": _set_json("qtune.json", b'{"kind": "\xff"}'),
    "no-config": lambda folder: (folder / "adapter_config.json").unlink(),
    "truncated-weights": lambda folder: _truncate(folder / "adapter_model.safetensors"),
    "garbage-weights": _set_json("adapter_model.safetensors", FILES["binary"]),
    "weights-folder": _weights_folder,
    "surrogate-system-prompt": _surrogate_system_prompt,
}
# The file each adapter harm must be blamed on, in the error line of every verb that reads the folder.
BLAMED = {
    "list-meta": "qtune.json",
    "list-config": "adapter_config.json",
    "empty-meta": "qtune.json",
    "binary-meta": "qtune.json",
    "no-config": "adapter_config.json",
    "truncated-weights": "adapter_model.safetensors",
    "garbage-weights": "adapter_model.safetensors",
}
# One harm done to a copy of the tiny base model's folder.
BASE_HARMS = {
    "list-config": _set_json("config.json", b"[]"),
    "truncated-weights": lambda folder: _truncate(folder / "model.safetensors"),
    "garbage-tokenizer": _set_json("tokenizer.json", FILES["binary"]),
}
# What every verb that reads an adapter folder is given.
ADAPTER_CORPUS = ["<missing>", "<file>", "<dir>", *(f"<adapter:{harm}>" for harm in ADAPTER_HARMS)]
DATA_CORPUS = ["<missing>", "<dir>", "<empty.jsonl>", "<binary.jsonl>", "<badutf8.jsonl>", "<list.json>"]
NEW = "<out-new>"


def _adapter_cases(verb: str, argv: list[str], skip: tuple[str, ...] = ()) -> list:
    """`argv` with ADAPTER in place of the adapter, once per adapter of the corpus."""
    return [
        pytest.param([verb, *(a if a != "ADAPTER" else bad for a in argv)], id=f"{verb}-{bad.strip('<>')}")
        for bad in ADAPTER_CORPUS
        if bad.strip("<>").split(":")[-1] not in skip
    ]


def _cases(verb: str, rows: list[tuple[str, list[str]]]) -> list:
    return [pytest.param([verb, *argv], id=f"{verb}-{name}") for name, argv in rows]


TRAIN = _cases(
    "train",
    [
        ("config-missing", ["<missing>"]),
        ("config-dir", ["<dir>"]),
        ("config-empty", ["<empty.yaml>"]),
        ("config-binary", ["<binary.yaml>"]),
        ("config-badutf8", ["<badutf8.yaml>"]),
        ("config-list", ["<list.yaml>"]),
        ("lr-nan", ["<run.yaml>", "train.lr=nan"]),
        ("lr-inf", ["<run.yaml>", "train.lr=inf"]),
        ("unknown-key", ["<run.yaml>", "train.lrr=1"]),
        ("unknown-section", ["<run.yaml>", "nope.x=1"]),
        ("override-without-value", ["<run.yaml>", "lora.r"]),
        ("negative-steps", ["<run.yaml>", "train.max_steps=-1"]),
        ("recipe-dir", ["<run.yaml>", "recipe=<dir>"]),
        ("model-file", ["<run.yaml>", "model.name=<file>"]),
        ("model-empty-dir", ["<run.yaml>", "model.name=<dir>"]),
        *((f"base-{harm}", ["<run.yaml>", f"model.name=<base:{harm}>"]) for harm in BASE_HARMS),
        ("output-dir-is-a-file", ["<run.yaml>", "output.dir=<out-file>"]),
        *((f"data-{d.strip('<>')}", ["<run.yaml>", f"data.train={d}"]) for d in DATA_CORPUS),
        ("data-surrogate", ["<run.yaml>", "data.train=<surrogate.jsonl>"]),
        ("dpo-on-sft-data", ["<run.yaml>", "recipe=dpo"]),
        ("dpo-beta-zero", ["<run.yaml>", "recipe=dpo", "dpo.beta=0"]),
        ("dpo-unknown-loss", ["<run.yaml>", "recipe=dpo", "dpo.loss=nope"]),
        ("grpo-reward-not-a-path", ["<run.yaml>", "recipe=grpo", "grpo.rewards=exact_answer"]),
        ("grpo-reward-missing-module", ["<run.yaml>", "recipe=grpo", "grpo.rewards=nowhere_at_all:f"]),
        ("grpo-reward-missing-file", ["<run.yaml>", "recipe=grpo", "grpo.rewards=<missing>:f"]),
        ("grpo-reward-binary-file", ["<run.yaml>", "recipe=grpo", "grpo.rewards=<binary.py>:f"]),
        ("grpo-group-of-one", ["<run.yaml>", "recipe=grpo", "grpo.group_size=1"]),
        ("from-adapter-missing", ["<run.yaml>", "lora.from_adapter=<missing>"]),
        ("from-adapter-dir", ["<run.yaml>", "lora.from_adapter=<dir>"]),
        ("from-adapter-classifier", ["<run.yaml>", "lora.from_adapter=<classifier>"]),
        *(
            (f"from-adapter-{h}", ["<run.yaml>", f"lora.from_adapter=<adapter:{h}>"])
            for h in ADAPTER_HARMS
            if "meta" in h or "weights" in h or "config" in h
        ),
        ("show-config-unknown-key", ["<run.yaml>", "train.lrr=1", "--show-config"]),
        ("show-config-config-missing", ["<missing>", "--show-config"]),
    ],
)
CP = _cases(
    "cp",
    [
        ("unknown-name", ["nope", NEW]),
        ("dest-exists", ["sft", "<out-file>"]),
        ("dest-under-a-file", ["sft", "<file>/x.py"]),
        ("dest-parent-missing", ["sft", "<missing>/x.py"]),
        ("name-surrogate", ["\udcff", NEW]),
    ],
)
GENERATE = [
    *_adapter_cases("generate", ["ADAPTER", "--prompt", "hi", "--max-new-tokens", "2"]),
    *_cases(
        "generate",
        [
            ("prompt-surrogate", ["<adapter>", "--prompt", "a\ud800b", "--max-new-tokens", "2"]),
            ("prompt-undecodable-byte", ["<adapter>", "--prompt", "a\udcffb", "--max-new-tokens", "2"]),
            ("max-new-tokens-0", ["<adapter>", "--prompt", "hi", "--max-new-tokens", "0"]),
            ("max-new-tokens-abc", ["<adapter>", "--prompt", "hi", "--max-new-tokens", "abc"]),
            ("no-prompt", ["<adapter>"]),
            ("classifier", ["<classifier>", "--prompt", "hi"]),
        ],
    ),
]
EVAL = [
    *_adapter_cases("eval", ["ADAPTER", "--data", "<good.jsonl>"]),
    *_cases(
        "eval",
        [
            *((f"data-{d.strip('<>')}", ["<adapter>", "--data", d]) for d in DATA_CORPUS),
            ("data-surrogate", ["<adapter>", "--data", "<surrogate.jsonl>"]),
            ("limit-negative", ["<adapter>", "--data", "<good.jsonl>", "--limit", "-1"]),
            ("max-new-tokens-0", ["<adapter>", "--data", "<good.jsonl>", "--max-new-tokens", "0"]),
            ("classifier-data-surrogate", ["<classifier>", "--data", "<labelled-surrogate.jsonl>"]),
        ],
    ),
]
PREDICT = [
    *_adapter_cases("predict", ["ADAPTER", "--text", "hi"]),
    *_cases(
        "predict",
        [
            ("text-surrogate", ["<classifier>", "--text", "a\ud800b"]),
            ("text-undecodable-byte", ["<classifier>", "--text", "a\udcffb"]),
            *((f"data-{d.strip('<>')}", ["<classifier>", "--data", d]) for d in DATA_CORPUS),
            ("data-surrogate", ["<classifier>", "--data", "<labelled-surrogate.jsonl>"]),
            ("neither-text-nor-data", ["<classifier>"]),
            ("causal-adapter", ["<adapter>", "--text", "hi"]),
        ],
    ),
]
PLAN = _cases(
    "plan",
    [
        ("model-missing", ["<missing>"]),
        ("model-file", ["<file>"]),
        ("model-empty-dir", ["<dir>"]),
        *((f"model-{kind}-config", [f"<model:{kind}>"]) for kind in ("empty", "binary", "badutf8", "list", "nan")),
        ("vram-abc", ["llama-2-7b", "--vram", "abc"]),
        ("vram-negative", ["llama-2-7b", "--vram", "-8GB"]),
        ("vram-nan", ["llama-2-7b", "--vram", "nanGB"]),
        ("vram-inf", ["llama-2-7b", "--vram", "infGB"]),
        ("vram-zero", ["llama-2-7b", "--vram", "0GB"]),
        ("seq-0", ["llama-2-7b", "--seq", "0"]),
        ("targets-empty", ["llama-2-7b", "--targets", ","]),
        ("targets-unknown", ["llama-2-7b", "--targets", "no_such_proj"]),
    ],
)
MERGE = [
    *_adapter_cases("merge", ["ADAPTER", NEW]),
    *_cases(
        "merge",
        [
            ("out-is-a-file", ["<adapter>", "<out-file>"]),
            ("out-under-a-file", ["<adapter>", "<file>/merged"]),
            ("shard-size-abc", ["<adapter>", NEW, "--max-shard-size", "abc"]),
            ("shard-size-0", ["<adapter>", NEW, "--max-shard-size", "0"]),
        ],
    ),
]
EXPORT = [
    *_adapter_cases("export", ["ADAPTER", NEW, "--format", "peft"]),
    *_adapter_cases("export", ["ADAPTER", NEW, "--format", "gguf-lora"], skip=("missing", "file", "dir")),
    *_cases(
        "export",
        [
            ("peft-out-is-a-file", ["<adapter>", "<out-file>", "--format", "peft"]),
            ("gguf-out-is-a-file", ["<adapter>", "<out-file>", "--format", "gguf"]),
            ("gguf-lora-out-is-a-file", ["<adapter>", "<out-file>", "--format", "gguf-lora"]),
            ("gguf-lora-out-under-a-file", ["<adapter>", "<file>/x.gguf", "--format", "gguf-lora"]),
            ("format-unknown", ["<adapter>", NEW, "--format", "onnx"]),
        ],
    ),
]
SERVE = _cases(
    "serve",
    [
        ("port-99999", ["--base", "<base>", "--quant", "none", "--port", "99999"]),
        ("port-negative", ["--base", "<base>", "--quant", "none", "--port", "-1"]),
        ("port-abc", ["--port", "abc"]),
        ("base-missing", ["--base", "<missing>", "--quant", "none"]),
        ("base-file", ["--base", "<file>", "--quant", "none"]),
        ("base-empty-dir", ["--base", "<dir>", "--quant", "none"]),
        *((f"base-{harm}", ["--base", f"<base:{harm}>", "--quant", "none"]) for harm in BASE_HARMS),
        ("adapters-missing", ["--adapters", "<missing>"]),
        ("adapters-file", ["--adapters", "<file>"]),
        ("max-batch-0", ["--max-batch", "0"]),
        ("adapter-memory-abc", ["--max-adapter-memory", "abc"]),
    ],
)
STUDIO = _cases(
    "studio",
    [
        ("port-99999", ["--port", "99999"]),
        ("port-abc", ["--port", "abc"]),
        ("host-open-without-token", ["--no-token", "--host", "0.0.0.0"]),
        ("token-and-no-token", ["--token", "x", "--no-token"]),
        ("dir-in-an-unknown-home", ["--dir", "~nosuchuser/adapters"]),
        ("dir-outside-the-project", ["--dir", "/"]),
        ("dir-is-a-file", ["--dir", "<file>"]),
        ("base-missing", ["--base", "<missing>"]),
        ("quant-unknown", ["--quant", "nf5"]),
    ],
)
PUSH = [
    *_adapter_cases("push", ["ADAPTER", "alice/tiny", "--dry-run", "--out", NEW]),
    *_cases(
        "push",
        [
            ("repo-id-malformed", ["<adapter>", "not a repo", "--dry-run", "--out", NEW]),
            ("repo-id-surrogate", ["<adapter>", "alice/a\udcffb", "--dry-run", "--out", NEW]),
            ("base-model-malformed", ["<adapter>", "alice/tiny", "--base-model", "x", "--dry-run", "--out", NEW]),
            ("out-is-a-file", ["<adapter>", "alice/tiny", "--dry-run", "--out", "<out-file>"]),
            ("out-without-dry-run", ["<adapter>", "alice/tiny", "--out", NEW]),
            ("offline", ["<adapter>", "alice/tiny"]),
        ],
    ),
]
LS = _cases("ls", [("extra-argument", ["sft"])])
CONFIG = _cases(
    "config",
    [
        ("unknown-key", ["train.lrr"]),
        ("unknown-section", ["nope"]),
        ("key-surrogate", ["train.\udcff"]),
        ("two-keys", ["train.lr", "lora.r"]),
    ],
)
_NEW_ARGS = ["--data", "<good.jsonl>", "--vram", "8GB", "-o", NEW]
NEW_VERB = _cases(
    "new",
    [
        ("base-unknown", ["--base", "nope", *_NEW_ARGS]),
        ("base-missing", ["--base", "<missing>", *_NEW_ARGS]),
        ("base-empty-dir", ["--base", "<dir>", *_NEW_ARGS]),
        *(
            (f"data-{d.strip('<>')}", ["--base", "smollm2-135m", "--data", d, "--vram", "8GB", "-o", NEW])
            for d in DATA_CORPUS
        ),
        ("data-surrogate", ["--base", "smollm2-135m", "--data", "<surrogate.jsonl>", "--vram", "8GB", "-o", NEW]),
        ("vram-abc", ["--base", "smollm2-135m", "--data", "<good.jsonl>", "--vram", "abc", "-o", NEW]),
        ("vram-too-small", ["--base", "llama-3.1-8b", *_NEW_ARGS[:2], "--vram", "1GB", "-o", NEW]),
        ("out-exists", ["--base", "smollm2-135m", *_NEW_ARGS[:4], "-o", "<out-file>"]),
        ("out-is-a-dir", ["--base", "smollm2-135m", *_NEW_ARGS[:4], "-o", "<dir>"]),
        ("no-base", _NEW_ARGS),
    ],
)
CORPUS = [
    *TRAIN,
    *CP,
    *LS,
    *CONFIG,
    *GENERATE,
    *EVAL,
    *PREDICT,
    *PLAN,
    *NEW_VERB,
    *MERGE,
    *EXPORT,
    *SERVE,
    *STUDIO,
    *PUSH,
]


def test_the_corpus_covers_every_verb():
    verbs = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert verbs == {case.values[0][0] for case in CORPUS}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("boundary-adapters")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTUNE_HOME", str(root / "qtune-home"))
        adapter = make_qtune_adapter(tiny_model_dir, root / "adapter", seed=1)
        meta = json.loads((adapter / "qtune.json").read_text())
        meta["base"].update(name=str(tiny_model_dir), path=str(tiny_model_dir))  # as a training run records it
        (adapter / "qtune.json").write_text(json.dumps(meta))
        return {"adapter": adapter, "classifier": make_classifier_adapter(tiny_model_dir, root / "classifier", seed=2)}


class _Served(BaseException):
    """Raised instead of serving: not an Exception, so no boundary can turn it into an error line."""


@pytest.fixture(autouse=True)
def no_serving_no_network(monkeypatch):
    """A bad input must never reach a listening server, and nothing may leave the machine."""
    import socket

    import uvicorn

    real_run, real_connect = uvicorn.run, socket.socket.connect

    def run(app, host="127.0.0.1", port=8000, **kwargs):
        if 0 <= port <= 65535:
            raise _Served(f"would serve on port {port}")
        return real_run(app, host=host, port=port, **kwargs)

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a bad input reached the network ({address})")
        return real_connect(sock, address)

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Inputs:
    """Writes the bad input each marker names, in `root`; remembers the outputs that must not appear."""

    def __init__(self, root: Path, adapters: dict[str, Path], base: Path):
        self.root, self.adapters, self.base = root, adapters, base
        self.new_outputs: list[Path] = []
        self.existing: dict[Path, bytes] = {}

    def __call__(self, marker: str) -> str:
        root, name = self.root, marker
        if name == "missing":
            return str(root / "missing")
        if name == "dir":
            (root / "a-dir").mkdir(exist_ok=True)
            return str(root / "a-dir")
        if name in ("file", "out-file"):
            path = root / f"{name}.txt"
            path.write_text("hello\n")
            self.existing[path] = b"hello\n"
            return str(path)
        if name == "out-new":
            self.new_outputs.append(root / "out-new")
            return str(root / "out-new")
        if name == "base":
            return str(self.base)
        if name in ("adapter", "classifier") or name.startswith("adapter:"):
            kind, _, harm = name.partition(":")
            folder = root / f"{kind}-{harm or 'good'}"
            if not folder.exists():
                shutil.copytree(self.adapters[kind], folder)
                if harm:
                    ADAPTER_HARMS[harm](folder)
            return str(folder)
        if name.startswith("base:"):
            folder = root / f"base-{name[5:]}"
            if not folder.exists():
                shutil.copytree(self.base, folder)
                BASE_HARMS[name[5:]](folder)
            return str(folder)
        if name.startswith("model:"):
            folder = root / f"model-{name[6:]}"
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_bytes(FILES[name[6:]])
            return str(folder)
        if name == "run.yaml":
            self("good.jsonl")
            (root / "run.yaml").write_text(
                f"model:\n  name: {self.base}\n  dtype: fp32\nquant:\n  method: none\n"
                f"data:\n  train: {root / 'good.jsonl'}\ntrain:\n  max_steps: 1\n  batch_size: 2\n"
                f"output:\n  dir: {root / 'adapters'}\n  name: run\n"
            )
            self.new_outputs.append(root / "adapters" / "run")
            return str(root / "run.yaml")
        kind, suffix = name.split(".", 1)
        path = root / name
        if kind == "good":
            path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        else:
            path.write_bytes(FILES[kind])
        return str(path)

    def argv(self, argv: list[str]) -> list[str]:
        return [re.sub(r"<([^<>]+)>", lambda m: self(m.group(1)), a) for a in argv]

    def assert_nothing_written(self) -> None:
        for path in self.new_outputs:
            assert not path.exists(), f"{path} was written"
        for path, content in self.existing.items():
            assert path.read_bytes() == content, f"{path} was changed"
        leftovers = [p for p in self.root.rglob("*") if ".partial-" in p.name or ".old-" in p.name]
        assert leftovers == [], leftovers


@pytest.fixture()
def inputs(tmp_path, adapters, tiny_model_dir, monkeypatch) -> Inputs:
    from qtune import models

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty hub cache
    # The default base (an empty config, `serve` without --base) stands in as the tiny model: converting the
    # embedded SmolLM2 takes longer than this whole module.
    monkeypatch.setattr(models, "ensure_embedded_model", lambda: tiny_model_dir)
    return Inputs(work, adapters, tiny_model_dir)


def run_cli(argv: list[str], capsys) -> tuple[int | str, str]:
    """main(argv): its exit code and what a user sees on stderr (a SystemExit message is printed by Python)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    code = exit_.value.code
    err = captured.err + (f"{code}\n" if isinstance(code, str) else "")
    assert "Traceback" not in captured.out + err
    return code, err


PROGRESS_BAR = re.compile(r"\d+%\|.*\| *[\d.]+\w?/[\d.]+\w?")  # a library's tqdm bar, e.g. Loading weights


def assert_one_error_line(err: str) -> str:
    """Exactly one `error:` line; further lines only as the indented list of that error (a DataError's rows).

    Progress bars of the libraries (loading weights) share stderr; they are not the command's own lines."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert lines[0].startswith("error: "), err
    assert all(line.startswith("  ") for line in lines[1:]), err
    return lines[0]


# ---------------------------------------------------------------- the corpus


@pytest.mark.parametrize("argv", CORPUS)
def test_a_bad_input_is_one_error_line(inputs, capsys, argv):
    code, err = run_cli(inputs.argv(argv), capsys)
    line = assert_one_error_line(err)
    # A qtune error (exit 2) or the CLI's own SystemExit("error: ..."), not the boundary's generic line (exit 1).
    assert code == 2 or isinstance(code, str), line
    harm = next((a[len("<adapter:") : -1] for a in argv if a.startswith("<adapter:")), None)
    if harm in BLAMED:  # and it names the file at fault
        assert BLAMED[harm] in line, line
    inputs.assert_nothing_written()


# ---------------------------------------------------------------- the boundary itself


def _boom(args):
    raise RuntimeError("boom\nsecond line " + "x" * 2000)


def test_an_unexpected_exception_is_one_line_naming_verb_and_input(monkeypatch, capsys):
    monkeypatch.delenv("QTUNE_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_merge", _boom)
    code, err = run_cli(["merge", "adapters/x", "out"], capsys)
    line = assert_one_error_line(err)
    assert code == 1 and len(err.splitlines()) == 1
    assert line.startswith("error: qtune merge adapters/x: RuntimeError: boom second line xxx")
    assert line.endswith("... (run with --debug for the traceback)") and len(line) < 450


@pytest.mark.parametrize("debug", [["--debug"], "QTUNE_DEBUG=1"])
def test_debug_prints_the_traceback(monkeypatch, capsys, debug):
    monkeypatch.setattr(cli, "cmd_merge", _boom)
    if isinstance(debug, str):
        monkeypatch.setenv(*debug.split("="))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*(debug if isinstance(debug, list) else []), "merge", "adapters/x", "out"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "Traceback (most recent call last)" in err and "in _boom" in err
    assert err.splitlines()[-1].startswith("error: qtune merge adapters/x: RuntimeError: boom second line")
    assert "--debug" not in err.splitlines()[-1]


def test_a_user_error_keeps_its_line_and_exit_2(monkeypatch, capsys):
    from qtune.errors import ExportError

    def refuse(args):
        raise ExportError("out exists; choose another folder")

    monkeypatch.setattr(cli, "cmd_merge", refuse)
    code, err = run_cli(["merge", "adapters/x", "out"], capsys)
    assert (code, err) == (2, "error: out exists; choose another folder\n")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    monkeypatch.setattr(cli, "cmd_merge", interrupted)
    code, err = run_cli(["merge", "adapters/x", "out"], capsys)
    assert (code, err) == (130, "error: qtune merge adapters/x: interrupted\n")
    code, err = run_cli(["train", "run.yaml"], capsys)
    assert code == 130 and err.startswith("error: qtune train run.yaml: interrupted (add resume=auto")
    assert len(err.splitlines()) == 1


def test_system_exit_passes_through(monkeypatch, capsys):
    def leave(args):
        raise SystemExit(0)

    monkeypatch.setattr(cli, "cmd_plan", leave)
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "llama-2-7b"])
    assert exit_.value.code == 0 and capsys.readouterr().err == ""


def test_usage_errors_are_one_line_too(capsys):
    for argv in (["nosuchverb"], [], ["plan"], ["plan", "llama-2-7b", "--nope"]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: qtune"), err


# ---------------------------------------------------------------- as a user runs it: a real process


@pytest.mark.parametrize(
    "argv, env, expect",
    [
        # An undecodable byte on a real command line, and a model folder whose config.json is binary.
        ([b"plan", b"/no/such/\xff"], {}, "error: --model: unknown architecture"),
        (["plan", "llama-2-7b", "--vram", "abc"], {"QTUNE_DEBUG": "1"}, "error: --vram: cannot read 'abc'"),
    ],
)
def test_in_a_real_process(tmp_path, argv, env, expect):
    result = subprocess.run(
        [sys.executable, "-m", "qtune.cli", *argv],
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        timeout=120,
    )
    err = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 2 and expect in err.splitlines()[-1], err
    if "QTUNE_DEBUG" in env:
        assert "Traceback" in err  # a user error's traceback, asked for
    else:
        assert len(err.splitlines()) == 1 and "Traceback" not in err
