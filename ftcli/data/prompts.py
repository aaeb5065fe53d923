"""The data of objective grpo: each example's prompt rendered through the chat template up to the generation prompt,
and its reference answer (the last assistant turn), validated with file and line like every format."""

from __future__ import annotations

from ftcli.data.types import DataReport
from ftcli.errors import DataError
from ftcli.recipe.schema import Recipe


def prompt_limit(recipe: Recipe) -> int:
    """Prompt tokens kept (the prompt's end): data.max_prompt_length, else what max_completion_length leaves of
    data.max_length."""
    return recipe.data.max_prompt_length or recipe.data.max_length - recipe.objective.max_completion_length


def prompt_split(conversations, recipe: Recipe, tokenizer, template: str | None, split: str):
    """(in-memory dataset with `prompt`, the rendered text, and `reference` columns, DataReport): RL sets are small
    next to the generations each prompt costs, so they are read whole, without a cache."""
    from datasets import Dataset

    from ftcli.data.templates import split_for_generation
    from ftcli.data.tokenize import length_stats

    if not conversations:
        raise DataError(f"no {split} prompts", hint="check data.train / data.eval")
    pairs = [split_for_generation(conversation, tokenizer, template) for conversation in conversations]
    lengths = [len(ids) for ids in tokenizer([prompt for prompt, _ in pairs], add_special_tokens=False)["input_ids"]]
    limit = prompt_limit(recipe)
    report = DataReport(examples=len(pairs), rows=len(pairs), truncated=sum(length > limit for length in lengths),
                        total_tokens=sum(min(length, limit) for length in lengths), length_stats=length_stats(lengths))
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "reference": [r for _, r in pairs]}), report
