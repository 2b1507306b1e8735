"""`qtune serve` under abuse: do normal requests keep their latency while others send huge bodies and long prompts?

Run it (about 10 minutes on 2 CPU cores; nothing else may run meanwhile):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_abuse.py [--baseline REV] [--out FILE]

Each server runs as `qtune serve` in its own process on loopback, on the embedded SmolLM2-135M-Instruct
(nf4 base, fp32 compute, --max-prompt-tokens 2048). The clients run in this process:

  quiet run: 16 normal clients, each sending --requests greedy chat requests of 16 tokens one after another,
             and a probe asking GET /health every 100 ms;
  abuse run: the same, while 3 attackers each send --bodies request bodies of 20 MB and 2 attackers each
             send --long prompts of the maximum length (2048 tokens minus the 16 asked for).

qtune runs once per --prefill-chunk value (default 128 and 512). Reported for each server: normal-request
latency p50 / p95 / max in both runs and their ratio (abuse/quiet), /health latency p50 / max, the server's
peak RSS, and what the attackers got back. The baseline is the same server at `--baseline` (default: the
last commit before the body cap, off-loop tokenizing and chunked prefill), checked out into a temporary git
worktree and run the same way: the same machine, model and flags, only the code differs.

Written to benchmarks/results/serve_abuse.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

try:  # the HTTP client the installed openai package is built on (openai 3 ships httpx2, older ones httpx)
    import httpx2 as httpx
except ImportError:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "8dfdeb9"  # main before the server hardening of issue 19
MAX_PROMPT = 2048
MAX_TOKENS = 16
PROMPTS = [
    "Is this movie review positive or negative? A joy from start to finish.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Name three colours.",
    "Give me a short tip for learning to cook.",
    "What is two plus two?",
    "Describe a cat in five words.",
    "Dull, long and pointless. I walked out after an hour. Positive or negative?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(code: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    """`qtune serve` from the source tree at `code`, on loopback; returns once /health answers."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "qtune.cli", "serve", "--quant", "nf4", "--port", str(port)]
    cmd += ["--max-prompt-tokens", str(MAX_PROMPT), "--max-tokens-limit", "64", *extra]
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {code} exited: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server at {code} did not start in 10 minutes: see {log}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def long_prompt(url: str) -> str:
    """A user message that the chat template makes just under the server's prompt limit (counted by the server)."""
    words = "the quick brown fox jumps over the lazy dog and runs far away into the green hills " * 400
    text = words
    for _ in range(20):  # shrink until the server accepts it: its own tokenizer counts
        body = {"model": "base", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        if r.status_code == 200:
            return text
        text = text[: int(len(text) * 0.9)]
    raise SystemExit("could not size a long prompt under the limit")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def run(url: str, requests: int, abuse: bool, bodies: int, longs: int, long_text: str) -> dict:
    latencies: list[float] = []
    health: list[float] = []
    attacks: dict[str, list] = {"body": [], "long": []}
    lock = threading.Lock()
    done = threading.Event()

    def normal(k: int) -> None:
        with httpx.Client(timeout=900) as client:
            for j in range(requests):
                body = {
                    "model": "base",
                    "messages": [{"role": "user", "content": PROMPTS[(k + j) % len(PROMPTS)]}],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                }
                start = time.monotonic()
                r = client.post(url + "/v1/chat/completions", json=body)
                with lock:
                    latencies.append(time.monotonic() - start if r.status_code == 200 else float("inf"))

    def probe() -> None:
        with httpx.Client(timeout=900) as client:
            while not done.is_set():
                start = time.monotonic()
                client.get(url + "/health")
                with lock:
                    health.append(time.monotonic() - start)
                time.sleep(0.1)

    def big_bodies() -> None:
        text = "a" * (20 * 2**20)
        payload = json.dumps({"model": "base", "messages": [{"role": "user", "content": text}]}).encode()
        for _ in range(bodies):
            start = time.monotonic()
            try:
                r = httpx.post(
                    url + "/v1/chat/completions",
                    content=payload,
                    timeout=900,
                    headers={"content-type": "application/json"},
                )
                outcome = r.status_code
            except httpx.HTTPError as e:  # a server may close the connection while the body is still sent
                outcome = type(e).__name__
            with lock:
                attacks["body"].append((outcome, round(time.monotonic() - start, 2)))

    def long_prompts() -> None:
        body = {"model": "base", "messages": [{"role": "user", "content": long_text}], "max_tokens": MAX_TOKENS}
        for _ in range(longs):
            start = time.monotonic()
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
            with lock:
                attacks["long"].append((r.status_code, round(time.monotonic() - start, 2)))

    workers = [threading.Thread(target=normal, args=(k,)) for k in range(16)]
    if abuse:
        workers += [threading.Thread(target=big_bodies) for _ in range(3)]
        workers += [threading.Thread(target=long_prompts) for _ in range(2)]
    prober = threading.Thread(target=probe)
    prober.start()
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers[:16]:
        w.join()
    normal_done = time.monotonic() - start
    for w in workers[16:]:
        w.join()
    done.set()
    prober.join()
    ok = [x for x in latencies if x != float("inf")]
    return {
        "normal_requests": len(latencies),
        "normal_failed": len(latencies) - len(ok),
        "latency_s": {"p50": percentile(ok, 0.5), "p95": percentile(ok, 0.95), "max": max(ok, default=float("nan"))},
        "normal_wall_s": round(normal_done, 1),
        "health_s": {"p50": percentile(health, 0.5), "max": max(health, default=float("nan")), "n": len(health)},
        "attacks": attacks,
    }


def measure(name: str, code: Path, args, workdir: Path, extra: list[str]) -> dict:
    port = free_port()
    log = workdir / f"{name}.log"
    proc = start_server(code, port, log, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        text = long_prompt(url)
        quiet = run(url, args.requests, False, 0, 0, text)
        print(name, "quiet", json.dumps(quiet["latency_s"]), flush=True)
        abuse = run(url, args.requests, True, args.bodies, args.long, text)
        print(name, "abuse", json.dumps(abuse["latency_s"]), json.dumps(abuse["attacks"]), flush=True)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ratio = {k: round(abuse["latency_s"][k] / quiet["latency_s"][k], 2) for k in ("p50", "p95", "max")}
    flags = " ".join(extra) or "defaults"
    return {"flags": flags, "quiet": quiet, "abuse": abuse, "abuse_over_quiet": ratio, "peak_rss_mb": round(rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline server ('' to skip it)")
    parser.add_argument("--requests", type=int, default=4, help="requests per normal client")
    parser.add_argument("--bodies", type=int, default=2, help="20 MB bodies per body attacker (3 of them)")
    parser.add_argument("--long", type=int, default=2, help="maximum-length prompts per long attacker (2 of them)")
    parser.add_argument("--prefill-chunk", type=int, nargs="*", default=[128, 512], help="qtune runs, one per value")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_abuse.json"))
    args = parser.parse_args()

    results = {
        "setup": {
            "model": "smollm2-135m (nf4 base, fp32 compute)",
            "max_prompt_tokens": MAX_PROMPT,
            "normal": f"16 clients x {args.requests} greedy chats of {MAX_TOKENS} tokens",
            "abuse": f"3 x {args.bodies} bodies of 20 MB, 2 x {args.long} prompts of ~{MAX_PROMPT - MAX_TOKENS} tokens",
            "cpu_count": os.cpu_count(),
        }
    }
    with tempfile.TemporaryDirectory(prefix="qtune-abuse-") as tmp:
        workdir = Path(tmp)
        for chunk in args.prefill_chunk:
            results[f"qtune --prefill-chunk {chunk}"] = measure(
                f"qtune-{chunk}", ROOT, args, workdir, ["--prefill-chunk", str(chunk)]
            )
        if args.baseline:
            tree = workdir / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
                check=True,
                capture_output=True,
            )
            try:
                results["baseline"] = {"revision": args.baseline, **measure("baseline", tree, args, workdir, [])}
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v.get("abuse_over_quiet") for k, v in results.items() if k != "setup"}))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
