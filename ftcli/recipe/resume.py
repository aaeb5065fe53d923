"""What may change between a run and its --resume: anything else would break the resumed loss curve."""

from __future__ import annotations

from ftcli.recipe.schema import Recipe, flatten_keys

# Recipe keys that may change between a run and its --resume; any other change breaks the resumed curve.
RESUMABLE_CHANGES = (
    "name", "training.max_steps", "training.epochs", "training.save_steps", "training.save_total_limit",
    "training.logging_steps", "training.eval_steps", "training.report_to", "training.early_stopping_patience",
    "training.torch_compile", "data.num_proc", "eval.", "export.",
)


def resume_conflicts(old: Recipe, new: Recipe) -> list[str]:
    """The recipe keys whose change makes --resume unsafe, as 'key: old -> new'."""
    before, after = flatten_keys(old.model_dump(mode="json")), flatten_keys(new.model_dump(mode="json"))
    changed = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key) and not any(
            key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_CHANGES
        ):
            changed.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changed
