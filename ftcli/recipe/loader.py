"""load_recipe(): YAML files, `extends`, `--set` overrides and validation, with errors that point at the line."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from ftcli.errors import RecipeError
from ftcli.paths import is_local_path
from ftcli.recipe.schema import (
    LORA_ONLY_KNOBS,
    DataConfig,
    DataSourceConfig,
    DoraMethod,
    DpoObjective,
    GrpoObjective,
    Ia3Method,
    KtoObjective,
    LoraMethod,
    OrpoObjective,
    PrefixMethod,
    PromptMethod,
    QloraMethod,
    Recipe,
    RewardConfig,
    SftObjective,
    SimpoObjective,
    check_run_name,
)
from ftcli.recipe.yamlsource import (
    Location,
    YamlProblem,
    dump_yaml,
    format_path,
    parse_yaml_value,
    read_yaml_file,
)

METHOD_CLASSES: dict[str, type[BaseModel]] = {
    "lora": LoraMethod,
    "dora": DoraMethod,
    "qlora": QloraMethod,
    "prefix": PrefixMethod,
    "prompt": PromptMethod,
    "ia3": Ia3Method,
}
# Values that name files: a relative path means "relative to the recipe file that wrote it".
PATH_KEYS = {("model", "path"), ("model", "adapter"), ("data", "train"), ("data", "eval"),
             ("data", "chat_template_file"), ("eval", "tasks")}   # eval.tasks: task YAML files among task names


@dataclass
class LoadedRecipe:
    """A validated recipe with its merged raw data and where each value came from."""

    recipe: Recipe
    source: Path
    data: dict[str, Any]
    locations: dict[tuple, Location] = field(default_factory=dict)

    def explain(self) -> list[tuple[str, Any, str]]:
        """Every leaf value of the resolved recipe with the file position or override that set it."""
        rows: list[tuple[str, Any, str]] = []
        resolved = self.recipe.model_dump(mode="json")

        def walk(value: Any, path: tuple) -> None:
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    walk(item, path + (key,))
                return
            where = self.locations.get(path)
            rows.append((format_path(path), value, _display(where) if where else "default"))

        walk(resolved, ())
        return rows


def _display(where: Location) -> str:
    """A location with its file shown relative to the working folder when it lies inside it (shorter tables)."""
    source = where.source
    if os.path.isabs(source):
        relative = os.path.relpath(source)
        if not relative.startswith(".."):
            source = relative
    return str(Location(source, where.line, where.column))


# The name tests/unit/test_shipped_configs.py imports; the rule itself is ftcli.paths.is_local_path.
looks_local = is_local_path


def _resolve_path_value(value: Any, base_dir: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_path_value(v, base_dir) for v in value]
    if isinstance(value, dict) and "path" in value:   # a data source with its own settings
        return {**value, "path": _resolve_path_value(value["path"], base_dir)}
    if not isinstance(value, str) or not value:
        return value
    if is_local_path(value, base_dir):
        return str((base_dir / os.path.expanduser(value)).resolve())
    return value  # a hub id or builtin name


def _resolve_paths(data: dict, base_dir: Path) -> None:
    for section, key in PATH_KEYS:
        block = data.get(section)
        if isinstance(block, dict) and key in block:
            block[key] = _resolve_path_value(block[key], base_dir)


def _deep_merge(base: Any, override: Any, path: tuple, base_loc: dict, over_loc: dict) -> Any:
    """Merge `override` into `base` (dicts recursively, anything else replaced); locations follow the values."""
    if isinstance(base, dict) and isinstance(override, dict):
        # Switching method.kind replaces the whole method: fields of one method mean nothing to another.
        if path == ("method",) and "kind" in override and override.get("kind") != base.get("kind"):
            _drop_locations(base_loc, path)
            base_loc.update({p: at for p, at in over_loc.items() if p[: len(path)] == path})
            return override
        merged = dict(base)
        for key, value in override.items():
            child = path + (key,)
            if key in merged:
                merged[key] = _deep_merge(merged[key], value, child, base_loc, over_loc)
            else:
                merged[key] = value
                base_loc.update({p: at for p, at in over_loc.items() if p[: len(child)] == child})
        if path in over_loc:
            base_loc.setdefault(path, over_loc[path])
        return merged
    _drop_locations(base_loc, path)
    base_loc.update({p: at for p, at in over_loc.items() if p[: len(path)] == path})
    return override


def _drop_locations(locations: dict, prefix: tuple) -> None:
    for p in [p for p in locations if p[: len(prefix)] == prefix and p != ()]:
        del locations[p]


def _load_file(path: Path, stack: tuple[tuple[Path, Location], ...]) -> tuple[dict, dict]:
    """Read one recipe file and the files it extends; `stack` holds the files (and extends: lines) above it."""
    path = path.resolve()
    if path in [p for p, _ in stack]:
        cycle = " -> ".join(str(p) for p in (*(p for p, _ in stack), path))
        raise RecipeError([f"{stack[-1][1]}: extends: cycle {cycle}"], source=str(stack[0][0]))
    if not path.is_file():
        where = f"{stack[-1][1]}: extends" if stack else "command line"
        what = "is a folder, not a recipe file" if path.is_dir() else "does not exist"
        raise RecipeError([f"{where}: recipe file {path} {what}"], source=str(stack[0][0]) if stack else None)
    try:
        data, locations = read_yaml_file(path)
    except YamlProblem as exc:
        raise RecipeError(exc.lines(), source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}:1:1: a recipe must be a mapping of sections (model, method, data, ...)"],
                          source=str(path))
    locations.setdefault((), Location(str(path), 1, 1))
    extends = data.pop("extends", None)
    extends_at = locations.pop(("extends",), Location(str(path), 1, 1))
    _resolve_paths(data, path.parent)
    if extends is None:
        return data, locations
    parents = [extends] if isinstance(extends, str) else extends
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise RecipeError([f"{extends_at}: extends: must be a path or a list of paths (got {extends!r})"],
                          source=str(path))
    merged: dict = {}
    merged_loc: dict = {}
    for parent in parents:
        parent_path = (path.parent / os.path.expanduser(parent)).resolve()
        parent_data, parent_loc = _load_file(parent_path, (*stack, (path, extends_at)))
        merged = _deep_merge(merged, parent_data, (), merged_loc, parent_loc)
    merged = _deep_merge(merged, data, (), merged_loc, locations)
    merged_loc[()] = locations[()]  # problems with no line of their own point at this file, not a parent
    return merged, merged_loc


def parse_override(text: str) -> tuple[tuple[str, ...], Any, Location]:
    where = Location(f"--set {text}")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError([f"{where}: {key or '(no key)'}: expected KEY=VALUE with a dotted key, "
                           "e.g. --set training.lr=1e-4"])
    try:
        value = parse_yaml_value(raw, where.source)
    except YamlProblem as exc:
        raise RecipeError([f"{where}: {key}: {exc.message}"]) from None
    return tuple(key.split(".")), value, where


def _apply_override(data: dict, locations: dict, key: tuple[str, ...], value: Any, where: Location) -> None:
    if key[0] == "extends":
        raise RecipeError([f"{where}: extends: can't be overridden; write a recipe that extends the others"])
    target = data
    for i, part in enumerate(key[:-1]):
        node = target.get(part)
        if node is None:
            node = target[part] = {}
            locations[key[: i + 1]] = where
        if not isinstance(node, dict):
            raise RecipeError(
                [f"{where}: {'.'.join(key[: i + 1])}: is a value, not a section, so it has no key {key[i + 1]!r}"]
            )
        target = node
    if key in PATH_KEYS:
        value = _resolve_path_value(value, Path.cwd())
    old = target.get(key[-1])
    if key == ("method", "kind") and old is not None and old != value:
        # Changing the method keeps only kind: other fields belong to the old method.
        target.clear()
        _drop_locations(locations, ("method",))
    elif isinstance(old, dict) and isinstance(value, dict):
        value = _deep_merge(old, value, key, locations, {key: where})
    _drop_locations(locations, key)
    target[key[-1]] = value
    locations[key] = where
    if isinstance(value, dict):
        for sub in value:
            locations[key + (sub,)] = where


def load_recipe(path: str | Path, overrides: list[str] = (), *, name: str | None = None) -> LoadedRecipe:
    """Read, merge and validate a recipe; raise RecipeError listing every problem with its location."""
    source = Path(path)
    data, locations = _load_file(source, ())
    problems: list[str] = []
    for text in overrides:
        try:
            key, value, where = parse_override(text)
            _apply_override(data, locations, key, value, where)
        except RecipeError as exc:
            problems.extend(exc.problems)
    if name is not None:
        data["name"] = name
        locations[("name",)] = Location("--name")
    elif "name" not in data:
        try:
            check_run_name(source.stem)
            data["name"] = source.stem
            locations[("name",)] = Location(f"{source} (file name)")
        except ValueError as exc:
            problems.append(f"{source.resolve()}: {exc}; set name: in the recipe or pass --name")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems.extend(describe_validation_errors(exc, data, locations, source))
    if problems:
        raise RecipeError(problems, source=str(source))
    return LoadedRecipe(recipe=recipe, source=source.resolve(), data=data, locations=locations)


def recipe_to_yaml(recipe: Recipe, header: str = "") -> str:
    """The resolved recipe as YAML that load_recipe reads back into an equal Recipe (e.g. a run's recipe.yaml)."""
    return header + dump_yaml(recipe.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------- error text


# The tags of a data source's shapes and of the objectives in error locations, not keys of the recipe.
SOURCE_TAGS = ("source",)
OBJECTIVE_CLASSES: dict[str, type[BaseModel]] = {
    "sft": SftObjective, "dpo": DpoObjective, "kto": KtoObjective, "orpo": OrpoObjective, "simpo": SimpoObjective,
    "grpo": GrpoObjective}
REWARD_CLASSES: dict[str, type[BaseModel]] = {cls.model_fields["kind"].annotation.__args__[0]: cls
                                              for cls in get_args(get_args(RewardConfig)[0])}


def _data_path(loc: tuple, data: Any) -> tuple:
    """Map a pydantic error location onto the recipe's key path, dropping union and tag markers."""
    path: tuple = ()
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path += (part,)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            path += (part,)
            node = node[part]
        elif (isinstance(node, dict) and isinstance(part, str) and part not in METHOD_CLASSES
              and part not in SOURCE_TAGS and part not in OBJECTIVE_CLASSES and part not in REWARD_CLASSES
              and "[" not in part):
            path += (part,)  # a missing key
            node = None
    return path


def _section_class(path: tuple, data: dict) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = Recipe
    node: Any = data
    for part in path:
        if cls is None:
            return None
        if isinstance(part, int):   # an item of a list: of data sources, or of rewards (by their kind)
            if cls is GrpoObjective and isinstance(node, list) and part < len(node):
                item = node[part]
                cls = REWARD_CLASSES.get(item.get("kind")) if isinstance(item, dict) else None
                node = item
            continue
        if cls is GrpoObjective and part == "rewards":
            node = node.get("rewards") if isinstance(node, dict) else None
            continue
        if cls is DataConfig and part in ("train", "eval"):
            cls, node = DataSourceConfig, None
            continue
        if part == "objective" and cls is Recipe:
            objective = node.get("objective") if isinstance(node, dict) else None
            cls = OBJECTIVE_CLASSES.get(objective.get("kind") if isinstance(objective, dict) else objective)
            node = objective
            continue
        if part == "method" and cls is Recipe:
            kind = node.get("method", {}).get("kind") if isinstance(node, dict) else None
            cls = METHOD_CLASSES.get(kind)
            node = node.get("method") if isinstance(node, dict) else None
            continue
        info = cls.model_fields.get(part)
        if info is None:
            return None
        cls = None
        for candidate in (info.annotation, *get_args(info.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                cls = candidate
        node = node.get(part) if isinstance(node, dict) else None
    return cls


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _line_order(problem: str) -> tuple:
    parts = problem.split(":")
    numbers = [int(p) for p in parts[1:3] if p.isdigit()]
    return (parts[0].startswith("--set"), parts[0], *(numbers or [0, 0]))


# pydantic's wording for type errors, said the way a recipe author thinks about it.
TYPE_MESSAGES = {
    "bool_type": "must be true or false (unquoted)",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "string_type": "must be text",
    "list_type": "must be a list, e.g. [a, b]",
    "dict_type": "must be a mapping of keys",
    "model_type": "must be a section: a mapping of keys, indented below it",
    "model_attributes_type": "must be a section: a mapping of keys, indented below it",
    "finite_number": "must be a finite number",
}


def describe_validation_errors(exc: ValidationError, data: dict, locations: dict, source: Path) -> list[str]:
    """One line per problem: `file:line:col: dotted.key: what is wrong`, sorted by file and line."""
    problems = []
    for error in exc.errors(include_url=False):
        kind = error["type"]
        ctx = error.get("ctx") or {}
        path = _data_path(tuple(error["loc"]), data)
        if kind == "conflict":
            path += tuple(int(part) if part.isdigit() else part for part in ctx["key"].split("."))
        elif kind == "union_tag_invalid":
            path += ("kind",)
        key = format_path(path)
        where = locations.get(path)
        parent = path
        while where is None and parent:
            parent = parent[:-1]
            where = locations.get(parent)
        where = where or Location(str(source.resolve()), 1, 1)
        if kind == "extra_forbidden":
            cls = _section_class(path[:-1], data)
            options = list(cls.model_fields) if cls else []
            if cls is Recipe:
                options.append("extends")
            hint = _suggest(str(path[-1]), options)
            allowed = f" (allowed: {', '.join(o for o in options if o != 'kind')})" if options and not hint else ""
            if path[:1] == ("method",) and len(path) == 2 and path[1] in LORA_ONLY_KNOBS:
                kind = data["method"].get("kind")
                hint, allowed = f": {LORA_ONLY_KNOBS[path[1]]}, and method {kind} trains none", \
                    " (use method.kind lora, qlora or dora)"
            problems.append(f"{where}: {key}: unknown key{hint}{allowed}")
        elif kind == "missing":
            problems.append(f"{where}: {key}: required key is missing")
        elif kind == "union_tag_invalid":
            given = ctx.get("tag", "")
            problems.append(
                f"{where}: {key}: {given!r} is not a method{_suggest(str(given), list(METHOD_CLASSES))} "
                f"(choose one of: {', '.join(METHOD_CLASSES)})"
            )
        elif kind == "union_tag_not_found":
            problems.append(f"{where}: {key}: needs kind: (one of {', '.join(METHOD_CLASSES)})")
        elif kind == "conflict":
            problems.append(f"{where}: {key}: {error['msg']}")
        else:
            message = TYPE_MESSAGES.get(kind) or error["msg"].removeprefix("Value error, ")
            message = message.replace("Input should be", "must be")
            if kind == "literal_error":
                options = [o.strip(" '") for o in ctx.get("expected", "").replace(" or ", ",").split(",")]
                message += _suggest(str(error.get("input")), options)
            shown = "" if kind.startswith("value_error") else f" (got {error.get('input')!r})"
            problems.append(f"{where}: {key}: {message}{shown}")
    # A bad value inside a union is reported once per union branch; keep one line for each.
    seen, unique = set(), []
    for problem in sorted(problems, key=_line_order):
        head = problem.split(": ")[0:2]
        if tuple(head) in seen and "unknown key" not in problem:
            continue
        seen.add(tuple(head))
        unique.append(problem)
    return unique
