"""load_recipe through the real CLI: every kind of mistake, extends, --set, precedence and --explain."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ftcli.errors import RecipeError
from ftcli.recipe.loader import load_recipe, recipe_to_yaml
from ftcli.recipe.schema import METHOD_KINDS

MARK = "# <-"  # marks the line an error must point at

VALID = """\
name: t
model:
  path: org/model
data:
  train: train.jsonl
method:
  kind: lora
  r: 8
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def marked_location(files: dict[Path, str]) -> str:
    """A pattern for `file:line:col: ` where line is the one carrying MARK."""
    for path, text in files.items():
        for number, line in enumerate(text.splitlines(), 1):
            if MARK in line:
                return re.escape(f"{path.resolve()}:{number}:") + r"\d+: "
    raise AssertionError("no marked line")


# (id, recipe text, extra files, --set overrides, dotted key the message must name, text it must contain)
BAD_RECIPES = [
    ("unknown_top_level_key", VALID + "trainer:  # <-\n  lr: 1.0\n", {}, [], "trainer", "did you mean 'training'"),
    ("unknown_section_key", VALID + "training:\n  batchsize: 4  # <-\n", {}, [], "training.batchsize",
     "did you mean 'batch_size'"),
    ("misspelled_method_kind", VALID.replace("kind: lora", "kind: lroa  # <-"), {}, [], "method.kind",
     "did you mean 'lora'"),
    ("r_zero", VALID.replace("r: 8", "r: 0  # <-"), {}, [], "method.r", "greater than 0"),
    ("r_negative", VALID.replace("r: 8", "r: -1  # <-"), {}, [], "method.r", "greater than 0"),
    ("alpha_zero", VALID + "  alpha: 0  # <-\n", {}, [], "method.alpha", "greater than 0"),
    ("dropout_one", VALID + "  dropout: 1.0  # <-\n", {}, [], "method.dropout", "less than 1"),
    ("dropout_negative", VALID + "  dropout: -0.1  # <-\n", {}, [], "method.dropout", "greater than or equal to 0"),
    ("max_steps_negative", VALID + "training:\n  max_steps: -5  # <-\n", {}, [], "training.max_steps",
     "greater than 0"),
    ("lr_negative", VALID + "training:\n  lr: -1  # <-\n", {}, [], "training.lr", "greater than 0"),
    ("lr_not_a_number", VALID + "training:\n  lr: fast  # <-\n", {}, [], "training.lr", "must be a number"),
    ("lr_infinite", VALID + "training:\n  lr: .inf  # <-\n", {}, [], "training.lr", "finite"),
    ("target_modules_empty", VALID + "  target_modules: []  # <-\n", {}, [], "method.target_modules", "non-empty"),
    ("target_modules_plain_string", VALID + "  target_modules: qproj  # <-\n", {}, [], "method.target_modules",
     "all-linear or a list"),
    ("field_of_another_method", VALID.replace("kind: lora", "kind: prefix").replace("r: 8", "r: 8  # <-"), {}, [],
     "method.r", "unknown key"),
    ("duplicate_key", VALID + "  r: 16  # <-\n", {}, [], "method.r", "duplicate key"),
    ("python_tag", VALID + "training:\n  seed: !!python/object/apply:os.system [echo pwned]  # <-\n", {}, [],
     "training.seed", "!!python/object/apply"),
    ("yaml_merge_key", VALID + "training:\n  <<: {seed: 1}  # <-\n", {}, [], "training", "merge keys"),
    ("yaml_syntax_error", VALID + "training:\n seed: 1\n  lr: 0.1  # <-\n", {}, [], None, "invalid YAML"),
    ("max_steps_and_epochs", VALID + "training:\n  max_steps: 10\n  epochs: 1  # <-\n", {}, [], "training.epochs",
     "not both"),
    ("eval_and_val_split", VALID.replace("  train: train.jsonl\n", "  train: train.jsonl\n  eval: e.jsonl\n"
                                         "  val_split: 0.1  # <-\n"), {}, [], "data.val_split", "not both"),
    ("quantization_on_lora", VALID + "quantization:  # <-\n  bits: 4\n", {}, [], "quantization", "qlora"),
    ("batch_size_list", VALID + "training:\n  batch_size: [8]  # <-\n", {}, [], "training.batch_size",
     "whole number"),
    ("batch_size_quoted", VALID + "training:\n  batch_size: '8'  # <-\n", {}, [], "training.batch_size",
     "whole number"),
    ("max_steps_fractional", VALID + "training:\n  max_steps: 2.5  # <-\n", {}, [], "training.max_steps",
     "whole number"),
    ("bad_run_name", VALID.replace("name: t", "name: a/b  # <-"), {}, [], "name", "not allowed"),
    ("missing_model_path", VALID.replace("model:\n  path: org/model", "model:  # <-\n  dtype: auto"), {}, [],
     "model.path", "required"),
    ("missing_data", VALID.replace("name: t", "name: t  # <-").replace("data:\n  train: train.jsonl\n", ""), {}, [],
     "data", "required"),
    ("missing_method_kind", VALID.replace("  kind: lora\n", "").replace("method:", "method:  # <-"), {}, [],
     "method", "needs kind"),
    ("section_not_a_mapping", VALID + "training: 5  # <-\n", {}, [], "training", "must be a section"),
    ("model_path_not_text", VALID.replace("path: org/model", "path: 123  # <-"), {}, [], "model.path",
     "must be text"),
    ("bad_data_format", VALID.replace("  train: train.jsonl\n", "  train: train.jsonl\n  format: chatml  # <-\n"),
     {}, [], "data.format", "did you mean 'chat'"),
    ("bool_given_as_string", VALID.replace("  train: train.jsonl\n", "  train: train.jsonl\n  packing: 'true'  # <-\n"),
     {}, [], "data.packing", "true or false"),
    ("yaml11_boolean_word", VALID.replace("  train: train.jsonl\n", "  train: train.jsonl\n  packing: yes  # <-\n"),
     {}, [], "data.packing", "true or false"),
    ("columns_of_another_format", VALID.replace("  train: train.jsonl\n",
                                                "  train: train.jsonl\n  columns: {prompt: q}  # <-\n"),
     {}, [], "data.columns", "does not use"),
    ("unknown_fail_under_metric", VALID + "eval:\n  fail_under:\n    accuracy: 0.5  # <-\n", {}, [],
     "eval.fail_under.accuracy", "exact_match"),
    ("extends_missing_file", "extends: nothere.yaml  # <-\n" + VALID, {}, [], "extends", "does not exist"),
    ("extends_cycle", "extends: other.yaml\n" + VALID, {"other.yaml": "extends: bad.yaml  # <-\n"}, [],
     "extends", "cycle"),
    ("extends_not_a_path", "extends: {a: 1}  # <-\n" + VALID, {}, [], "extends", "path or a list"),
    ("error_in_extended_file", "extends: base.yaml\n" + VALID,
     {"base.yaml": "training:\n  save_steps: 0  # <-\n"}, [], "training.save_steps", "greater than 0"),
    ("set_unknown_key", VALID, {}, ["training.lrr=1"], "training.lrr", "did you mean 'lr'"),
    ("set_unknown_section", VALID, {}, ["trainin.lr=1"], "trainin", "did you mean 'training'"),
    ("set_without_equals", VALID, {}, ["training.lr"], "training.lr", "KEY=VALUE"),
    ("set_bad_value", VALID, {}, ["training.lr=-3"], "training.lr", "greater than 0"),
    ("set_bad_yaml", VALID, {}, ["method.target_modules=[q_proj"], "method.target_modules", "invalid YAML"),
    ("set_into_a_value", VALID, {}, ["model.path.x=1"], "model.path", "not a section"),
    ("set_extends", VALID, {}, ["extends=x.yaml"], "extends", "can't be overridden"),
]
SUBPROCESS_CASES = {"unknown_top_level_key", "python_tag", "extends_cycle", "bool_given_as_string",
                    "set_without_equals", "yaml_syntax_error"}


