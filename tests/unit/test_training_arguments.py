"""Recipe settings that pass straight to the trainer's arguments arrive there (those with no effect to observe in a
short CPU run)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ftcli.recipe.loader import load_recipe
from ftcli.runs.rundir import RunDir
from ftcli.training.session import TrainingSession


def _arguments(recipe_path: Path, tmp_path: Path, *overrides: str):
    recipe = load_recipe(recipe_path, list(overrides)).recipe
    session = TrainingSession(recipe, RunDir(tmp_path / "runs", "args"), trust_remote_code=False, console=None)
    # What prepare() resolves, without loading the model and data
    session.prepared = SimpleNamespace(eval=None)
    session.strategy_arguments, session.precision, session.gradient_checkpointing = {}, "fp32", False
    session.device = "cpu"
    return session.training_arguments()


@pytest.mark.parametrize("compile_model", [False, True])
def test_torch_compile_reaches_the_trainer(tiny_recipe, tmp_path, compile_model):
    args = _arguments(tiny_recipe, tmp_path, f"training.torch_compile={str(compile_model).lower()}")
    assert args.torch_compile is compile_model
    if compile_model:
        assert args.torch_compile_backend == "inductor"   # transformers' default once compile is on
