"""Memory of DPO against SFT on the same batch: the DPO reference is the base with the adapter off, not a second
copy of the base, so DPO's peak should exceed SFT's by activations, not by a base.

    HF_HUB_OFFLINE=1 python benchmarks/preference_memory.py                  # after make demo-dpo (its pairs)
    HF_HUB_OFFLINE=1 python benchmarks/preference_memory.py --steps 6 --batch 4 --reps 2 --out results.json

Arms run SFT, DPO, SFT, DPO, ... each training in a fresh subprocess, so its peak RSS is its own (os.wait4's
ru_maxrss of that child). Both train the embedded SmolLM2 (recipes/configs/smollm2_sentiment_dpo.yaml: nf4, LoRA
r=16) on the same pairs with the same micro-batch: SFT on prompt + chosen answer (loss on the answer), DPO on
prompt + chosen and prompt + rejected (twice the rows, plus the reference forward). Reported: each arm's peak RSS
and seconds per step, the DPO/SFT ratios, and DPO's extra memory next to the size of the base's weights in
memory (what a second reference copy would add at least). Not asserted.
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
CONFIG = ROOT / "recipes" / "configs" / "smollm2_sentiment_dpo.yaml"


def child(arm: str, steps: int, batch: int, out_dir: str) -> dict:
    """Train `steps` steps of `arm` (sft or dpo) the way the recipes do; what it measured."""
    import datasets

    from qtune import data, lora, models, train
    from qtune.config import load_config

    overrides = [f"train.max_steps={steps}", f"train.batch_size={batch}", "train.save_every=0", "data.eval=null"]
    overrides += ["train.report_to=none", f"output.dir={out_dir}", f"output.name={arm}", "train.group_by_length=false"]
    cfg = load_config(CONFIG, [*overrides, *(["recipe=sft"] if arm == "sft" else [])])
    run = train.start(cfg)
    pairs, report = data.load_pairs(cfg.data.train, run.tokenizer, cfg.data)
    pairs = pairs[: steps * batch]
    cfg = run.prepare(report, longest=max(map(data.longest, pairs)))
    model = lora.attach_lora(models.load_base(run.base_path, cfg.model, cfg.quant, cfg.train), cfg.lora)
    weights = sum(b.numel() * b.element_size() for b in [*model.parameters(), *model.buffers()])
    if arm == "sft":  # the chosen answers as SFT examples: loss on the answer only, as recipes/sft.py trains
        rows = {
            "input_ids": [p.prompt_ids + p.chosen_ids for p in pairs],
            "labels": [[-100] * len(p.prompt_ids) + p.chosen_ids for p in pairs],
            "row": [p.row for p in pairs],
        }
        trainer = train.build_sft_trainer(model, run.tokenizer, datasets.Dataset.from_dict(rows), cfg, run.checkpoints)
    else:
        trainer = train.build_dpo_trainer(model, run.tokenizer, data.pairs_dataset(pairs), cfg, run.checkpoints)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"arm": arm, "seconds_per_step": seconds / steps, "weights_bytes": weights, "pairs": len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="pairs (DPO) or examples (SFT) per micro-batch")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(args.child, args.steps, args.batch, tmp)))
        return

    results = []
    for rep in range(args.reps):
        for arm in ("sft", "dpo"):
            cmd = [sys.executable, __file__, "--child", arm, "--steps", str(args.steps), "--batch", str(args.batch)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status:
                raise SystemExit(f"{arm} child failed ({status}): {stdout[-2000:]}")
            measured = json.loads(stdout.strip().splitlines()[-1])
            measured.update(rep=rep, peak_rss_bytes=usage.ru_maxrss * 1024)
            results.append(measured)
            print(
                f"rep {rep} {arm}: peak RSS {measured['peak_rss_bytes'] / 2**20:.0f} MiB, "
                f"{measured['seconds_per_step']:.2f} s/step"
            )

    def median(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["arm"] == arm)

    sft_rss, dpo_rss = median("sft", "peak_rss_bytes"), median("dpo", "peak_rss_bytes")
    summary = {
        "steps": args.steps,
        "batch": args.batch,
        "reps": args.reps,
        "sft_peak_rss_mib": sft_rss / 2**20,
        "dpo_peak_rss_mib": dpo_rss / 2**20,
        "dpo_over_sft_rss": dpo_rss / sft_rss,
        "dpo_extra_mib": (dpo_rss - sft_rss) / 2**20,
        "base_weights_mib": median("dpo", "weights_bytes") / 2**20,
        "dpo_over_sft_seconds_per_step": median("dpo", "seconds_per_step") / median("sft", "seconds_per_step"),
        "runs": results,
    }
    print(
        f"\nmedian peak RSS: SFT {summary['sft_peak_rss_mib']:.0f} MiB, DPO {summary['dpo_peak_rss_mib']:.0f} MiB "
        f"(DPO/SFT {summary['dpo_over_sft_rss']:.2f}x, +{summary['dpo_extra_mib']:.0f} MiB; the model's weights in "
        f"memory: {summary['base_weights_mib']:.0f} MiB, what a second reference copy would add at least); "
        f"time per step DPO/SFT {summary['dpo_over_sft_seconds_per_step']:.2f}x"
    )
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
