"""loss.png: the train and eval loss curves of a run, and below them the reward margin of preference objectives or
the mean reward of grpo, drawn from metrics.jsonl."""

from __future__ import annotations

import io
from pathlib import Path

from ftcli.atomic import atomic_write_bytes

# The second panel: (train key, eval key, curve label, y-axis label), the first one logged.
REWARD_PANELS = (("rewards/margins", "eval_rewards/margins", "reward margin", "chosen - rejected reward"),
                 ("reward", "eval_reward", "reward", "mean reward (weighted sum)"))


def write_loss_plot(metrics: list[dict], path: Path, title: str) -> bool:
    """Draw the curves; returns False (and writes nothing) when no loss was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    panel = next((p for p in REWARD_PANELS if any(p[0] in m or p[1] in m for m in metrics)), None)
    rewards = {} if panel is None else {name: [(m["step"], m[key]) for m in metrics if key in m]
                                        for name, key in (("train", panel[0]), ("eval", panel[1]))}
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if panel is not None:
        _, _, reward_label, reward_axis = panel
        figure, (axes, reward_axes) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True)
        for name, points in rewards.items():
            if points:
                reward_axes.plot(*zip(*points), marker="o" if name == "eval" else None, label=f"{name} {reward_label}")
        reward_axes.axhline(0, color="grey", linewidth=0.8)
        reward_axes.set_xlabel("step")
        reward_axes.set_ylabel(reward_axis)
        reward_axes.grid(alpha=0.3)
        reward_axes.legend()
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
