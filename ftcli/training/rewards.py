"""The rewards a grpo recipe declares, as the reward functions TRL's GRPOTrainer calls: each scores a batch of
completions, most against the reference answer of their prompt."""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from ftcli.errors import UsageError
from ftcli.recipe.schema import reward_names
from ftcli.text_match import contains, exact_match, exact_match_norm, normalize, token_f1

# A number as people write it: sign, thousands separators, decimals, exponent ("1,234.5", "-3", "2e-3").
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
TEXT_SCORERS = {"exact_match": exact_match, "exact_match_norm": exact_match_norm, "contains": contains,
                "f1": token_f1}


def last_number(text: str) -> float | None:
    """The last number written in the text, None when there is none."""
    found = NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def score(reward, completion: str, reference: str | None, completion_tokens: int) -> float:
    """One declared reward (not python) of one completion."""
    kind = reward.kind
    if kind in TEXT_SCORERS:
        return TEXT_SCORERS[kind](completion, reference or "")
    if kind == "number":
        got, wanted = last_number(completion), last_number(reference or "")
        if got is None or wanted is None or not math.isfinite(got):
            return 0.0
        return float(abs(got - wanted) <= reward.tolerance)
    if kind == "regex":
        match = re.search(reward.pattern, completion)
        if match is None:
            return 0.0
        if reward.group is None:
            return 1.0
        captured = match.group(reward.group)
        return float(captured is not None and normalize(captured) == normalize(reference or ""))
    if kind == "format":
        return float(re.fullmatch(reward.pattern, completion.strip(), flags=re.DOTALL) is not None)
    if kind == "length":
        excess = completion_tokens - reward.max_tokens
        return -min(1.0, excess / reward.max_tokens) if excess > 0 else 0.0
    raise ValueError(f"no scorer for reward kind {kind}")


def reward_functions(rewards, *, allow_code: bool, recipe_dir: Path | None) -> list[Callable]:
    """A function per reward, named as its metrics are (rewards/NAME/mean in metrics.jsonl)."""
    functions = []
    for reward, name in zip(rewards, reward_names(rewards)):
        function = (_python_reward(reward, allow_code=allow_code, recipe_dir=recipe_dir) if reward.kind == "python"
                    else _declared(reward))
        function.__name__ = name
        functions.append(function)
    return functions


def _declared(reward) -> Callable:
    def scored(prompts, completions, completion_ids=None, reference=None, **_):
        references = reference if reference is not None else [None] * len(completions)
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [0] * len(completions)
        return [score(reward, _text(completion), ref, length)
                for completion, ref, length in zip(completions, references, lengths)]

    return scored


def _text(completion) -> str:
    """A completion as text: TRL passes strings for text prompts and message lists for conversational ones."""
    if isinstance(completion, list):
        return "".join(str(message.get("content", "")) for message in completion)
    return completion


def _python_reward(reward, *, allow_code: bool, recipe_dir: Path | None) -> Callable:
    if not allow_code:
        raise UsageError(f"reward {reward.function} is Python code, which runs only with --allow-code",
                         hint="read the function, then pass --allow-code to ftcli train")
    module_name, _, attribute = reward.function.partition(":")
    if recipe_dir is not None and str(recipe_dir) not in sys.path:
        sys.path.insert(0, str(recipe_dir))   # modules beside the recipe, as its data paths are
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"reward {reward.function} cannot be loaded: {exc}",
                         hint="put the module beside the recipe or on PYTHONPATH") from None
    if not callable(function):
        raise UsageError(f"reward {reward.function} is not a function")

    def called(prompts, completions, **kwargs):
        return [float(value) for value in function(prompts=prompts, completions=completions, **kwargs)]

    return called
