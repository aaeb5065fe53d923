"""Every shipped recipe validates, and every config fragment parses safely and uses only known keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftcli.recipe.loader import PATH_KEYS, load_recipe, looks_local
from ftcli.recipe.schema import DataSourceConfig
from ftcli.recipe.yamlsource import read_yaml_file

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# Launcher configs (accelerate, deepspeed) are not recipe fragments and follow their tools' own schemas.
LAUNCHER_DIRS = ("accelerate", "deepspeed")
FRAGMENTS = sorted(
    p for p in (REPO / "configs").rglob("*.y*ml")
    if p.suffix in (".yaml", ".yml") and p.relative_to(REPO / "configs").parts[0] not in LAUNCHER_DIRS
)

# The least a recipe needs; a fragment merged over it must validate.
MINIMAL_BASE = """\
model:
  path: org/placeholder
method:
  kind: lora
data:
  train: placeholder.jsonl
"""


def short(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_shipped_files_are_found():
    # The globs above are how the other tests find their files; a moved folder should not pass silently.
    assert (REPO / "recipes").is_dir() and (REPO / "configs").is_dir()


@pytest.mark.parametrize("recipe", RECIPES, ids=short)
def test_recipe_validates(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    loaded = load_recipe(recipe)
    assert loaded.recipe.name
    # Local files a recipe names must ship with it (hub ids and builtin: names are checked at train time).
    for section, key in PATH_KEYS:
        value = getattr(getattr(loaded.recipe, section), key, None)
        for item in [value] if isinstance(value, str | DataSourceConfig) else value or []:
            item = getattr(item, "path", item)   # a data source with its own settings
            if looks_local(item) and not item.startswith(("builtin:", "hf:")):
                assert Path(item).exists(), f"{short(recipe)}: {section}.{key} names {item}, which does not exist"


@pytest.mark.parametrize("recipe", RECIPES, ids=short)
def test_recipe_starts_with_the_command_that_runs_it(recipe):
    first = recipe.read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# ftcli train {short(recipe)}", first


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=short)
def test_fragment_parses_safely_and_uses_known_keys(fragment, tmp_path):
    data, _ = read_yaml_file(fragment)  # the safe loader: no tags, no duplicate keys
    assert isinstance(data, dict) and data, f"{short(fragment)} is not a mapping of recipe sections"
    base = tmp_path / "base.yaml"
    base.write_text(MINIMAL_BASE)
    probe = tmp_path / "probe.yaml"
    probe.write_text(f"extends: [{base}, {fragment}]\n")
    loaded = load_recipe(probe)  # raises RecipeError naming file:line for any unknown key or bad value
    for section in data:
        assert section in type(loaded.recipe).model_fields or section == "extends", section
