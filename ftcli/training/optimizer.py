"""The optimizer's parameter groups, built in one place for every objective's trainer: LoRA+ rates for the B matrices
(through PEFT's helper), per-module learning-rate multipliers, and weight decay."""

from __future__ import annotations

from dataclasses import dataclass

from ftcli.errors import UsageError

# Segments that wrappers put into parameter names before or inside the base model's own module names.
WRAPPER_PREFIXES = ("base_model.model.", "base_model.")
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# PEFT's LoRA+ helper makes its groups in this order: A matrices and every other matrix at lr, LoRA on embeddings,
# B matrices and 1-d parameters at lr x ratio (with weight decay, and without).
LORAPLUS_GROUPS = ("A_and_others", "lora_embedding", "B", "B_no_decay")


@dataclass(frozen=True)
class GroupPlan:
    """What splits the trainable parameters into groups of their own learning rate."""

    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float | None = None
    lr_multipliers: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_recipe(cls, recipe) -> GroupPlan:
        method = recipe.method
        return cls(loraplus_lr_ratio=getattr(method, "loraplus_lr_ratio", None),
                   loraplus_lr_embedding=getattr(method, "loraplus_lr_embedding", None),
                   lr_multipliers=tuple(recipe.training.lr_multipliers.items()))

    @property
    def is_default(self) -> bool:
        """Nothing to split: the Trainer's own two groups (with and without weight decay) are built."""
        return self.loraplus_lr_ratio is None and not self.lr_multipliers


def base_module_path(parameter_name: str) -> str:
    """The name of the module holding a parameter, as the base model names it (PEFT and FSDP wrappers left out)."""
    name = parameter_name
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.rpartition(".")[0]


def covers(entry: str, parameter_name: str) -> bool:
    """Whether the parameter lies in a module that `entry` names (PEFT's rule: the full name or a dotted suffix)."""
    from ftcli.models.methods import module_matches

    parts = base_module_path(parameter_name).split(".")
    return any(module_matches(entry, ".".join(parts[:end])) for end in range(1, len(parts) + 1))


def multiplier_of(parameter_name: str, multipliers: tuple[tuple[str, float], ...]) -> float:
    """The product of the multipliers of the modules the parameter lies in."""
    product = 1.0
    for entry, multiplier in multipliers:
        if covers(entry, parameter_name):
            product *= multiplier
    return product


def parameter_groups(model, plan: GroupPlan, *, lr: float, weight_decay: float, decay_names) -> list[dict]:
    """The optimizer's parameter groups (each with a name, lr and weight_decay): LoRA+'s groups from PEFT's helper,
    else the Trainer's two (weight decay on `decay_names`, none on the rest); then each split by lr_multipliers
    and, so that biases and norm weights take no weight decay under LoRA+ either, by `decay_names`. The same model
    and plan always give the same groups in the same order, so a checkpoint's optimizer state loads into them on
    --resume."""
    decay = set(decay_names)
    if plan.loraplus_lr_ratio is not None:
        groups = _loraplus_groups(model, plan, lr=lr, weight_decay=weight_decay)
    else:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"name": "decay", "params": [p for n, p in trainable if n in decay], "lr": lr,
             "weight_decay": weight_decay},
            {"name": "no_decay", "params": [p for n, p in trainable if n not in decay], "lr": lr,
             "weight_decay": 0.0},
        ]
    names = {id(p): name for name, p in model.named_parameters()}
    split = []
    for group in groups:
        # (multiplier, decays) -> (parameters, the lr_multipliers entries that set the multiplier)
        buckets: dict[tuple[float, bool], tuple[list, set]] = {}
        for parameter in group["params"]:
            name = names[id(parameter)]
            key = (multiplier_of(name, plan.lr_multipliers), group["weight_decay"] > 0 and name in decay)
            parameters, entries = buckets.setdefault(key, ([], set()))
            parameters.append(parameter)
            entries.update(entry for entry, _ in plan.lr_multipliers if covers(entry, name))
        if not buckets:
            split.append(group)
        for (multiplier, decays), (parameters, entries) in buckets.items():
            label = group["name"] + ("" if decays or not group["weight_decay"] else " no_decay")
            label += f" {'+'.join(sorted(entries))} x{multiplier:g}" if entries else ""
            split.append({**group, "name": label, "params": parameters, "lr": group["lr"] * multiplier,
                          "weight_decay": group["weight_decay"] if decays else 0.0})
    return split


def _loraplus_groups(model, plan: GroupPlan, *, lr: float, weight_decay: float) -> list[dict]:
    """PEFT's LoRA+ groups: B matrices (and 1-d parameters) at lr x ratio, A matrices and the rest at lr, LoRA on
    embeddings at loraplus_lr_embedding."""
    from peft.optimizers import create_loraplus_optimizer

    class GroupsOnly:
        """Takes the optimizer's place in PEFT's helper, keeping the groups it is given."""

        def __init__(self, params, **defaults):
            self.param_groups = params

    extra = {} if plan.loraplus_lr_embedding is None else {"loraplus_lr_embedding": plan.loraplus_lr_embedding}
    made = create_loraplus_optimizer(model, GroupsOnly, lr=lr, loraplus_lr_ratio=plan.loraplus_lr_ratio,
                                     loraplus_weight_decay=weight_decay, **extra)
    names = LORAPLUS_GROUPS if len(made.param_groups) == len(LORAPLUS_GROUPS) else \
        [f"loraplus_{index}" for index in range(len(made.param_groups))]
    return [{"name": name, **group} for name, group in zip(names, made.param_groups)]


def describe_groups(groups: list[dict]) -> list[dict]:
    """For run.json: each non-empty group's name, learning rate, weight decay and parameter count."""
    return [{"name": group["name"], "lr": group["lr"], "weight_decay": group["weight_decay"],
             "parameters": sum(p.numel() for p in group["params"])} for group in groups if group["params"]]


def check_multipliers_apply(model, multipliers: dict[str, float], method_kind: str) -> None:
    """UsageError (exit 2) for a training.lr_multipliers entry over no trainable parameter."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    idle = [entry for entry in multipliers if not any(covers(entry, name) for name in trainable)]
    if idle:
        raise UsageError(f"training.lr_multipliers: {', '.join(idle)} hold{'s' if len(idle) == 1 else ''} no "
                         f"parameter that method {method_kind} trains",
                         hint="list the module in method.modules_to_save (trained in full) or method.target_modules, "
                              "or remove its multiplier")


class GroupedOptimizer:
    """Trainer mixin (every objective's trainer has it): the optimizer over parameter_groups() when `group_plan`
    asks for LoRA+ or lr_multipliers, of the class and settings training.optimizer selects; otherwise the
    Trainer's own. The scheduler then scales every group's rate by the same factor."""

    group_plan: GroupPlan | None = None

    def create_optimizer(self, model=None):
        plan = self.group_plan
        if self.optimizer is not None or plan is None or plan.is_default:
            return super().create_optimizer(model)
        target = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
        groups = parameter_groups(target, plan, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                                  decay_names=self.get_decay_parameter_names(target))
        self.optimizer = optimizer_cls(groups, **kwargs)
        if "bitsandbytes" in str(optimizer_cls) and kwargs.get("optim_bits") == 8:
            _embeddings_in_32_bits(target)
        return self.optimizer


def _embeddings_in_32_bits(model) -> None:
    """8-bit Adam keeps embeddings' state in 32 bits (as the Trainer's own optimizer does): their rows are sparse."""
    import bitsandbytes
    from torch import nn

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
