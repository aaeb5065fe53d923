"""loss.png: the train and eval loss curves of a run, drawn from metrics.jsonl."""

from __future__ import annotations

import io
from pathlib import Path

from ftcli.atomic import atomic_write_bytes


def write_loss_plot(metrics: list[dict], path: Path, title: str) -> bool:
    """Draw the curves; returns False (and writes nothing) when no loss was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return True
