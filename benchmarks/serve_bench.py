"""Throughput of `qtune serve` and the cost of switching adapters, on the real SmolLM2-135M-Instruct.

Run it (about 5 minutes on 2 shared CPU cores):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_bench.py [--quant nf4] [--max-tokens 16]

Server and clients run in one process: the server on loopback (uvicorn, as `qtune serve` runs it),
each client a thread with the official `openai` client sending greedy chat requests one after another.
Four adapters (r=16 on all linear layers, random non-zero weights: the cost of an adapter does not
depend on what it learned) are made on first use, or taken from --adapters DIR.

Reported, not asserted:
  requests/s and generated tokens/s for 1, 4 and 16 concurrent clients, over 1 adapter and over 4
  adapters, next to the baseline of the same server with batching off (max_batch=1, one request at a time);
  the adapter switch: time to load an adapter from disk, and the latency of one 16-row batch whose rows
  use 4 adapters, against 16 rows of one adapter and 16 rows of the bare base (median of --repeats, min-max;
  the three are interleaved, so a noisy neighbour on a shared machine hits them alike).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Is this movie review positive or negative? A joy from start to finish.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Dull, long and pointless. I walked out after an hour. Positive or negative?",
    "Name three colours.",
    "Give me a short tip for learning to cook.",
    "What is two plus two?",
    "Describe a cat in five words.",
]


def make_adapters(base_path: Path, folder: Path, count: int) -> list[Path]:
    """`count` random LoRA adapters (r=16, all-linear) for the base, saved as plain PEFT folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(count):
        path = folder / f"random-{i}"
        if not (path / "adapter_model.safetensors").is_file():
            torch.manual_seed(i)
            model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
            config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
            peft_model = get_peft_model(model, config)
            with torch.no_grad():  # small weights: the adapted model still writes text, and costs the same
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.mul_(0.01)
            peft_model.save_pretrained(str(path))
        out.append(path)
    return out


def run_clients(url: str, adapters: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    import openai

    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int) -> None:
        nonlocal tokens
        api = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
        barrier.wait()
        for j in range(per_client):
            i = k * per_client + j
            start = time.perf_counter()
            r = api.chat.completions.create(
                model=adapters[i % len(adapters)],
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens,
                temperature=0,
            )
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens += r.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "req_s": len(latencies) / wall,
        "tok_s": tokens / wall,
        "p50": latencies[len(latencies) // 2],
        "p90": latencies[min(len(latencies) - 1, int(len(latencies) * 0.9))],
    }


def throughput(pool, names: list[str], max_tokens: int, max_batch: int, concurrency: list[int]) -> list[dict]:
    from qtune.serve import Limits, ServerThread, create_app

    rows = []
    app = create_app(pool, limits=Limits(max_tokens=max_tokens), max_batch=max_batch)
    with ServerThread(app) as url:
        run_clients(url, names[:1], 1, 1, max_tokens)  # warm-up
        for clients in concurrency:
            for adapters in (names[:1], names):
                per_client = max(2, 8 // clients)
                seen = len(app.state.scheduler.steps)
                result = run_clients(url, adapters, clients, per_client, max_tokens)
                steps = list(app.state.scheduler.steps)[seen:]
                result.update(
                    clients=clients,
                    adapters=len(adapters),
                    max_batch=max_batch,
                    mean_batch=statistics.mean(len(b) for b in steps),  # rows per forward pass
                )
                rows.append(result)
                print(
                    f"  max_batch={max_batch:2d} clients={clients:2d} adapters={len(adapters)}: "
                    f"{result['req_s']:.2f} req/s, {result['tok_s']:.1f} tok/s, mean batch {result['mean_batch']:.1f}",
                    flush=True,
                )
    return rows


def switch_cost(pool, names: list[str], max_tokens: int, repeats: int = 3) -> dict:
    from qtune.serve.decode import BASE, Row, Sampling

    def batch(adapters: list[str]) -> float:
        rows = [
            Row(a, pool.chat_ids(a, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]), Sampling(max_tokens))
            for i, a in enumerate(adapters)
        ]
        start = time.perf_counter()
        pool.generate(rows)
        return time.perf_counter() - start

    configs = {
        "16 rows, bare base": [BASE] * 16,
        "16 rows, 1 adapter": [names[0]] * 16,
        "16 rows, 4 adapters": [names[i % 4] for i in range(16)],
    }
    out: dict[str, list[float]] = {label: [] for label in configs}
    for adapters in configs.values():
        batch(adapters)  # warm-up
    for _ in range(repeats):
        for label, adapters in configs.items():
            out[label].append(batch(adapters))
    return {label: sorted(times) for label, times in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8", "none"])
    parser.add_argument("--adapters", default=None, help="folder of adapters to use (default: 4 random ones)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=5, help="batch latencies: runs per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from qtune.models import resolve_base
    from qtune.serve.pool import AdapterPool

    concurrency = [int(c) for c in args.concurrency.split(",")]
    base_path = resolve_base(args.base)
    work = Path(tempfile.gettempdir()) / "qtune-serve-bench"
    folders = sorted(Path(args.adapters).iterdir()) if args.adapters else make_adapters(base_path, work, 4)
    pool = AdapterPool(args.base, quant=args.quant, max_adapters=8)
    for path in folders[:4]:
        pool.add(path.name, path)
    names = list(pool.adapters)[:4]
    print(
        f"base {base_path.name} ({args.quant}, {pool.model_cfg.dtype}), adapters {names}, torch threads "
        f"{torch.get_num_threads()}, max_tokens {args.max_tokens}",
        flush=True,
    )

    # Adapter switch: load from disk (evict one and ask for it again: a reload), then batch latencies.
    pool.remove(names[0])
    pool.add(names[0], folders[0])
    loads = sorted(pool.load_seconds)
    print(
        f"adapter load from disk: median {statistics.median(loads) * 1000:.0f} ms over {len(loads)} loads "
        f"(min {loads[0] * 1000:.0f}, max {loads[-1] * 1000:.0f})",
        flush=True,
    )
    for label, times in switch_cost(pool, names, args.max_tokens, args.repeats).items():
        print(f"{label}: median {statistics.median(times):.2f} s (min {times[0]:.2f}, max {times[-1]:.2f})", flush=True)

    rows = throughput(pool, names, args.max_tokens, 16, concurrency)
    rows += throughput(pool, names, args.max_tokens, 1, concurrency[-1:])

    print("\n| clients | adapters | max_batch | requests | req/s | gen tok/s | mean batch | p50 s | p90 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['adapters']} | {r['max_batch']} | {r['requests']} | {r['req_s']:.2f} | "
            f"{r['tok_s']:.1f} | {r['mean_batch']:.1f} | {r['p50']:.2f} | {r['p90']:.2f} |"
        )


if __name__ == "__main__":
    main()
