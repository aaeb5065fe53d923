"""The method and optimisation knobs of a recipe (LoftQ, LoRA+, lr_multipliers, weight decay, NEFTune) and the
learning rates they give, as --dry-run shows them and run.json records them."""

from __future__ import annotations

PEFT_LORAPLUS_EMBEDDING_LR = 1e-6   # create_loraplus_optimizer's default loraplus_lr_embedding


def knob_summary(recipe) -> dict:
    """The recipe's knobs, resolved (null where they do not apply to its method), and the peak learning rates."""
    method, t = recipe.method, recipe.training
    init = getattr(method, "init", None)
    ratio = getattr(method, "loraplus_lr_ratio", None)
    embedding = getattr(method, "loraplus_lr_embedding", None)
    return {
        "init": init,
        "loftq_iter": method.loftq_iter if init == "loftq" else None,
        "loraplus_lr_ratio": ratio,
        "loraplus_lr_embedding": (embedding or PEFT_LORAPLUS_EMBEDDING_LR) if ratio is not None else None,
        "lr_multipliers": dict(t.lr_multipliers),
        "weight_decay": t.weight_decay,
        "neftune_noise_alpha": t.neftune_noise_alpha,
        "lr": t.lr,
        "lora_b_lr": t.lr * ratio if ratio is not None else None,
        "module_lr": {name: t.lr * multiplier for name, multiplier in t.lr_multipliers.items()},
    }


def run_knobs(recipe, trainer, init_facts: dict | None) -> dict:
    """For run.json: knob_summary, what LoftQ measured, and the optimizer's parameter groups as this trainer builds
    them (ftcli/training/optimizer.py)."""
    from ftcli.training.optimizer import GroupPlan, describe_groups, parameter_groups

    t = recipe.training
    plan = getattr(trainer, "group_plan", None) or GroupPlan.from_recipe(recipe)
    groups = parameter_groups(trainer.model, plan, lr=t.lr, weight_decay=t.weight_decay,
                              decay_names=trainer.get_decay_parameter_names(trainer.model))
    return {**knob_summary(recipe), "loftq": init_facts or None, "param_groups": describe_groups(groups)}


def knob_rows(knobs: dict) -> list[tuple[str, str]]:
    """(name, what it does here) for --dry-run's table."""
    lr = knobs["lr"]
    rows = [("lr", f"{lr:g}, every group scaled alike by training.scheduler")]
    if knobs["init"] is not None:
        rows.append(("method.init", f"loftq: the adapter fitted to what 4-bit quantization took from each weight "
                                    f"({knobs['loftq_iter']} round)" if knobs["init"] == "loftq" else knobs["init"]))
        ratio = knobs["loraplus_lr_ratio"]
        rows.append(("LoRA+", f"B matrices at {knobs['lora_b_lr']:g} ({ratio:g} x lr), A matrices at {lr:g}, "
                              f"LoRA on embeddings at {knobs['loraplus_lr_embedding']:g}"
                     if ratio is not None else "off (A and B matrices at lr)"))
    rows.append(("lr multipliers", ", ".join(f"{name} at {knobs['module_lr'][name]:g} ({multiplier:g} x lr)"
                                             for name, multiplier in knobs["lr_multipliers"].items()) or "none"))
    rows.append(("weight decay", f"{knobs['weight_decay']:g} (none on biases and norm weights)"))
    alpha = knobs["neftune_noise_alpha"]
    rows.append(("NEFTune", f"noise alpha {alpha:g} on the input embeddings, in training forwards only"
                 if alpha is not None else "off"))
    return rows
