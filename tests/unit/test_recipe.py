"""The recipe schema itself: method union, strict types, run names, JSON Schema, safe YAML reading."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing

import pytest
from pydantic import ValidationError

from ftcli.recipe.schema import (
    METHOD_KINDS,
    DataConfig,
    LoraMethod,
    QuantizationConfig,
    Recipe,
    TrainingConfig,
    check_run_name,
    recipe_json_schema,
)
from ftcli.recipe.yamlsource import YamlProblem, dump_yaml, parse_yaml

BASE = {"model": {"path": "org/model"}, "data": {"train": "train.jsonl"}}


def recipe(method: dict, **sections) -> Recipe:
    return Recipe.model_validate({**BASE, "method": method, **sections})


def method_fields(kind: str) -> set[str]:
    return set(type(Recipe.model_validate({**BASE, "method": {"kind": kind}}).method).model_fields)


def test_method_kinds_match_the_union():
    union = typing.get_args(Recipe.model_fields["method"].annotation)
    kinds = {typing.get_args(cls.model_fields["kind"].annotation)[0] for cls in union}
    assert kinds == set(METHOD_KINDS) == {"lora", "qlora", "dora", "prefix", "prompt", "ia3"}


@pytest.mark.parametrize("kind", METHOD_KINDS)
def test_each_method_accepts_only_its_own_fields(kind):
    own = method_fields(kind)
    foreign = set().union(*(method_fields(k) for k in METHOD_KINDS)) - own
    assert foreign, "every method lacks some other method's field"
    for field in sorted(foreign):
        with pytest.raises(ValidationError) as error:
            recipe({"kind": kind, field: 1})
        assert any(e["type"] == "extra_forbidden" and e["loc"][-1] == field for e in error.value.errors())


def test_method_field_order_puts_kind_first():
    for kind in METHOD_KINDS:
        assert next(iter(recipe({"kind": kind}).method.model_dump())) == "kind"


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", -1), ("alpha", 0), ("alpha", -2.0), ("dropout", 1.0), ("dropout", -0.1),
    ("target_modules", []), ("target_modules", "q_proj"), ("target_modules", ["q_proj", ""]),
])
def test_lora_ranges(field, value):
    with pytest.raises(ValidationError):
        LoraMethod.model_validate({"kind": "lora", field: value})


def test_types_are_strict():
    for section, values in {
        TrainingConfig: [{"batch_size": "8"}, {"batch_size": 8.0}, {"lr": "1e-4"}, {"seed": True},
                         {"lr": float("inf")}, {"lr": float("nan")}, {"group_by_length": "yes"},
                         {"group_by_length": 1}],
        DataConfig: [{"train": "t.jsonl", "packing": "true"}, {"train": 5}],
    }.items():
        for value in values:
            with pytest.raises(ValidationError):
                section.model_validate(value)
    assert TrainingConfig.model_validate({"lr": 1, "epochs": 2}).lr == 1.0  # an int is a fine float


def test_cross_field_rules():
    with pytest.raises(ValidationError, match="not both"):
        TrainingConfig.model_validate({"max_steps": 5, "epochs": 1})
    with pytest.raises(ValidationError, match="not both"):
        DataConfig.model_validate({"train": "a.jsonl", "eval": "b.jsonl", "val_split": 0.1})
    with pytest.raises(ValidationError, match="qlora"):
        recipe({"kind": "lora"}, quantization={"bits": 4})
    with pytest.raises(ValidationError, match="format"):
        DataConfig.model_validate({"train": "a.jsonl", "format": "text", "columns": {"messages": "c"}})
    assert DataConfig.model_validate({"train": "a.jsonl", "format": "text", "columns": {"text": "body"}})


def test_effective_quantization():
    assert recipe({"kind": "lora"}).effective_quantization is None
    assert recipe({"kind": "qlora"}).effective_quantization == QuantizationConfig()
    explicit = recipe({"kind": "qlora"}, quantization={"bits": 8})
    assert explicit.effective_quantization.bits == 8


def test_recipe_is_frozen():
    loaded = recipe({"kind": "lora"})
    with pytest.raises(ValidationError):
        loaded.training = TrainingConfig()


@pytest.mark.parametrize("name", ["a", "run-1", "v1.2_final", "x" * 100, "..a", ".hidden"])
def test_good_run_names(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "a\x00b", "x" * 101, "a b",
                                  "run\n", "ü"])
def test_bad_run_names(name):
    with pytest.raises(ValueError, match="not allowed"):
        check_run_name(name)


# ---------------------------------------------------------------------------------------------- JSON Schema


def walk_properties(node, path=()):
    if isinstance(node, dict):
        for key, prop in node.get("properties", {}).items():
            yield path + (key,), prop
        for key, child in node.items():
            yield from walk_properties(child, path + (key,))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from walk_properties(child, path + (i,))


def walk_refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for child in node.values():
            yield from walk_refs(child)
    elif isinstance(node, list):
        for child in node:
            yield from walk_refs(child)


def test_schema_command_prints_a_described_json_schema(cli_inproc):
    result = cli_inproc("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema == recipe_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    properties = list(walk_properties(schema))
    assert len(properties) > 80
    undescribed = [".".join(map(str, path)) for path, prop in properties if not prop.get("description")]
    assert undescribed == []
    for ref in walk_refs(schema):
        assert ref.startswith("#/$defs/") and ref.split("/")[-1] in schema["$defs"], ref
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name  # unknown keys are errors in editors too
    assert set(schema["properties"]) == set(Recipe.model_fields) | {"extends"}
    assert set(schema["properties"]["method"]["discriminator"]["mapping"]) == set(METHOD_KINDS)


def test_schema_is_valid_against_the_metaschema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = recipe_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate({**BASE, "method": {"kind": "lora", "r": 4}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**BASE, "method": {"kind": "prefix", "r": 4}}, schema)


def test_property_descriptions_are_the_docstrings_under_the_fields():
    schema = recipe_json_schema()
    definitions = schema["$defs"]
    assert definitions["TrainingConfig"]["properties"]["lr"]["description"] == "Peak learning rate."
    assert definitions["LoraMethod"]["properties"]["r"]["description"] == "LoRA rank."  # from the base class
    assert schema["properties"]["data"]["description"] == "Training and evaluation data."  # a section
    assert definitions["LoraMethod"]["description"] == "Low-rank adaptation of the target modules."


def test_every_field_has_a_one_line_description():
    for path, prop in walk_properties(recipe_json_schema()):
        assert "\n" not in prop["description"].strip(), path


# ---------------------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("text,value", [
    ("1e-4", 1e-4), ("2.0e-4", 2e-4), ("-1e3", -1000.0), ("5", 5), ("010", 10), ("0x10", 16), ("1_000", 1000),
    ("no", "no"), ("yes", "yes"), ("on", "on"), ("off", "off"), ("true", True), ("False", False), ("~", None),
    ("null", None), ("2024-01-02", "2024-01-02"), ("1:30", "1:30"), ("'1e-4'", "1e-4"), ("0b11", "0b11"),
])
def test_scalars_follow_yaml_1_2(text, value):
    parsed, _ = parse_yaml(f"key: {text}\n", "t.yaml")
    assert parsed["key"] == value and type(parsed["key"]) is type(value)


def test_locations_of_keys():
    _, locations = parse_yaml("a:\n  b: 1\n  c: [x, y]\n", "t.yaml")
    assert str(locations[("a", "b")]) == "t.yaml:2:3"
    assert str(locations[("a", "c", 1)]) == "t.yaml:3:10"


@pytest.mark.parametrize("text,needle", [
    ("a: !!python/object/apply:os.system [ls]\n", "!!python/object/apply"),
    ("a: !!python/name:os.system\n", "!!python/name"),
    ("a: !custom 1\n", "!custom"),
    ("a: 1\na: 2\n", "duplicate key"),
    ("a: [1\n", "invalid YAML"),
    ("a:\n\t- 1\n", "invalid YAML"),
    ("? [a]\n: 1\n", "plain names"),
])
def test_unsafe_or_ambiguous_yaml_is_refused(text, needle):
    with pytest.raises(YamlProblem, match=re.escape(needle)) as error:
        parse_yaml(text, "t.yaml")
    assert error.value.location.line is not None




def test_python_tag_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(YamlProblem):
        parse_yaml(f"a: !!python/object/apply:os.system ['touch {marker}']\n", "t.yaml")
    assert not marker.exists()


def test_dump_yaml_round_trips_tricky_strings():
    value = {"s": ["no", "yes", "on", "1e5", "010", "0o17", "true", "null", "2024-01-01", "1:30", "~", ""],
             "f": 1e-5, "i": 8, "b": False, "n": None}
    parsed, _ = parse_yaml(dump_yaml(value), "t.yaml")
    assert parsed == value


def test_recipe_modules_import_nothing_heavy():
    code = (
        "import sys, ftcli.recipe.schema, ftcli.recipe.loader, ftcli.runs.rundir, ftcli.atomic, "
        "ftcli.recipe.yamlsource\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'bitsandbytes', 'gguf', 'numpy')"
        " if m in sys.modules]\nprint(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
