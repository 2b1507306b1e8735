"""Write the shipped family x GPU configs (recipes/configs/<family>_<N>gb.yaml) with `qtune new`'s own logic.

Run it again whenever qtune.plan's numbers change; tests/test_new.py fails while a committed file differs:
    python recipes/configs/make_family_configs.py           # rewrite them
    python recipes/configs/make_family_configs.py --check   # exit 1 and name the files that differ
    python recipes/configs/make_family_configs.py --table   # the matrix for docs/new.md, in Markdown
"""

from __future__ import annotations

import sys
from pathlib import Path

from qtune.new import DataSummary, choose, command_line, render
from qtune.plan import PlanError

FAMILIES = ("llama-3.1-8b", "llama-3.2-3b", "mistral-7b", "qwen2.5-7b", "qwen3-8b", "gemma-2-9b", "gemma-3-1b")
TIERS_GB = (8, 12, 16, 24)
ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "python recipes/configs/make_family_configs.py"


def config_path(family: str, gb: int) -> str:
    """The shipped config's path, relative to the repository (as its header and `qtune train` name it)."""
    return f"recipes/configs/{family}_{gb}gb.yaml"


def family_configs() -> tuple[dict[str, str], dict[str, str]]:
    """Every shipped config's text by its relative path (`qtune new --base FAMILY --vram NGB` without data), and
    the family x tier pairs that fit at no setting qtune new tries, each with the planner's reason."""
    texts, skipped = {}, {}
    for family in FAMILIES:
        for gb in TIERS_GB:
            out, vram = config_path(family, gb), f"{gb}GB"
            try:
                choice = choose(family, DataSummary(path=None), vram)
            except PlanError as e:
                skipped[out] = str(e)
                continue
            texts[out] = render(choice, out, f"{command_line(family, None, vram, out)}   (all: {REGENERATE})")
    return texts, skipped


def table() -> str:
    """The shipped matrix as a Markdown table (docs/new.md): each config's plan, or why there is none."""
    from qtune.plan import GIB

    rows = [
        "| family | GPU | planned peak | data.max_length | quant | LoRA r | micro-batch x accum | checkpointing | "
        "optimizer |",
        "|---|---|---:|---:|---|---:|---|---|---|",
    ]
    for family in FAMILIES:
        for gb in TIERS_GB:
            try:
                choice = choose(family, DataSummary(path=None), f"{gb}GB")
            except PlanError as e:
                rows.append(f"| {family} | {gb} GB | does not fit: {e} | | | | | | |")
                continue
            inp = choice.plan.input
            cut = " (cut)" if inp.seq < choice.seq_wanted else ""
            rows.append(
                f"| {family} | {gb} GB | {choice.plan.total / GIB:.2f} GiB | {inp.seq}{cut} | {inp.quant} | "
                f"{inp.lora_r} | {inp.batch} x {choice.grad_accum} | {'on' if inp.gradient_checkpointing else 'off'} "
                f"| {inp.optim} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--table" in args:
        print(table())
        return 0
    check = "--check" in args
    texts, skipped = family_configs()
    stale = [p for p, text in texts.items() if not (ROOT / p).is_file() or (ROOT / p).read_text("utf-8") != text]
    stale += [p for p in skipped if (ROOT / p).exists()]
    if not check:
        for relative in stale:
            if relative in skipped:
                (ROOT / relative).unlink()
            else:
                (ROOT / relative).write_text(texts[relative], encoding="utf-8")
    print(f"{len(stale)} {'differ' if check else 'rewritten or removed'}" + "".join(f"\n  {p}" for p in stale))
    for relative, why in skipped.items():
        print(f"not shipped: {relative}: {why}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
