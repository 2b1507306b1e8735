"""The model card (README.md) of a pushed adapter, and qtune.json as it is published (local paths cut)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtune.data.read import is_hub_dataset
from qtune.data.templates import TEMPLATES
from qtune.meta import CAUSAL_LM, CLASSIFIER
from qtune.models import EMBEDDED_ALIAS
from qtune.models import HUB_IDS as BASE_IDS  # the hub repos of qtune's embedded bases

BASE_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
}
PIPELINE_TAGS = {CAUSAL_LM: "text-generation", CLASSIFIER: "text-classification"}


def base_hub_id(meta: dict[str, Any]) -> str | None:
    """The hub id of the adapter's base: the embedded aliases' repos, a hub id itself, None for a local folder."""
    name = str(meta.get("config", {}).get("model", {}).get("name") or meta.get("base", {}).get("name") or "")
    if name in BASE_IDS:
        return BASE_IDS[name]
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).expanduser().is_dir():
        return None
    return name


def public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """qtune.json as published: local absolute paths cut to their last part (they name users and folders),
    and no `samples` (held-out prompts with answers: rows of the user's data, which is never uploaded).

    The base's `config.model.name` is kept whatever it is: it is what a load by id resolves the base from.
    """
    meta = json.loads(json.dumps(meta, default=str))
    if meta.get("samples"):
        meta["samples"] = []

    def cut(section: dict[str, Any] | None, key: str) -> None:  # absolute or relative: only the last part
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key]:
            parts = section[key].split(" + ")  # (several sources' files; a hub dataset id is public, kept)
            section[key] = " + ".join(p if is_hub_dataset(p) else Path(p).name for p in parts)
        elif isinstance(section, dict) and isinstance(section.get(key), list):  # data.train as a list of sources
            for source in section[key]:
                cut(source, "path")

    cut(meta.get("base"), "path")
    config = meta.get("config", {})
    cut(config.get("data"), "train")
    cut(config.get("data"), "eval")
    if str((config.get("data") or {}).get("chat_template", "base")) not in ("base", *TEMPLATES):
        cut(config.get("data"), "chat_template")  # a .jinja file's local path (its text is in chat_template)
    cut(config.get("output"), "dir")
    cut(config, "resume")
    cut(config.get("lora"), "from_adapter")
    cut(meta.get("training"), "from_adapter")
    for section in (config.get("grpo"), meta.get("training")):  # a reward in a local .py file: its file name
        if isinstance(section, dict) and isinstance(section.get("rewards"), list):
            section["rewards"] = [_reward_name(r) for r in section["rewards"]]
    for report in (meta.get("data") or {}).values():
        cut(report, "file")
        for source in (report or {}).get("sources") or []:
            cut(source, "file")
    return meta


def _reward_name(path: Any) -> Any:
    module, _, function = str(path).rpartition(":")
    return f"{Path(module).name}:{function}" if module.endswith(".py") else path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in rows)


def render_card(
    meta: dict[str, Any],
    repo_id: str,
    *,
    files: list[str],
    license: str | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
) -> str:
    """The model card (README.md) of an adapter: Hub front matter, then training, data, metrics, usage.

    `base_model` overrides the base's hub id (for a base trained from a local folder).
    """
    import yaml
    from huggingface_hub import ModelCardData

    meta = public_meta(meta)
    cfg = meta.get("config", {})
    kind = meta.get("kind", CAUSAL_LM)
    base = base_model or base_hub_id(meta)
    quant = cfg.get("quant", {}).get("method", "none")
    lora = cfg.get("lora", {})
    train = cfg.get("train", {})
    training = meta.get("training", {})
    method = training.get("method", "classification" if kind == CLASSIFIER else "sft")
    tags = ["qtune", "peft", "lora", *(["qlora"] if quant in ("nf4", "fp4", "int8") else [])]
    tags += [method] if method in METHODS else []
    license = license or BASE_LICENSES.get(base or "")
    data = ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag=PIPELINE_TAGS.get(kind),
        tags=tags,
        license=license,
        datasets=datasets or None,
    )
    name = repo_id.split("/")[1]
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{cfg.get('model', {}).get('name')}`"
    quant_text = {"none": "a 16/32-bit base", "int8": "an 8-bit base"}.get(quant, f"a 4-bit {quant} base (QLoRA)")
    lines = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {name}\n",
        f"A LoRA adapter ({kind}) for {base_text}, trained with qtune on {quant_text}.\n",
    ]
    if cfg.get("model", {}).get("name") == EMBEDDED_ALIAS:
        lines.append(
            "It was trained on the Q4_1 GGUF of SmolLM2-135M-Instruct that qtune embeds (dequantized); "
            "PEFT users who load the original weights get a close, not identical, base.\n"
        )
    elif not base:
        lines.append(
            "The base was a local folder: load the adapter onto the same weights "
            f"(`qtune.json` records their fingerprint, `{meta.get('base', {}).get('fingerprint', '-')}`).\n"
        )

    lines.append(
        "## Use it\n\nWith qtune (the base is loaded as recorded in `qtune.json` and its fingerprint checked):\n"
    )
    if kind == CLASSIFIER:
        lines.append(
            f'```bash\nqtune predict {repo_id} --text "a wonderful film"\nqtune eval {repo_id} --data test.jsonl\n```\n'
        )
    else:
        lines.append(
            f'```bash\nqtune generate {repo_id} --prompt "Is this review positive or negative? A wonderful film."\n'
            f"qtune eval {repo_id} --data held_out.jsonl\n```\n"
        )
    auto = "AutoModelForSequenceClassification" if kind == CLASSIFIER else "AutoModelForCausalLM"
    labels = meta.get("labels", {}).get("id2label")
    extra = f", num_labels={len(labels)}" if labels else ""
    lines.append(
        "With PEFT and transformers alone:\n\n```python\n"
        f"from peft import PeftModel\nfrom transformers import AutoTokenizer, {auto}\n\n"
        f'base = {auto}.from_pretrained("{base or "PATH/TO/BASE"}"{extra})\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base or "PATH/TO/BASE"}")\n```\n'
    )
    if quant != "none":
        lines.append(
            f"To load the base as it was trained, pass `quantization_config=BitsAndBytesConfig(...)` for {quant} "
            "(qtune does this for you).\n"
        )

    lines.append("## Training\n")
    lines.append(
        _table(
            [
                ("base", base or cfg.get("model", {}).get("name")),
                ("base fingerprint", f"`{meta.get('base', {}).get('fingerprint', '-')}`"),
                ("method", _method(method, training)),
                ("quantization", quant + (" + double quant" if cfg.get("quant", {}).get("double_quant") else "")),
                ("compute dtype", cfg.get("model", {}).get("dtype")),
                ("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}"),
                ("targets", lora.get("targets")),
                ("steps", training.get("steps")),
                ("batch", f"{train.get('batch_size')} x {train.get('grad_accum')} accumulation"),
                ("learning rate", f"{_fmt(train.get('lr'))} ({train.get('scheduler')})"),
                ("training loss", training.get("train_loss")),
                ("training time", f"{_fmt(training.get('seconds'))} s"),
                ("hardware", _hardware(meta.get("hardware"))),
            ]
        )
    )
    if any(name == "loss.png" for name in files):
        lines.append("![training loss](loss.png)\n")

    lines.append("## Data\n")
    reports = []
    for split, report in (meta.get("data") or {}).items():
        if not report:
            continue
        reports.append(
            f"- {split}: `{report.get('file')}`: {report.get('records')} records ({report.get('format')}), "
            f"{report.get('examples')} examples, {report.get('tokens')} tokens ({report.get('trained_tokens')} "
            f"trained), {report.get('truncated', 0)} truncated, fingerprint `{report.get('fingerprint')}`\n"
        )
    if datasets:
        reports.append(f"- hub datasets: {', '.join(datasets)}\n")
    lines.append("".join(reports))

    metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
    lines.append("## Metrics (held-out)\n")
    lines.append(_table(sorted(metrics.items())) if metrics else "No held-out data was given (`data.eval`).\n")
    if any(name == "confusion.png" for name in files):
        lines.append("![confusion matrix](confusion.png)\n")

    versions = meta.get("versions", {})
    lines.append("## Versions\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    config_yaml = yaml.safe_dump(cfg, sort_keys=False)
    lines.append(
        "## Configuration\n\nThe resolved config (`qtune.json` holds it with the data report, metrics and versions):"
        f"\n\n<details>\n\n```yaml\n{config_yaml}```\n\n</details>\n"
    )
    return "\n".join(lines)


# What qtune.json's training.method may say beyond SFT and classification, as the Hub's tags name them.
METHODS = {
    "dpo": "DPO (direct preference optimization) on preference pairs",
    "kto": "KTO (Kahneman-Tversky optimization) on completions judged good or bad",
    "grpo": "GRPO (group relative policy optimization) with reward functions",
}


def _method(method: str, training: dict[str, Any]) -> str:
    """The training method as the card's table says it: what it is, its settings, and where it started from."""
    text = METHODS.get(method, "supervised fine-tuning" if method == "sft" else method)
    settings = [f"{k} {_fmt(training[k])}" for k in ("loss", "beta", "group_size") if training.get(k) is not None]
    if training.get("rewards"):
        settings.append("rewards " + ", ".join(f"`{r}`" for r in training["rewards"]))
    if training.get("from_adapter"):
        settings.append(f"from adapter `{Path(training['from_adapter']).name}`")
    return text + (f" ({'; '.join(settings)})" if settings else "")


def _hardware(value: Any) -> str:
    if not value:
        return "not recorded"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)
