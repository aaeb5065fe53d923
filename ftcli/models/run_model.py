"""Load a run for inference from its run directory alone: base model + adapter (or merged/), tokenizer, template."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import RunStateError
from ftcli.recipe.schema import Recipe

# Tokenizer files that mark a folder as holding a saved tokenizer.
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


@dataclass
class RunModel:
    """A run's model ready for inference, with everything needed to prompt it the way it was trained."""

    model: Any                  # PeftModel (base + adapter) or the merged transformers model
    tokenizer: Any              # the run's saved tokenizer, pad token set, chat template = the run's template
    recipe: Recipe              # the run's resolved recipe (recipe.yaml)
    chat_template: str | None   # the exact template training used (None for format: text runs)
    merged: bool                # True when model is the run's merged/ folder
    base_model: dict            # run.json base_model: reference, kind, local_dir, fingerprint

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def virtual_tokens(self) -> bool:
        """Prefix / prompt tuning: the adapter lives in the attention cache or input embeddings, so
        transformers' generate() can't be trusted with it (it drops the prefix); see ftcli.inference.decoding."""
        config = getattr(self.model, "active_peft_config", None)
        return bool(config is not None and config.is_prompt_learning)

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """Run the base model alone (adapter disabled) inside this block."""
        if not self.has_adapter:
            raise RunStateError("the merged model has no separate base to compare with",
                                hint="use base + adapter (drop --merged)")
        with self.model.disable_adapter():
            yield


def check_base_fingerprint(run, recipe: Recipe, *, trust_remote_code: bool = False) -> dict:
    """Resolve the recipe's base model and refuse it when it is not the model the adapter was trained on."""
    from ftcli.models.load import resolve_model

    recorded = run.read().get("base_model") or {}
    resolved = resolve_model(recipe.model, trust_remote_code=trust_remote_code)
    expected = recorded.get("fingerprint")
    if expected and resolved.fingerprint != expected:
        raise RunStateError(
            f"run {run.name!r}: base model {recipe.model.path} (fingerprint {resolved.fingerprint[:16]}) is not the "
            f"model its adapter was trained on (fingerprint {expected[:16]}, from {recorded.get('reference')})",
            hint="restore the original base model at that path, or train the run again on this one",
        )
    return {**recorded, "reference": recorded.get("reference", recipe.model.path),
            "local_dir": str(resolved.local_dir), "fingerprint": resolved.fingerprint}


def load_run_tokenizer(run, recipe: Recipe, *, folder=None, trust_remote_code: bool = False):
    """The tokenizer saved with the run (adapter/ unless `folder`), the run's chat template, a pad token set."""
    from transformers import AutoTokenizer

    from ftcli.models.load import load_tokenizer

    folder = folder or run.adapter_dir
    if any((folder / marker).exists() for marker in _TOKENIZER_MARKERS):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    else:
        tokenizer = load_tokenizer(recipe.model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Inference only pads and masks by attention mask, so reusing EOS is harmless here.
        tokenizer.pad_token = tokenizer.eos_token
    template = run_chat_template(run, recipe)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def run_chat_template(run, recipe: Recipe | None = None) -> str | None:
    """The chat template training used, as saved in the run; None for format: text runs, whose adapter/ may still
    hold the base tokenizer's own template (tokenizer.save_pretrained writes it under the same file name)."""
    recipe = recipe or run.load_recipe()
    path = run.chat_template_path
    if recipe.data.format == "text" or not path.exists():
        return None
    return path.read_text(encoding="utf-8")


def parity_batch(run, recipe: Recipe | None = None) -> dict:
    """The parity check conversations (ftcli.models.parity), rendered through the run's template and tokenized."""
    from ftcli.models import parity

    recipe = recipe or run.load_recipe()
    tokenizer = load_run_tokenizer(run, recipe, trust_remote_code=recipe.model.trust_remote_code)
    return parity.encode(tokenizer, parity.check_texts(run_chat_template(run, recipe), tokenizer))


def load_run_model(run, *, merged: bool = False, action: str = "use", quantized: bool = True,
                   dtype: str | None = None, device: str | None = None) -> RunModel:
    """Load a completed run for inference from its run directory alone (recipe.yaml, run.json, adapter/).

    merged: load the run's merged/ folder instead of base + adapter (RunStateError, exit 5, when missing).
    quantized: load the base as trained (4-bit for qlora); False loads the full-precision base (for merging).
    dtype / device: override the recipe's model.dtype / model.device.
    RunStateError (exit 5) when the run has no adapter, is not completed, or its base model changed.
    """
    run.require_adapter(action)
    recipe = run.load_recipe()
    from ftcli.models.quiet import quiet_libraries

    quiet_libraries()
    trust = recipe.model.trust_remote_code  # the run was trained with --trust-remote-code when this is set
    model_config = recipe.model.model_copy(update={k: v for k, v in (("dtype", dtype), ("device", device)) if v})
    if merged:
        if not run.has_merged_model():
            raise RunStateError(f"run {run.name!r} has no merged model in {run.merged_dir}",
                                hint=f"create it with: ftcli merge {run.name}")
        base_info = run.read().get("base_model") or {}
        model = _load_merged(run, model_config, trust)
        tokenizer_folder = run.merged_dir if (run.merged_dir / "tokenizer_config.json").exists() else None
        tokenizer = load_run_tokenizer(run, recipe, folder=tokenizer_folder, trust_remote_code=trust)
    else:
        base_info = check_base_fingerprint(run, recipe, trust_remote_code=trust)
        model = _load_base_with_adapter(run, recipe, model_config, quantized, trust)
        tokenizer = load_run_tokenizer(run, recipe, trust_remote_code=trust)
    model.eval()
    return RunModel(model=model, tokenizer=tokenizer, recipe=recipe, chat_template=run_chat_template(run, recipe),
                    merged=merged, base_model=base_info)


def with_adapter(base, adapter_dir: Path):
    """The adapter in `adapter_dir` on the loaded `base`, for inference: the one way ftcli puts an adapter on a
    model it did not train in this process (eval, generate, merge, parity checks)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # peft calls a transformers helper that v5 deprecated
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    model.eval()
    return model


def _load_base_with_adapter(run, recipe: Recipe, model_config, quantized: bool, trust: bool):
    from ftcli.models.load import load_model

    quantization = recipe.effective_quantization if quantized else None
    base = load_model(model_config, quantization=quantization, trust_remote_code=trust)
    return with_adapter(base, run.adapter_dir)


def _load_merged(run, model_config, trust: bool):
    from ftcli.models.load import load_model

    return load_model(model_config.model_copy(update={"path": str(run.merged_dir)}), trust_remote_code=trust)
