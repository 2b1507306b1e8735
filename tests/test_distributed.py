"""Two processes on the CPU (torchrun, gloo): DDP reaches the single-process adapter for the same global
batch, only rank 0 writes, and a DDP run resumes from a checkpoint to the same adapter."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtune.config import ConfigError, load_config
from qtune.lora import read_meta
from qtune.train import checkpoint
from recipes import sft
from tests.test_resume import ROWS

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, args: list[str]) -> str:
    config = tmp_path / "run.yaml"
    config.write_text("recipe: sft\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), "-m", "qtune.cli", "train", str(config), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture()
def run_args(tmp_path, tiny_model_dir):
    import json

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return [
        f"model.name={tiny_model_dir}",
        "model.dtype=fp32",
        "quant.method=none",
        f"data.train={data}",
        "train.max_steps=6",
        "train.lr=1e-2",
        "train.logging_steps=1",
        "train.save_every=2",
        "train.group_by_length=false",
        "lora.r=4",
        f"output.dir={tmp_path / 'adapters'}",
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_ddp_on_two_processes_matches_one_process_and_resumes(run_args, tmp_path):
    # 2 processes x 2 examples = the global batch of 4 a single process takes at once.
    out = torchrun(
        tmp_path,
        [
            *run_args,
            "train.batch_size=2",
            "output.name=ddp",
            "output.keep_checkpoints=true",
            "train.save_limit=3",
        ],
    )
    assert out.count("adapter written to") == 1  # rank 0 alone evaluates and writes
    single = sft.main(load_config(None, [*run_args, "train.batch_size=4", "output.name=single"]))
    ddp = tmp_path / "adapters" / "ddp"
    assert read_meta(ddp)["training"]["steps"] == 6
    a, b = weights(ddp), weights(single)
    assert a.keys() == b.keys()
    moved = max(
        (a[k] - load_file(str(ddp.parent / "ddp.checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))[k])
        .abs()
        .max()
        for k in a
    )
    assert moved > 1e-3  # training did move the weights after step 2
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # Each process's RNG state is in the checkpoint, written by that process; rank 0 moved the folder.
    ck = ddp.parent / "ddp.checkpoints" / "checkpoint-4"
    assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()
    assert not (ddp.parent / "ddp.checkpoints" / checkpoint.INCOMING).exists() or not any(
        (ddp.parent / "ddp.checkpoints" / checkpoint.INCOMING).iterdir()
    )

    # Resume under DDP: a run cut after step 2 continues to the same adapter, bit for bit.
    shutil.copytree(
        ddp.parent / "ddp.checkpoints",
        ddp.parent / "cut.checkpoints",
        ignore=shutil.ignore_patterns("checkpoint-4", "checkpoint-6"),
    )
    out = torchrun(tmp_path, [*run_args, "train.batch_size=2", "output.name=cut", "resume=auto"])
    assert "resuming from" in out and out.count("adapter written to") == 1
    cut = tmp_path / "adapters" / "cut"
    assert read_meta(cut)["training"]["resumed_from_step"] == 2
    c = weights(cut)
    assert all(torch.equal(a[k], c[k]) for k in a)

    # One process may not continue a two-process run: the global batch and data order would change.
    shutil.copytree(ddp.parent / "ddp.checkpoints", ddp.parent / "solo.checkpoints")
    with pytest.raises(ConfigError, match="2 training processes then, 1 now"):
        sft.main(load_config(None, [*run_args, "train.batch_size=2", "output.name=solo", "resume=auto"]))


def test_fsdp_on_cpu_is_refused_with_the_reason(run_args):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU processes")
    with pytest.raises(ConfigError, match="train.fsdp=true needs GPUs"):
        sft.main(load_config(None, [*run_args, "train.fsdp=true", "output.name=fsdp"]))
