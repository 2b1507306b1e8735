"""Parity of `qtune merge` and `qtune export --format gguf` on the real SmolLM2-135M-Instruct.

Run it (about 2 minutes on 2 CPU cores):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export_parity.py

Trains a small QLoRA adapter (nf4 base, r=16 all-linear, 20 steps) through the sft recipe, then
reports the largest |logit difference| over a few prompts (49,152-way logits at every position):
  merge fp32 / bf16         vs the fp32 base + the adapter, unmerged (plain PEFT)
  gguf f16 / q8_0           vs the fp32 merged HF model, loaded back through transformers' GGUF loader
  merge into nf4            vs the same reference (the rounding huggingface/peft#2321 warns about)
and the peak RSS of a bf16 `qtune merge` subprocess next to that of a subprocess that only imports
the stack, to check the merge holds one copy of the weights. Results are printed, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The movie was a joy from start to finish.",
    "Dull, long and pointless. I walked out after an hour.",
    "Is this movie review positive or negative? The acting was wonderful.",
]
REVIEWS = [
    ("A joy from start to finish.", "positive"),
    ("Dull, long and pointless.", "negative"),
    ("The best film of the year.", "positive"),
    ("I walked out.", "negative"),
    ("Wonderful acting and a clever story.", "positive"),
    ("A boring mess.", "negative"),
    ("I laughed and cried.", "positive"),
    ("Terrible dialogue throughout.", "negative"),
]


def train_adapter(work: Path) -> Path:
    from qtune.config import load_config
    from recipes import sft

    data = work / "train.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Review: {t}\nIs this movie review positive or negative?"},
                {"role": "assistant", "content": label},
            ]
        }
        for t, label in REVIEWS
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            "quant.method=nf4",
            "model.dtype=fp32",
            f"data.train={data}",
            "train.max_steps=20",
            "train.batch_size=8",
            "train.lr=5e-4",
            f"output.dir={work / 'adapters'}",
            "output.name=smol-parity",
        ],
    )
    return sft.main(cfg)


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(p)["input_ids"]])).logits[0].float() for p in PROMPTS]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def peak_rss_mb(code: str) -> float:
    """Peak RSS (MiB) of a fresh Python running `code`: its VmHWM (ru_maxrss would include this parent's)."""
    report = "\nprint('PEAK', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    done = subprocess.run([sys.executable, "-c", code + report], check=True, cwd=ROOT, capture_output=True, text=True)
    return int(done.stdout.rsplit("PEAK", 1)[1]) / 1024


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune import export
    from qtune.export import gguf as gguf_export
    from qtune.models import ensure_embedded_model

    base = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    rows = []
    with tempfile.TemporaryDirectory(prefix="qtune-export-parity-") as tmp:
        work = Path(tmp)
        adapter = train_adapter(work)
        reference_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
        ).eval()
        reference = logits(reference_model, tokenizer)
        del reference_model
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
        base_only = logits(plain, tokenizer)
        del plain
        rows.append(("adapter effect: base vs base + adapter", max_diff(base_only, reference)))

        merged_dir = export.merge(adapter, work / "merged-fp32", dtype="fp32")
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        merged_logits = logits(merged, tokenizer)
        rows.append(("merge fp32 vs base + adapter", max_diff(merged_logits, reference)))
        del merged

        bf16_dir = export.merge(adapter, work / "merged-bf16", dtype="bf16")
        bf16 = AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16).eval()
        rows.append(("merge bf16 (run in bf16) vs base + adapter", max_diff(logits(bf16, tokenizer), reference)))
        del bf16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rounding warning this row measures
            q_model, *_ = export.merged_model(adapter, into_quantized=True)
        rows.append(
            ("merge into nf4 (--into-quantized) vs base + adapter", max_diff(logits(q_model, tokenizer), reference))
        )
        del q_model

        for qtype in ("f16", "q8_0"):
            out = gguf_export.export_gguf(adapter, work / f"gguf-{qtype}", qtype=qtype, dtype="fp32")
            name = f"{adapter.name}-{qtype}.gguf"
            size = (out / name).stat().st_size / 2**20
            loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32).eval()
            rows.append(
                (f"gguf {qtype} ({size:.0f} MiB) vs merged fp32", max_diff(logits(loaded, tokenizer), merged_logits))
            )
            del loaded

        scale = max(x.abs().max().item() for x in reference)
        imports = "import torch, transformers, peft, safetensors; from transformers import AutoModelForCausalLM"
        idle = peak_rss_mb(imports)
        merge_code = (
            f"from qtune.cli import main; main(['merge', {str(adapter)!r}, {str(work / 'rss')!r}, '--dtype', 'bf16'])"
        )
        merging = peak_rss_mb(merge_code)
        weights = sum(p.stat().st_size for p in (work / "rss").glob("*.safetensors")) / 2**20

    print(f"SmolLM2-135M-Instruct, {len(PROMPTS)} prompts, largest |logit| of the reference: {scale:.2f}\n")
    print("| comparison | max abs logit difference |")
    print("|---|---:|")
    for label, value in rows:
        print(f"| {label} | {value:.3g} |")
    print(
        f"\npeak RSS: imports only {idle:.0f} MiB; bf16 merge {merging:.0f} MiB "
        f"(+{merging - idle:.0f} MiB) for {weights:.0f} MiB of bf16 weights written"
    )


if __name__ == "__main__":
    main()
