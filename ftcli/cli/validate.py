"""`ftcli validate`: check recipe files without loading any model, and its argument parsing without Typer.

Validating is the one command people run in loops and pre-commit hooks, so its plain form
(`ftcli validate FILE... [--set KEY=VALUE]... [--json]`) is parsed here and never imports Typer; every other form
(--help, an unknown option, no file) goes to the Typer command, which calls the same `validate_recipes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ValidateArgs:
    recipes: list[Path]
    overrides: list[str] = field(default_factory=list)
    json_output: bool = False


def parse_plain_validate(args: list[str]) -> ValidateArgs | None:
    """The arguments after `validate` when they are only files, --set KEY=VALUE and --json (as Typer would read
    them); None for anything else, which the Typer command then handles (help, usage errors)."""
    parsed = ValidateArgs(recipes=[])
    tokens = iter(args)
    for token in tokens:
        if token == "--json":
            parsed.json_output = True
        elif token == "--set":
            value = next(tokens, None)
            if value is None:
                return None  # Typer says the option needs an argument
            parsed.overrides.append(value)
        elif token.startswith("--set="):
            parsed.overrides.append(token[len("--set="):])
        elif token.startswith("-"):
            return None
        else:
            parsed.recipes.append(Path(token))
    return parsed if parsed.recipes else None


def validate_recipes(args: ValidateArgs) -> int:
    """Check each recipe with the overrides; print one line per recipe (or one JSON document); 0 or 2."""
    from ftcli.cli.output import print_json, say
    from ftcli.errors import RecipeError
    from ftcli.recipe.loader import load_recipe

    results, failed = [], False
    for path in args.recipes:
        try:
            loaded = load_recipe(path, args.overrides)
            results.append({"recipe": str(path), "valid": True, "name": loaded.recipe.name,
                            "method": loaded.recipe.method.kind})
            if not args.json_output:
                say(f"ok: {path} (run {loaded.recipe.name}, method {loaded.recipe.method.kind})")
        except RecipeError as exc:
            failed = True
            results.append({"recipe": str(path), "valid": False, "problems": exc.problems})
            if not args.json_output:
                say(f"error: {exc}", stderr=True)
    if args.json_output:
        print_json({"valid": not failed, "recipes": results})
    return RecipeError.exit_code if failed else 0
