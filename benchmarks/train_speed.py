"""Training speed and memory: qtune's SFT recipe against the plain TRL + PEFT script, interleaved in one run.

    HF_HUB_OFFLINE=1 python benchmarks/train_speed.py                    # CPU: embedded SmolLM2, demo data
    HF_HUB_OFFLINE=1 python benchmarks/train_speed.py --reps 3 --steps 40 --out bench.json
    HF_HUB_OFFLINE=1 python benchmarks/train_speed.py --smoke            # a minute: checks the harness
    HF_HUB_OFFLINE=1 python benchmarks/train_speed.py --gpu-7b           # GPU: random Llama-2-7B shape, nf4, 2048
    # qtune against qtune, to measure one change (any `qtune train` override; the first arm is the reference):
    HF_HUB_OFFLINE=1 python benchmarks/train_speed.py --arm off=qtune:train.chunked_loss=false --arm on=qtune

Arms run A, B, A, B, ... (`--reps` rounds), each training in a fresh subprocess so its peak RSS is
its own (os.wait4's ru_maxrss of that child). Measured per run: trained tokens/s (non-padding
input tokens of the batches trained on, over the wall time of `trainer.train()`), peak memory
(RSS on CPU; torch.cuda.max_memory_allocated on a GPU) and the final logged loss. Reported as
ratios arm/reference per round, with min / median / max over the rounds. Not asserted.

The baseline is benchmarks/baseline_sft.py (BitsAndBytesConfig + LoraConfig + SFTTrainer from the
docs); qtune's arm makes the same library calls as recipes/sft.py up to and including training
(no held-out evaluation, no adapter writing). Both see the same model, data, LoRA rank and targets,
steps, batch, max length, learning-rate schedule and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "recipes" / "configs" / "smollm2_sentiment.yaml"


# ---------------------------------------------------------------------------------------------
# Children: one training each, printing one JSON line last


def _count_tokens(trainer) -> list[int]:
    """Wrap the trainer's collator; returns the list that receives the input tokens of every batch it builds."""
    counts: list[int] = []
    collator = trainer.data_collator

    def counting(examples):
        counts.append(sum(len(e["input_ids"]) for e in examples))
        return collator(examples)

    trainer.data_collator = counting
    return counts


def _vm(key: str = "VmHWM") -> int:
    """This process's peak RSS so far (VmHWM) or its RSS now (VmRSS), in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _trace_rss(trainer) -> list[int]:
    """The list that receives the RSS (bytes) after every optimizer step: does memory grow while training?"""
    from transformers import TrainerCallback

    trace: list[int] = []

    class Trace(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trace.append(_vm("VmRSS"))

    trainer.add_callback(Trace())
    return trace


def _growth(trace: list[int]) -> float | None:
    """MiB of RSS gained per step from step 10 to the end (the first steps fill caches and the allocator)."""
    return (trace[-1] - trace[9]) / (len(trace) - 10) / 2**20 if len(trace) > 10 else None


def _peak_gpu() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def child_qtune(spec: dict) -> dict:
    """qtune's recipe (recipes/sft.py steps 1-4) for `spec['steps']` steps; returns tokens, seconds, losses."""
    import torch
    from transformers import set_seed

    from qtune import data, lora, models, train
    from qtune.config import load_config

    overrides = [
        f"train.max_steps={spec['steps']}",
        f"train.batch_size={spec['batch_size']}",
        f"train.grad_accum={spec['grad_accum']}",
        f"data.max_length={spec['max_length']}",
        "train.save_every=0",
        "train.report_to=none",  # no TensorBoard writes inside the measurement
        "train.logging_steps=5",
        "data.eval=null",
        f"data.train={spec['data']}",
        f"model.name={spec['model']}",
        "output.name=bench",
        *spec["overrides"],
    ]
    cfg = load_config(spec["config"], overrides)
    set_seed(cfg.train.seed)
    base_path = models.resolve_base(cfg.model)
    tokenizer = models.load_tokenizer(base_path, cfg.model.trust_remote_code)
    if spec.get("pretokenized"):
        rows = [json.loads(line) for line in Path(cfg.data.train).read_text().splitlines() if line.strip()]
        examples = [data.Example(r["input_ids"], r["input_ids"], i + 1) for i, r in enumerate(rows)]
    else:
        examples, _ = data.load_examples(cfg.data.train, tokenizer, cfg.data)
    stages = {"data": _vm()}
    model = models.load_base(base_path, cfg.model, cfg.quant, cfg.train)
    model = lora.attach_lora(model, cfg.lora)
    stages["model"] = _vm()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as work:
        trainer = train.build_sft_trainer(model, tokenizer, data.to_dataset(examples), cfg, Path(work))
        counts = _count_tokens(trainer)
        trace = _trace_rss(trainer)
        stages["trainer"] = _vm()
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    micro = spec["steps"] * cfg.train.grad_accum  # the collator may build a batch ahead: count those trained on
    stages["train"] = _vm()
    return {
        "tokens": sum(counts[:micro]),
        "seconds": seconds,
        "losses": losses,
        "gpu_peak": _peak_gpu(),
        "rss_stages": stages,  # the peak RSS after each stage: where the memory comes from
        "rss_by_step": trace,
    }


