"""Where a training step's time goes: torch.profiler's CPU events grouped into the parts of a step (the base model's
matmuls, LoRA's, attention, elementwise work, the LM head and loss, the optimizer, data, callbacks).

Each event's own time (its time minus its children's) goes to exactly one part, so the parts add up to the time the
profiler saw; what it did not see (Python between operators) is the step's wall time minus that sum.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("base model matmuls", "4-bit dequantization", "LoRA matmuls", "attention", "LM head and loss",
         "normalisation, activations, other elementwise", "copies and dtype casts", "optimizer",
         "data loading and collation", "logging and callbacks", "other operators", "Python between operators")

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::mv", "aten::addmv", "aten::dot"}
BATCHED_MATMUL_OPS = {"aten::bmm", "aten::baddbmm"}   # only attention multiplies batched 3-D matrices here
ATTENTION_MARKERS = ("scaled_dot_product", "flash_attention", "softmax")
HEAD_MARKERS = ("cross_entropy", "log_softmax", "nll_loss", "logsumexp", "LogProb", "log_probs")
COPY_OPS = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
            "aten::empty_like", "aten::zeros_like", "aten::index_select", "aten::expand", "aten::reshape",
            "aten::_unsafe_view", "aten::view", "aten::transpose", "aten::t", "aten::permute", "aten::select",
            "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::as_strided", "aten::flatten"}
ELEMENTWISE_MARKERS = ("mul", "add", "sub", "div", "pow", "rsqrt", "sqrt", "mean", "silu", "gelu", "sigmoid", "neg",
                       "exp", "tanh", "rms_norm", "layer_norm", "dropout", "bernoulli", "sum", "where", "masked_fill",
                       "fill_", "zero_", "cos", "sin", "threshold", "relu", "clamp", "rotary")
# Ranges the probe itself opens around the trainer's callbacks and logging (torch opens the optimizer's and the data
# loader's).
CALLBACK_RANGES = ("ftcli::callbacks", "ftcli::logging")


@dataclass(frozen=True)
class OpEvent:
    """One profiler event: its name, its inputs' shapes, the names of the ranges and operators around it (innermost
    first), and its own time in microseconds."""

    name: str
    input_shapes: tuple
    ancestors: tuple[str, ...]
    self_us: float


def _dims(shapes) -> set[int]:
    return {int(d) for shape in shapes or () if isinstance(shape, (list, tuple)) for d in shape
            if isinstance(d, int)}


def part_of(event: OpEvent, *, rank: int | None, vocab_size: int) -> str:
    """The part of a step an event's own time belongs to."""
    around = " ".join(event.ancestors)
    if "Optimizer.step" in around or "Optimizer.zero_grad" in around or event.name.startswith("Optimizer."):
        return "optimizer"
    if "DataLoader" in around or "DataLoader" in event.name:
        return "data loading and collation"
    if any(r in around or event.name == r for r in CALLBACK_RANGES):
        return "logging and callbacks"
    name = event.name
    dims = _dims(event.input_shapes)
    if "dequantize" in name or "dequant" in name:
        return "4-bit dequantization"
    if "embedding" in name:   # the input lookup (the vocabulary-sized table is not the LM head's matmul)
        return "other operators"
    if any(marker in name or marker in around for marker in HEAD_MARKERS) or vocab_size in dims:
        return "LM head and loss"
    if any(marker in name for marker in ATTENTION_MARKERS) or "scaled_dot_product" in around \
            or name in BATCHED_MATMUL_OPS:
        return "attention"
    if name in MATMUL_OPS or "gemm" in name or "gemv" in name or "matmul_4bit" in name:
        return "LoRA matmuls" if rank is not None and rank in dims else "base model matmuls"
    if name in COPY_OPS:
        return "copies and dtype casts"
    short = name.split("::")[-1]
    if any(marker in short for marker in ELEMENTWISE_MARKERS):
        return "normalisation, activations, other elementwise"
    return "other operators"


def breakdown(events: list[OpEvent], wall_us: float, *, rank: int | None, vocab_size: int) -> dict[str, float]:
    """Microseconds per part (every part in PARTS, zero when absent), the unprofiled remainder included."""
    parts = dict.fromkeys(PARTS, 0.0)
    for event in events:
        parts[part_of(event, rank=rank, vocab_size=vocab_size)] += event.self_us
    parts["Python between operators"] = max(0.0, wall_us - sum(parts.values()))
    return parts


def op_events(profile) -> list[OpEvent]:
    """OpEvents of a finished torch.profiler.profile (CPU events; record_shapes=True gives the shapes)."""
    out = []
    for event in profile.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        out.append(OpEvent(event.name, tuple(event.input_shapes or ()), tuple(ancestors),
                           float(event.self_cpu_time_total)))
    return out


def plot_parts(profiles: dict[str, dict[str, float]], path) -> None:
    """One horizontal stacked bar per profiled arm: the seconds of each part of its step, in PARTS order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(profiles)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(names)))
    colours = plt.get_cmap("tab20").colors
    left = [0.0] * len(names)
    for index, part in enumerate(PARTS):
        widths = [profiles[name].get(part, 0.0) for name in names]
        ax.barh(names, widths, left=left, color=colours[index % len(colours)], label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds of one profiled training step")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9 / (1.2 + 0.6 * len(names))), ncol=3, fontsize=8,
              frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
