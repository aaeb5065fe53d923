"""loss.png: the train and eval loss curves of a run, and for preference objectives the reward margin, drawn from
metrics.jsonl."""

from __future__ import annotations

import io
from pathlib import Path

from ftcli.atomic import atomic_write_bytes


def write_loss_plot(metrics: list[dict], path: Path, title: str) -> bool:
    """Draw the curves; returns False (and writes nothing) when no loss was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    margins = {name: [(m["step"], m[key]) for m in metrics if key in m]
               for name, key in (("train", "rewards/margins"), ("eval", "eval_rewards/margins"))}
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(margins.values()):
        figure, (axes, margin_axes) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True)
        for name, points in margins.items():
            if points:
                margin_axes.plot(*zip(*points), marker="o" if name == "eval" else None, label=f"{name} reward margin")
        margin_axes.axhline(0, color="grey", linewidth=0.8)
        margin_axes.set_xlabel("step")
        margin_axes.set_ylabel("chosen - rejected reward")
        margin_axes.grid(alpha=0.3)
        margin_axes.legend()
    else:
        figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
        axes.set_xlabel("step")
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), marker="o", label="eval loss")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return True
