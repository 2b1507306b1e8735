"""Memory and time to read, validate and tokenize a large chat file: qtune's data loading against the
`datasets` pipeline that trl's SFTTrainer runs itself, on one generated ShareGPT JSONL file.

    HF_HUB_OFFLINE=1 python benchmarks/data_memory.py                    # a 200 MB file
    HF_HUB_OFFLINE=1 python benchmarks/data_memory.py --mb 1000 --out benchmarks/results/data_memory.json
    HF_HUB_OFFLINE=1 python benchmarks/data_memory.py --mb 5             # seconds: checks the harness

Each arm runs in a fresh subprocess; its peak memory is the largest sum of RSS over the subprocess and
all its children (the tokenizing workers), sampled every 50 ms with psutil: the sum of their proportional set
sizes (PSS), so pages a forked worker shares with its parent count once. Reported: peak memory as a
multiple of the file's size, its growth over the arm's own memory after imports, and the wall time; and
the ratios qtune/baseline. Not asserted.

The baseline is the strongest configuration of the alternative: `datasets.load_dataset("json")` (Arrow on
disk, memory-mapped), roles mapped with `map`, then `map` with `apply_chat_template(tokenize=True,
return_assistant_tokens_mask=True)` (how trl masks assistant tokens) in one process per CPU core, results
cached on disk, never kept in memory. qtune's arm is `qtune.data.load_examples` with its defaults. Both use
the real SmolLM2 tokenizer with the named `chatml` template (it marks assistant turns with {% generation %}).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = "the a movie film plot acting great bad boring superb story scene actor music long short funny sad".split()


def write_file(path: Path, megabytes: float, seed: int = 0) -> int:
    """A ShareGPT JSONL of about `megabytes` MB: a system line, 1-3 exchanges of 20-120 words each."""
    rng = random.Random(seed)
    target, rows = megabytes * 1e6, 0
    with path.open("w") as f:
        while f.tell() < target:
            turns = [{"from": "system", "value": "Answer briefly."}]
            for _ in range(rng.randint(1, 3)):
                for who in ("human", "gpt"):
                    turns.append({"from": who, "value": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))})
            f.write(json.dumps({"conversations": turns}) + "\n")
            rows += 1
    return rows


# ---------------------------------------------------------------------------------------------
# Children: one arm each, printing one JSON line last


def _tokenizer():
    from qtune import models
    from qtune.config import ModelConfig
    from qtune.data import apply_template

    return apply_template(models.load_tokenizer(models.resolve_base(ModelConfig())), "chatml")


def child_qtune(path: str) -> dict:
    from qtune.config import DataConfig
    from qtune.data import load_examples

    tokenizer = _tokenizer()
    ready = _rss()
    start = time.perf_counter()
    examples, report = load_examples(path, tokenizer, DataConfig(max_length=4096))
    return {"seconds": time.perf_counter() - start, "examples": len(examples), "tokens": report.tokens, "ready": ready}


ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _to_messages(batch):
    return {
        "messages": [[{"role": ROLES[t["from"]], "content": t["value"]} for t in c] for c in batch["conversations"]]
    }


def _tokenize(batch, tokenizer):
    out = tokenizer.apply_chat_template(
        batch["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}


def child_datasets(path: str) -> dict:
    import datasets

    tokenizer = _tokenizer()
    ready = _rss()
    procs = min(8, os.cpu_count() or 1)
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=path, split="train")
    ds = ds.map(_to_messages, batched=True, remove_columns=["conversations"], num_proc=procs)
    ds = ds.map(
        _tokenize, batched=True, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"], num_proc=procs
    )
    tokens = sum(len(ids) for batch in ds.iter(batch_size=10000) for ids in batch["input_ids"])
    return {"seconds": time.perf_counter() - start, "examples": len(ds), "tokens": tokens, "ready": ready}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_full_info().pss


# ---------------------------------------------------------------------------------------------
# Parent


def run_arm(arm: str, path: Path, cache: Path) -> dict:
    import psutil

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache / arm),
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", arm, str(path)], stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True
    )
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            total = sum(p.memory_full_info().pss for p in [parent, *parent.children(recursive=True)])
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{arm} failed ({proc.returncode}):\n{out[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_pss": peak, "growth": peak - result.pop("ready")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200, help="size of the generated JSONL file, in MB")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arm, path = args.child
        print(json.dumps({"qtune": child_qtune, "datasets": child_datasets}[arm](path)))
        return
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "chats.jsonl"
        rows = write_file(path, args.mb)
        size = path.stat().st_size
        print(f"{path.name}: {size / 1e6:.0f} MB, {rows} conversations; {os.cpu_count()} CPU cores")
        results = {arm: run_arm(arm, path, Path(work) / "cache") for arm in ("datasets", "qtune")}
    print("| arm | peak PSS | x file size | growth over imports | seconds | examples | tokens |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        print(
            f"| {arm} | {r['peak_pss'] / 1e9:.2f} GB | {r['peak_pss'] / size:.2f} | {r['growth'] / 1e9:.2f} GB "
            f"| {r['seconds']:.0f} | {r['examples']} | {r['tokens']} |"
        )
    q, b = results["qtune"], results["datasets"]
    ratios = {
        "peak_pss": q["peak_pss"] / b["peak_pss"],
        "growth": q["growth"] / b["growth"],
        "seconds": q["seconds"] / b["seconds"],
    }
    print("qtune / datasets: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"file_bytes": size, "rows": rows, "cpus": os.cpu_count(), "arms": results, "ratios": ratios}, indent=2
            )
        )


if __name__ == "__main__":
    main()