def child_baseline(spec: dict) -> list[str]:
    """The command line of benchmarks/baseline_sft.py for `spec`."""
    return [
        sys.executable,
        str(ROOT / "benchmarks" / "baseline_sft.py"),
        f"--model={spec['model']}",
        f"--data={spec['data']}",
        f"--steps={spec['steps']}",
        f"--batch-size={spec['batch_size']}",
        f"--grad-accum={spec['grad_accum']}",
        f"--max-length={spec['max_length']}",
        *spec["baseline_args"],
    ]


# ---------------------------------------------------------------------------------------------
# The parent: workloads, interleaving, ratios


def run_child(kind: str, spec: dict, log: Path) -> dict:
    """Run one training in a fresh process; its result plus its own peak RSS (bytes)."""
    if kind == "baseline":
        cmd = child_baseline(spec)
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{kind} run failed (exit {os.waitstatus_to_exitcode(status)}); its output:\n{text[-4000:]}")
    result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    result["rss_peak"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    return result


def demo_workload(args) -> dict:
    from qtune import models

    return {
        "model": str(models.ensure_embedded_model()),
        "data": str(ROOT / "data" / "vader_movies" / "train.jsonl"),
        "config": str(DEMO_CONFIG),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": args.max_length,
        "baseline_args": [],
    }


def gpu_7b_workload(args, folder: Path) -> dict:
    """A random-initialised Llama-2-7B-shape model in nf4 at sequence length 2048, random tokens, all trained.

    With --smoke, the same code on a 2-layer model of the SmolLM2 shape (runs on a CPU).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from benchmarks.plan_vs_measured import _placeholder_tokenizer
    from qtune import plan

    arch = plan.BUILTIN["smollm2-135m" if args.smoke else "llama-2-7b"]
    seq = 64 if args.smoke else 2048
    base = folder / "base"
    config = LlamaConfig(
        vocab_size=arch["vocab_size"],
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=2 if args.smoke else arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"],
        tie_word_embeddings=arch["tie_word_embeddings"],
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    tokenizer = _placeholder_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    # Lengths vary (half to full), as real data do; padding is what padding-free training removes.
    n = args.steps * args.batch_size * args.grad_accum * 2
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g).tolist()
    rows = [{"input_ids": torch.randint(3, arch["vocab_size"], (k,), generator=g).tolist()} for k in lengths]
    data = folder / "tokens.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": str(base),
        "data": str(data),
        "config": None,
        "pretokenized": True,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_length": seq,
        # qtune's settings for this workload (the demo config is a CPU one): checkpointing on, 8-bit paged AdamW
        # (a CUDA optimizer: left out when the smoke test runs this on a CPU).
        "qtune_defaults": [
            "train.gradient_checkpointing=true",
            "train.lr=2e-4",
            "train.warmup=0.05",
            *(["train.optim=paged_adamw8bit"] if torch.cuda.is_available() else []),
        ],
        "baseline_args": ["--lr=2e-4"],
    }


def _metrics(runs: list[dict]) -> dict[str, list[float]]:
    return {
        "tokens_per_s": [r["tokens"] / r["seconds"] for r in runs],
        "peak_memory": [r["gpu_peak"] if r.get("gpu_peak") else r["rss_peak"] for r in runs],
        "final_loss": [r["losses"][-1] for r in runs],
    }


def summarise(results: dict[str, list[dict]], reference: str) -> list[dict]:
    """Per arm: medians of the raw figures and min/median/max of the per-round ratios to the reference arm."""
    rows = []
    ref = results[reference]
    for arm, runs in results.items():
        row = {"arm": arm, "runs": len(runs)}
        metrics, ref_metrics = _metrics(runs), _metrics(ref)
        for key, values in metrics.items():
            row[key] = statistics.median(values)
            ratios = [a / b for a, b in zip(values, ref_metrics[key])]
            row[key + "_ratio"] = (min(ratios), statistics.median(ratios), max(ratios))
        rows.append(row)
    return rows


def table(rows: list[dict], reference: str, gpu: bool) -> str:
    mem = "peak VRAM" if gpu else "peak RSS"
    lines = [
        f"| arm | runs | tokens/s | {mem} | final loss | tokens/s ratio | {mem} ratio | final-loss ratio |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]

    def spread(r):
        return f"{r[1]:.2f} ({r[0]:.2f}–{r[2]:.2f})"

    for row in rows:
        lines.append(
            f"| {row['arm']} | {row['runs']} | {row['tokens_per_s']:.0f} | {row['peak_memory'] / 2**30:.2f} GiB "
            f"| {row['final_loss']:.4f} | {spread(row['tokens_per_s_ratio'])} | {spread(row['peak_memory_ratio'])} "
            f"| {spread(row['final_loss_ratio'])} |"
        )
    lines.append(f"\nratios: arm / {reference}, per round, median (min–max) over the rounds")
    return "\n".join(lines)


def parse_arms(specs: list[str] | None) -> list[tuple[str, str, list[str]]]:
    """`name=kind[:override,override]` -> (name, kind, overrides); default: baseline, then qtune.

    Kinds: baseline (benchmarks/baseline_sft.py), qtune (the recipe's calls).
    """
    if not specs:
        return [("baseline", "baseline", []), ("qtune", "qtune", [])]
    arms = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        kind, _, overrides = rest.partition(":")
        if kind not in ("baseline", "qtune"):
            raise SystemExit(f"--arm {spec}: the kind must be baseline or qtune (name=qtune:train.x=y,...)")
        arms.append((name, kind, [o for o in overrides.split(",") if o]))
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="rounds; each runs every arm once, in order")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (demo: 120; 7B: 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch (demo: 8; 7B: 1)")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (demo: 1; 7B: 8)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--arm", action="append", help="name=baseline|qtune[:overrides]; repeat; the first is the reference"
    )
    parser.add_argument("--gpu-7b", action="store_true", help="the GPU workload: random Llama-2-7B shape, nf4, 2048")
    parser.add_argument("--smoke", action="store_true", help="5 steps, 1 round: checks that everything runs")
    parser.add_argument("--out", help="also write every run and the summary as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_qtune(json.loads(args.child))), flush=True)
        return

    gpu = args.gpu_7b
    default_steps, default_batch, default_accum = (10, 1, 8) if gpu else (120, 8, 1)
    args.steps = args.steps or (5 if args.smoke else default_steps)
    args.batch_size = args.batch_size or default_batch
    args.grad_accum = args.grad_accum or (2 if gpu and args.smoke else default_accum)
    args.reps = 1 if args.smoke else args.reps
    arms = parse_arms(args.arm)
    reference = arms[0][0]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        workload = gpu_7b_workload(args, tmp) if gpu else demo_workload(args)
        print(
            f"workload: {Path(workload['model']).name}, {workload['steps']} steps x {workload['batch_size']} x "
            f"{workload['grad_accum']}, max length {workload['max_length']}; arms {', '.join(a[0] for a in arms)}; "
            f"{args.reps} round(s)",
            flush=True,
        )
        results: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
        for rep in range(args.reps):
            for name, kind, overrides in arms:
                spec = {**workload, "overrides": [*workload.get("qtune_defaults", []), *overrides]}
                t0 = time.perf_counter()
                result = run_child(kind, spec, tmp / f"{name}-{rep}.log")
                results[name].append(result)
                print(
                    f"round {rep + 1} {name}: {result['tokens'] / result['seconds']:.1f} tokens/s "
                    f"({result['tokens']} in {result['seconds']:.1f} s), peak RSS {result['rss_peak'] / 2**30:.2f} GiB"
                    + (f", peak VRAM {result['gpu_peak'] / 2**30:.2f} GiB" if result.get("gpu_peak") else "")
                    + (
                        f", RSS growth {_growth(result['rss_by_step']):.1f} MiB/step"
                        if result.get("rss_by_step") and _growth(result["rss_by_step"]) is not None
                        else ""
                    )
                    + f", final loss {result['losses'][-1]:.4f} [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
        rows = summarise(results, reference)
        print()
        print(table(rows, reference, gpu=any(r.get("gpu_peak") for runs in results.values() for r in runs)))
        if args.out:
            Path(args.out).write_text(
                json.dumps({"workload": workload, "arms": arms, "runs": results, "summary": rows}, indent=2)
            )


if __name__ == "__main__":
    main()
