"""Recipe method -> PEFT config, and the table of what each method can do."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import UsageError


@dataclass(frozen=True)
class MethodTraits:
    mergeable: bool           # merge_and_unload works (lora, dora, qlora, ia3)
    quantized_base: bool      # base loaded through bitsandbytes (qlora)
    gguf_lora: bool           # exportable as a llama.cpp LoRA adapter (lora, qlora without modules_to_save)
    virtual_tokens: bool      # prefix / prompt tuning


METHOD_TRAITS: dict[str, MethodTraits] = {
    "lora": MethodTraits(mergeable=True, quantized_base=False, gguf_lora=True, virtual_tokens=False),
    "qlora": MethodTraits(mergeable=True, quantized_base=True, gguf_lora=True, virtual_tokens=False),
    "dora": MethodTraits(mergeable=True, quantized_base=False, gguf_lora=False, virtual_tokens=False),
    "ia3": MethodTraits(mergeable=True, quantized_base=False, gguf_lora=False, virtual_tokens=False),
    "prefix": MethodTraits(mergeable=False, quantized_base=False, gguf_lora=False, virtual_tokens=True),
    "prompt": MethodTraits(mergeable=False, quantized_base=False, gguf_lora=False, virtual_tokens=True),
}

# loftq starts from PEFT's default and is fitted once the quantized base is wrapped (ftcli/models/loftq.py).
LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
LORA_KINDS = ("lora", "qlora", "dora")


# ---------------------------------------------------------------------------------------------- module checks


def module_matches(entry: str, module_name: str) -> bool:
    """PEFT's rule for a target list entry: the full module name, or a dotted suffix of it."""
    return module_name == entry or module_name.endswith("." + entry)


def unmatched_entries(requested: Iterable[str], module_names: Sequence[str]) -> list[str]:
    """Entries of `requested` that name no module at all (PEFT only fails when *every* entry misses)."""
    return [entry for entry in requested if not any(module_matches(entry, name) for name in module_names)]


def check_module_entries(key: str, requested: Iterable[str] | None, module_names: Sequence[str],
                         linear_names: Sequence[str], *, listed: str = "linear modules") -> None:
    """UsageError (exit 2) naming the recipe key, the missing entries and the model's linear module names (or the
    other names given as `linear_names`, described by `listed`)."""
    if requested is None or isinstance(requested, str):
        return
    missing = unmatched_entries(requested, module_names)
    if not missing:
        return
    suggestions = sorted({s for entry in missing for s in difflib.get_close_matches(entry, linear_names, n=1)})
    hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
    raise UsageError(
        f"{key}: {', '.join(repr(m) for m in missing)} match{'es' if len(missing) == 1 else ''} no module of the "
        f"model; its {listed} are: {', '.join(linear_names)}",
        hint=hint + ("use names from that list, or target_modules: all-linear" if listed == "linear modules"
                     else "use names from that list"),
    )


def weighted_module_names(model) -> list[str]:
    """Sorted unique leaf names of the modules that hold parameters of their own (embed_tokens, q_proj, norm,
    lm_head, ...): what training.lr_multipliers may name."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and next(module.parameters(recurse=False), None) is not None})


def check_lr_multiplier_names(multipliers, model) -> None:
    """UsageError (exit 2) for a training.lr_multipliers name that matches no module of the (unwrapped) model, listing
    the model's modules with weights."""
    check_module_entries("training.lr_multipliers", list(multipliers) or None,
                         [name for name, _ in model.named_modules() if name], weighted_module_names(model),
                         listed="modules with weights")


def require_subset(key: str, subset: Sequence[str], superset: Sequence[str], superset_key: str) -> None:
    extra = [name for name in subset if name not in superset]
    if extra:
        raise UsageError(f"{key}: {', '.join(extra)} not in {superset_key} ({', '.join(superset)})",
                         hint=f"every {key.rsplit('.', 1)[-1]} entry must also be listed in {superset_key}")


# ---------------------------------------------------------------------------------------------- configs


def peft_config_for(method, model, tokenizer=None):
    """The peft config for a recipe method; UsageError (exit 2) listing the model's linear module names when a
    target_modules entry matches nothing."""
    from ftcli.models.load import linear_module_names

    module_names = [name for name, _ in model.named_modules() if name]
    linear_names = linear_module_names(model)
    for key in ("target_modules", "modules_to_save", "feedforward_modules"):
        check_module_entries(f"method.{key}", getattr(method, key, None) or None, module_names, linear_names)

    if method.kind in LORA_KINDS:
        return lora_config(method)
    if method.kind == "prefix":
        return prefix_config(method, hidden_size=_hidden_size(model))
    if method.kind == "prompt":
        return prompt_config(method, tokenizer_folder=_tokenizer_folder(tokenizer, model))
    if method.kind == "ia3":
        return ia3_config(method, model_type=getattr(model.config, "model_type", None), linear_names=linear_names)
    raise UsageError(f"method.kind {method.kind!r} is not supported", hint=f"use one of {', '.join(METHOD_TRAITS)}")


