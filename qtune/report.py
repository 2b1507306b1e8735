"""Run reports: the loss-curve PNG and the metadata written into qtune.json."""

from __future__ import annotations

import io
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

LIBRARIES = ("qtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "safetensors", "accelerate")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def hardware() -> dict[str, Any]:
    """Where the run trained: the GPU(s) or the CPU, and the number of processes."""
    import os

    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def adapter_meta(
    kind: str,
    cfg,
    base_path,
    fingerprint: str,
    train_report,
    eval_report,
    result,
    seconds: float,
    losses: list[tuple[int, float]],
    metrics: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The qtune.json of an adapter: what every recipe records, plus the recipe's own `extra` sections."""
    from qtune.config import to_dict
    from qtune.lora import base_identity

    versions = library_versions()
    training = {"steps": result.global_step, "seconds": round(seconds, 1), "train_loss": result.training_loss}
    return {
        "qtune_version": versions["qtune"],
        "kind": kind,
        "base": {
            "name": cfg.model.name,
            "path": str(base_path),
            "fingerprint": fingerprint,
            **base_identity(base_path),
        },
        "config": to_dict(cfg),
        "data": {"train": vars(train_report), "eval": vars(eval_report) if eval_report else None},
        "training": {**training, **extra.pop("training", {}), "loss_curve": losses},
        "metrics": metrics,
        "hardware": hardware(),
        **extra,
        "versions": versions,
    }


def loss_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) pairs from a trainer's log history."""
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]


def loss_curve_png(points: list[tuple[int, float]], title: str) -> bytes:
    """The training loss curve as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
