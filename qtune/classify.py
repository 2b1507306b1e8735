"""Sequence classification: labelled data, label maps, metrics, confusion matrix, class probabilities."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qtune.config import ConfigError, DataConfig
from qtune.data import DataError, fingerprint_data, raise_all, read_records


@dataclass
class LabelledExample:
    input_ids: list[int]
    label: int
    row: int
    text: str = ""


@dataclass
class LabelReport:
    file: str
    records: int = 0
    truncated: int = 0
    duplicates: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""

    def summary(self) -> str:
        total = sum(self.class_counts.values())
        counts = ", ".join(f"{k}: {v} ({v / total:.1%})" for k, v in self.class_counts.items())
        ratio = max(self.class_counts.values()) / max(min(self.class_counts.values()), 1)
        parts = [f"{self.file}: {self.records} records", f"classes {counts}", f"imbalance {ratio:.2f}:1"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.duplicates:
            parts.append(f"{self.duplicates} exact duplicates (kept)")
        return ", ".join(parts)


def read_labelled(path: str | Path, cfg: DataConfig, labelled: bool = True) -> list[tuple[int, str, str | int]]:
    """(row, text, label) for every record, or a DataError naming file, row and field of each bad one.

    With `labelled=False` (texts to predict) labels are not read and come back as None.
    """
    file = str(path)
    records = read_records(path)
    errors: list[str] = []
    out = []
    label_type: tuple[type, int] | None = None
    for row, record in records:
        if not isinstance(record, dict):
            errors.append(f"row {row}: a record must be an object with named fields, got {type(record).__name__}")
            continue
        text, label = record.get(cfg.text_field), record.get(cfg.label_field)
        if cfg.text_field not in record or text is None:
            errors.append(f"row {row}: field `{cfg.text_field}` is missing (set data.text_field)")
        elif not isinstance(text, str):
            errors.append(f"row {row}: field `{cfg.text_field}` must be text, got {type(text).__name__}")
        elif not text.strip():
            errors.append(f"row {row}: field `{cfg.text_field}` is empty")
        if not labelled:
            if isinstance(text, str) and text.strip():
                out.append((row, text, None))
            continue
        if cfg.label_field not in record or label is None or label == "":
            errors.append(f"row {row}: field `{cfg.label_field}` is missing (set data.label_field)")
            continue
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            errors.append(f"row {row}: field `{cfg.label_field}` must be text or an integer, got {label!r}")
            continue
        if label_type is None:
            label_type = (type(label), row)
        elif type(label) is not label_type[0]:
            errors.append(
                f"row {row}: field `{cfg.label_field}` is {type(label).__name__} ({label!r}) but row {label_type[1]} "
                f"has {label_type[0].__name__} labels; use one type for all labels"
            )
            continue
        if isinstance(text, str) and text.strip():
            out.append((row, text, label))
    raise_all(file, errors)
    return out


def label_maps(labels: list[str | int], file: str) -> tuple[dict[int, str], dict[str, int]]:
    """id2label / label2id for the training labels: integers keep their value order, text sorts."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"{file}: every record has label {classes[0]!r}; a classifier needs at least two classes")
    id2label = {i: str(c) for i, c in enumerate(classes)}
    return id2label, {v: k for k, v in id2label.items()}


def load_labelled(path: str | Path, tokenizer, cfg: DataConfig, label2id: dict[str, int] | None = None):
    """Tokenize a labelled file. Without `label2id` (training) the label map is built from it.

    Returns (examples, report, id2label). With `label2id` (evaluation), a label outside the map is an error.
    """
    if isinstance(path, list):
        raise ConfigError("data.train: a list of sources is for SFT (recipe: sft); classification reads one file")
    file = str(path)
    rows = read_labelled(path, cfg)
    if label2id is None:
        id2label, label2id = label_maps([label for _, _, label in rows], file)
    else:
        id2label = {v: k for k, v in label2id.items()}
        unknown = [(row, label) for row, _, label in rows if str(label) not in label2id]
        if unknown:
            lines = [
                f"row {row}: field `{cfg.label_field}` has label {label!r}, unknown to this adapter "
                f"(it knows {', '.join(map(repr, label2id))})"
                for row, label in unknown
            ]
            raise_all(file, lines)
    report = LabelReport(file=file, records=len(rows), fingerprint=fingerprint_data(path))
    report.class_counts = dict(sorted(Counter(str(label) for _, _, label in rows).items()))
    report.duplicates = len(rows) - len({(t, str(lab)) for _, t, lab in rows})
    encoded, report.truncated = encode_texts(tokenizer, [(row, t) for row, t, _ in rows], cfg, file)
    examples = [
        LabelledExample(input_ids=ids, label=label2id[str(label)], row=row, text=text)
        for (row, text, label), ids in zip(rows, encoded)
    ]
    return examples, report, id2label