def lora_config(method):
    """LoRA, QLoRA and DoRA: one LoraConfig; DoRA only adds use_dora."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules if isinstance(method.target_modules, str) else list(method.target_modules),
        use_rslora=method.rslora,
        init_lora_weights=LORA_INIT[method.init],
        modules_to_save=list(method.modules_to_save) or None,
        use_dora=method.kind == "dora",
    )


def prefix_config(method, *, hidden_size: int):
    """Prefix tuning. Its random initial prefix wrecks the model's output at step 0 (loss ~8.8 on SmolLM2) and it learns
    only at high learning rates (~1e-2); that is the method, not a bug."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=method.num_virtual_tokens,
        prefix_projection=method.projection,
        encoder_hidden_size=method.encoder_hidden_size or hidden_size,
    )


def prompt_config(method, *, tokenizer_folder: str | None):
    """Prompt tuning, initialised from the embeddings of init_text (tokenized from the local tokenizer folder)
    or at random."""
    from peft import PromptTuningConfig, PromptTuningInit

    if method.init_text is None:
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    if not tokenizer_folder:
        raise UsageError("method.init_text needs the model's tokenizer folder, which is unknown here")
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=method.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=method.init_text,
        tokenizer_name_or_path=tokenizer_folder,
    )


def ia3_config(method, *, model_type: str | None, linear_names: Sequence[str]):
    """IA3 with its module lists resolved (PEFT's architecture default when null) so the run records them."""
    from peft import IA3Config
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as DEFAULT_FEEDFORWARD,
    )
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULT_TARGETS,
    )

    targets, feedforward = ia3_modules(
        method.target_modules, method.feedforward_modules, linear_names=linear_names,
        default_targets=DEFAULT_TARGETS.get(model_type), default_feedforward=DEFAULT_FEEDFORWARD.get(model_type),
        model_type=model_type,
    )
    return IA3Config(
        task_type="CAUSAL_LM",
        target_modules=targets,
        feedforward_modules=feedforward,
        modules_to_save=list(method.modules_to_save) or None,
    )


def ia3_modules(target_modules, feedforward_modules, *, linear_names: Sequence[str],
                default_targets: Sequence[str] | None, default_feedforward: Sequence[str] | None,
                model_type: str | None) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) as explicit lists: null takes the architecture default, all-linear
    the model's linear names; feed-forward modules default to the default ones among the targets."""
    if target_modules is None:
        if default_targets is None:
            raise UsageError(f"PEFT has no default IA3 modules for model type {model_type!r}",
                             hint=f"set method.target_modules (linear modules: {', '.join(linear_names)})")
        targets = list(default_targets)
    elif target_modules == "all-linear":
        targets = list(linear_names)
    else:
        targets = list(target_modules)
    if feedforward_modules is None:
        feedforward = [name for name in (default_feedforward or []) if name in targets]
    else:
        feedforward = list(feedforward_modules)
        require_subset("method.feedforward_modules", feedforward, targets, "method.target_modules")
    return targets, feedforward


def _hidden_size(model) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def _tokenizer_folder(tokenizer, model) -> str | None:
    return getattr(tokenizer, "name_or_path", None) or getattr(model, "name_or_path", None)


# ---------------------------------------------------------------------------------------------- apply


def gradient_checkpointing_enabled(setting, device: str) -> bool:
    """training.gradient_checkpointing: auto is on for GPUs (memory) and off on the CPU (it costs time there)."""
    if setting == "auto":
        return device.startswith("cuda")
    return bool(setting)


def apply_method(model, recipe, tokenizer=None, *, starting_adapter: Path | None = None,
                 weights_dir: Path | None = None, init_facts: dict | None = None):
    """Wrap the loaded base model in a PeftModel for the recipe's method (kbit preparation for qlora), a new adapter
    or, with `starting_adapter`, that adapter's weights trained on; returns (peft_model, {"trainable", "total"}).
    init: loftq fits the new adapter to the full-precision weights in `weights_dir` (default: the model's folder)
    and puts what it measured in `init_facts`."""
    from ftcli.models.quiet import quiet_libraries

    quiet_libraries()
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    method = recipe.method
    traits = METHOD_TRAITS[method.kind]
    config = peft_config_for(method, model, tokenizer)
    check_lr_multiplier_names(recipe.training.lr_multipliers, model)
    with warnings.catch_warnings():
        # peft 0.21 calls transformers helpers renamed in 5.x (is_/enable gradient checkpointing); harmless.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        if traits.quantized_base:
            device = str(next(model.parameters()).device)
            checkpointing = gradient_checkpointing_enabled(recipe.training.gradient_checkpointing, device)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
            )
        if starting_adapter is not None:
            peft_model = PeftModel.from_pretrained(model, str(starting_adapter), is_trainable=True)
        else:
            peft_model = get_peft_model(model, config)
            if getattr(method, "init", None) == "loftq":
                from ftcli.models.loftq import fit_loftq

                facts = fit_loftq(peft_model, Path(weights_dir or model.name_or_path))
                if init_facts is not None:
                    init_facts.update(facts)
    trainable, total = peft_model.get_nb_trainable_parameters()
    return peft_model, {"trainable": int(trainable), "total": int(total)}
