"""The loss curves: (step, loss) points from the trainer's log, training and held-out, and the PNG saved with the
adapter."""

from __future__ import annotations

import io
from typing import Any


def loss_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) pairs from a trainer's log history."""
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]


def eval_loss_points(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, held-out loss) pairs from a trainer's log history (train.eval_every)."""
    return [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]


def loss_curve_png(
    points: list[tuple[int, float]], title: str, eval_points: list[tuple[int, float]] | None = None
) -> bytes:
    """The training loss curve as PNG bytes, with the held-out loss as a second line when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 50 else None, label="training")
    if eval_points:
        steps, losses = zip(*eval_points)
        ax.plot(steps, losses, marker="o", label="held-out")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if eval_points else "training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