def encode_texts(tokenizer, rows: list[tuple[int, str]], cfg: DataConfig, file: str) -> tuple[list[list[int]], int]:
    """Token ids of (row, text) pairs, over-long ones truncated or rejected per data.overlong.

    Returns the ids and how many were truncated.
    """
    encoded = tokenizer([t for _, t in rows], truncation=False)["input_ids"]
    out, truncated = [], 0
    for (row, _), ids in zip(rows, encoded):
        if len(ids) > cfg.max_length:
            if cfg.overlong == "reject":
                raise DataError(f"{file}: row {row}: {len(ids)} tokens is over data.max_length={cfg.max_length}")
            # Keep the end marker ([SEP] for BERT) where the tokenizer adds one: truncate the middle of the text.
            ids = ids[: cfg.max_length - 1] + ids[-1:] if ids[-1] == tokenizer.sep_token_id else ids[: cfg.max_length]
            truncated += 1
        out.append(ids)
    return out, truncated


def load_texts(path: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[str], list[list[int]]]:
    """Texts to predict from a file (data.text_field of each record, every bad record listed) and their ids."""
    rows = [(row, text) for row, text, _ in read_labelled(path, cfg, labelled=False)]
    ids, _ = encode_texts(tokenizer, rows, cfg, str(path))
    return [t for _, t in rows], ids


def to_dataset(examples: list[LabelledExample]):
    from qtune import data

    return data.to_dataset(examples, labels=[e.label for e in examples])


@torch.no_grad()
def predict_proba(
    model, tokenizer, inputs: list[list[int]], batch_size: int = 32, progress: str | None = None
) -> torch.Tensor:
    """Class probabilities (rows x classes) for tokenized inputs, batched with the tokenizer's padding side."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty((len(inputs), model.config.num_labels))
    batches = [range(i, min(i + batch_size, len(inputs))) for i in range(0, len(inputs), batch_size)]
    with _as_trained(model, device):
        for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            padded = tokenizer.pad({"input_ids": [inputs[i] for i in batch]}, return_tensors="pt")
            ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
            out[batch.start : batch.stop] = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1).cpu()
    return out


def _as_trained(model, device: torch.device):
    """Autocast to the base's 16-bit dtype for a model fresh from training: its base is bf16/fp16 but its new head
    is fp32 (qtune.models.load_base trains it so), which only autocast, as in the trainer, can multiply together.
    A model loaded for inference holds its head in the base's dtype and runs as it is."""
    dtypes = {p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n}
    low = sorted(dtypes & {torch.bfloat16, torch.float16}, key=str)
    if low and torch.float32 in dtypes:
        return torch.autocast(device.type, dtype=low[0])
    return contextlib.nullcontext()


def metrics(y_true: list[int], y_pred: list[int], id2label: dict[int, str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows: truth, columns: predicted)."""
    n = len(id2label)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(y_true, y_pred):
        confusion[t][p] += 1
    per_class = {}
    for i in range(n):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(n))
        actual = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[id2label[i]] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    counts = Counter(y_true)
    return {
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / max(len(y_true), 1),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / n,
        "majority_baseline": max(counts.values()) / max(len(y_true), 1) if counts else 0.0,
        "examples": len(y_true),
        "per_class": per_class,
        "confusion": confusion,
        "labels": [id2label[i] for i in range(n)],
    }


def evaluate(
    model,
    tokenizer,
    examples: list[LabelledExample],
    id2label: dict[int, str],
    batch_size: int = 32,
    label: str = "eval",
) -> dict:
    """Metrics of `model` on labelled examples."""
    probs = predict_proba(model, tokenizer, [e.input_ids for e in examples], batch_size, progress=f"{label}: predict")
    return metrics([e.label for e in examples], probs.argmax(-1).tolist(), id2label)


def format_confusion(m: dict) -> str:
    """The confusion matrix as a text table."""
    labels = m["labels"]
    width = max(10, *(len(lab) for lab in labels))
    corner = "truth/pred"
    lines = [f"{corner:<{width + 2}}" + "".join(f"{lab:>{width + 2}}" for lab in labels)]
    for lab, row in zip(labels, m["confusion"]):
        lines.append(f"{lab:<{width + 2}}" + "".join(f"{v:>{width + 2}}" for v in row))
    return "\n".join(lines)


def confusion_png(m: dict, title: str) -> bytes:
    """The confusion matrix as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, confusion = m["labels"], m["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    top = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