def test_table_covers_enough_kinds_of_mistake():
    ids = [case[0] for case in BAD_RECIPES]
    assert len(ids) == len(set(ids)) >= 25


@pytest.mark.parametrize("case_id,text,extra_files,overrides,key,needle", BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_is_reported_with_location_and_key(case_id, text, extra_files, overrides, key, needle,
                                                      tmp_path, cli, cli_inproc):
    recipe = write(tmp_path / "bad.yaml", text)
    files = {recipe: text}
    for name, extra in extra_files.items():
        files[write(tmp_path / name, extra)] = extra
    args = ["validate", recipe, *[a for o in overrides for a in ("--set", o)]]
    result = cli(*args) if case_id in SUBPROCESS_CASES else cli_inproc(*args)
    assert result.exit_code == 2, result.output
    message = result.output
    assert needle in message
    if overrides:
        assert f"--set {overrides[0]}" in message
    else:
        assert re.search(marked_location(files), message), message
    if key is not None:
        assert f": {key}: " in message or f": {key}.kind: " in message
    assert "Traceback" not in message


def test_every_mistake_in_a_recipe_is_reported_at_once(tmp_path, cli_inproc):
    recipe = write(tmp_path / "three.yaml", VALID.replace("r: 8", "r: 0") + "  dropuot: 0.1\ntraining:\n  lr: fast\n")
    result = cli_inproc("validate", recipe)
    assert result.exit_code == 2
    assert "3 problems" in result.output
    assert f"{recipe}:8:3: method.r:" in result.output
    assert f"{recipe}:9:3: method.dropuot: unknown key; did you mean 'dropout'?" in result.output
    assert f"{recipe}:11:3: training.lr:" in result.output

    result = cli_inproc("validate", recipe, "--set", "training.sed=1", "--json")
    problems = json.loads(result.stdout)["recipes"][0]["problems"]
    assert len(problems) == 4, problems  # the override's mistake joins the file's three


def test_yaml_level_problems_are_all_reported(tmp_path, cli_inproc):
    recipe = write(tmp_path / "dups.yaml", VALID + "  r: 4\ntraining:\n  seed: 1\n  seed: 2\n  lr: !!binary aGk=\n")
    result = cli_inproc("validate", recipe, "--json")
    assert result.exit_code == 2
    problems = json.loads(result.stdout)["recipes"][0]["problems"]
    assert [p.split(": ")[1] for p in problems] == ["method.r", "training.seed", "training.lr"]


def test_validate_reports_each_recipe_and_fails_if_any_is_bad(tmp_path, cli_inproc):
    good = write(tmp_path / "good.yaml", VALID)
    bad = write(tmp_path / "bad.yaml", VALID.replace("r: 8", "r: 0"))
    result = cli_inproc("validate", good, bad, "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert [r["valid"] for r in report["recipes"]] == [True, False]
    assert cli_inproc("validate", good).exit_code == 0


# ---------------------------------------------------------------------------------------------- extends and --set


def sources(cli_inproc, recipe: Path, *overrides: str) -> tuple[dict, dict]:
    args = [a for o in overrides for a in ("--set", o)]
    result = cli_inproc("recipe", "show", recipe, "--explain", "--json", *args)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    return document["recipe"], document["sources"]


def test_precedence_later_extends_then_file_then_set(tmp_path, cli_inproc):
    write(tmp_path / "a.yaml", "training:\n  lr: 1.0e-3\n  seed: 1\n  batch_size: 2\n  grad_accum: 3\n")
    write(tmp_path / "b.yaml", "training:\n  lr: 2.0e-3\n  seed: 2\n  batch_size: 4\n")
    recipe = write(tmp_path / "r.yaml", "extends: [a.yaml, b.yaml]\n" + VALID + "training:\n  seed: 3\n  lr: 5e-4\n")
    resolved, where = sources(cli_inproc, recipe, "training.lr=1e-4", "training.lr=3e-4")
    training = resolved["training"]
    assert training["grad_accum"] == 3  # only in a.yaml
    assert training["batch_size"] == 4  # b.yaml, the later extends, wins over a.yaml
    assert training["seed"] == 3  # the file wins over what it extends
    assert training["lr"] == 3e-4  # --set wins over the file; the last --set wins
    assert where["training.grad_accum"] == f"{(tmp_path / 'a.yaml').resolve()}:5:3"
    assert where["training.batch_size"] == f"{(tmp_path / 'b.yaml').resolve()}:4:3"
    assert where["training.seed"] == f"{recipe.resolve()}:11:3"
    assert where["training.lr"] == "--set training.lr=3e-4"
    assert where["training.epochs"] == "default"
    assert where["method.kind"] == f"{recipe.resolve()}:8:3"


def test_explain_table_names_sources(tmp_path, cli_inproc, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "r.yaml", VALID)
    result = cli_inproc("recipe", "show", "r.yaml", "--explain", "--set", "training.seed=9")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") == 4}
    assert "r.yaml:8:3" in rows["method.r"]
    assert "--set" in rows["training.seed"]
    assert "default" in rows["training.lr"]


def test_deep_merge_keeps_parent_keys(tmp_path):
    write(tmp_path / "base.yaml", "method:\n  kind: lora\n  r: 4\n  alpha: 64\ndata:\n  max_length: 99\n")
    recipe = write(tmp_path / "r.yaml", "extends: base.yaml\n" + VALID.replace("  r: 8\n", "  dropout: 0.2\n"))
    method = load_recipe(recipe).recipe.method
    assert (method.r, method.alpha, method.dropout) == (4, 64, 0.2)
    assert load_recipe(recipe).recipe.data.max_length == 99


def test_switching_method_kind_replaces_the_method(tmp_path):
    write(tmp_path / "base.yaml", "method:\n  kind: lora\n  r: 4\n  target_modules: [q_proj]\n")
    recipe = write(tmp_path / "r.yaml", "extends: base.yaml\n" + VALID.replace("kind: lora\n  r: 8", "kind: prefix"))
    method = load_recipe(recipe).recipe.method
    assert method.kind == "prefix" and method.num_virtual_tokens == 16

    lora_file = write(tmp_path / "lora.yaml", VALID)
    method = load_recipe(lora_file, ["method.kind=ia3"]).recipe.method
    assert method.kind == "ia3" and method.target_modules is None
    assert load_recipe(lora_file, ["method.kind=lora", "method.r=2"]).recipe.method.r == 2


def test_extends_cycles_are_reported(tmp_path):
    write(tmp_path / "self.yaml", "extends: self.yaml\n")
    with pytest.raises(RecipeError, match=r"self\.yaml:1:1: extends: cycle"):
        load_recipe(tmp_path / "self.yaml")
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: [c.yaml]\n")
    write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(error.value) and "c.yaml -> " in str(error.value)
    # A diamond (two parents sharing a grandparent) is not a cycle.
    write(tmp_path / "common.yaml", "training:\n  seed: 5\n")
    write(tmp_path / "p1.yaml", "extends: common.yaml\n")
    write(tmp_path / "p2.yaml", "extends: common.yaml\n")
    write(tmp_path / "d.yaml", "extends: [p1.yaml, p2.yaml]\n" + VALID)
    assert load_recipe(tmp_path / "d.yaml").recipe.training.seed == 5


def test_relative_paths_resolve_against_the_file_that_names_them(tmp_path, monkeypatch):
    root = tmp_path / "project"
    write(root / "data" / "train.jsonl", "{}\n")
    write(root / "data" / "template.jinja", "{{ x }}")
    write(root / "configs" / "data" / "chat.yaml",
          "data:\n  train: ../../data/train.jsonl\n  chat_template_file: ../../data/template.jinja\n")
    write(root / "configs" / "base.yaml", "extends: data/chat.yaml\nmodel:\n  path: ./models/tiny\n")
    recipe = write(root / "recipes" / "r.yaml", "extends: ../configs/base.yaml\nmethod:\n  kind: lora\n")
    monkeypatch.chdir(tmp_path)  # the working folder must not matter
    loaded = load_recipe(recipe).recipe
    assert loaded.data.train == str(root / "data" / "train.jsonl")
    assert loaded.data.chat_template_file == str(root / "data" / "template.jinja")
    assert loaded.model.path == str(root / "configs" / "models" / "tiny")
    # --set paths are relative to the working folder; hub ids and builtin names are left alone.
    loaded = load_recipe(recipe, ["data.eval=held_out.jsonl", "model.path=builtin:smollm2-135m-instruct"]).recipe
    assert loaded.data.eval == str(tmp_path / "held_out.jsonl")
    assert loaded.model.path == "builtin:smollm2-135m-instruct"
    assert (load_recipe(recipe, ["model.path=HuggingFaceTB/SmolLM2-135M"]).recipe.model.path
            == "HuggingFaceTB/SmolLM2-135M")


def test_yaml_values_are_read_as_written(tmp_path):
    text = VALID.replace("  train: train.jsonl\n", "  train: train.jsonl\n  system_prompt: no\n")
    recipe = write(tmp_path / "r.yaml", text + "training:\n  lr: 1e-4\n  seed: 010\n")
    loaded = load_recipe(recipe).recipe
    assert loaded.training.lr == pytest.approx(1e-4) and isinstance(loaded.training.lr, float)
    assert loaded.training.seed == 10  # YAML 1.2: a leading zero is not octal
    assert loaded.data.system_prompt == "no"  # YAML 1.1 would have read False


def test_set_values_are_parsed_as_yaml(tmp_path):
    recipe = write(tmp_path / "r.yaml", VALID)
    loaded = load_recipe(recipe, ["method.target_modules=[q_proj,v_proj]", "training.lr=1e-4",
                                  "data.packing=true", "eval.max_samples=5", "data.system_prompt=no"]).recipe
    assert loaded.method.target_modules == ["q_proj", "v_proj"]
    assert loaded.training.lr == pytest.approx(1e-4)
    assert loaded.data.packing is True
    assert loaded.eval.max_samples == 5
    assert loaded.data.system_prompt == "no"
    assert load_recipe(recipe, ["data.system_prompt="]).recipe.data.system_prompt == ""


def test_name_comes_from_flag_then_recipe_then_file_stem(tmp_path):
    recipe = write(tmp_path / "my-run.yaml", VALID.replace("name: t\n", ""))
    assert load_recipe(recipe).recipe.name == "my-run"
    assert load_recipe(write(tmp_path / "x.yaml", VALID)).recipe.name == "t"
    assert load_recipe(recipe, name="other").recipe.name == "other"
    with pytest.raises(RecipeError, match="name: in the recipe or pass --name"):
        load_recipe(write(tmp_path / "bad name.yaml", VALID.replace("name: t\n", "")))


def test_missing_or_folder_recipe(tmp_path, cli_inproc):
    result = cli_inproc("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = cli_inproc("validate", tmp_path)
    assert result.exit_code == 2 and "is a folder" in result.output


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 10)]
    lines[0] = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"
    recipe = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match="more than"):
        load_recipe(recipe)


@pytest.mark.parametrize("kind", METHOD_KINDS)
def test_resolved_recipe_yaml_round_trips(kind, tmp_path):
    text = VALID.replace("name: t", "name: '1e5'").replace("kind: lora\n  r: 8", f"kind: {kind}")
    text = text.replace("  train: train.jsonl\n", "  train: train.jsonl\n  system_prompt: 'no'\n")
    text += "training:\n  lr: 1.0e-5\n  seed: 0o17\n"
    original = load_recipe(write(tmp_path / "r.yaml", text)).recipe
    dumped = recipe_to_yaml(original, header="# resolved\n")
    assert dumped.startswith("# resolved\n")
    reloaded = load_recipe(write(tmp_path / "again" / "recipe.yaml", dumped)).recipe
    assert reloaded == original
    assert reloaded.name == "1e5" and reloaded.data.system_prompt == "no"
