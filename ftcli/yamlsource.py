"""Safe YAML reading that keeps the file, line and column of every key and rejects ambiguous input."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file position, or a command-line override."""

    source: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


Path_ = tuple  # a key path: ("method", "r") or ("data", "train", 0)


class YamlProblem(Exception):
    def __init__(self, location: Location, message: str):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (`no` stays a string) and `1e-4` read as a float."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

_STANDARD_TAGS = {
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")
}


def _location(source: str, node: yaml.Node) -> Location:
    return Location(source, node.start_mark.line + 1, node.start_mark.column + 1)


def _build(node: yaml.Node, path: tuple, source: str, loader: _RecipeLoader, locations: dict) -> Any:
    locations[path] = _location(source, node)
    if node.tag not in _STANDARD_TAGS:
        raise YamlProblem(_location(source, node), f"tag {node.tag!r} is not allowed in a recipe (only plain YAML values)")
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        first_seen: dict[str, Location] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlProblem(_location(source, key_node), "YAML merge keys (<<) are not supported; use extends:")
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlProblem(_location(source, key_node), "keys must be plain names")
            key = str(key_node.value)
            key_location = _location(source, key_node)
            if key in result:
                raise YamlProblem(key_location, f"duplicate key {key!r} (first given at line {first_seen[key].line})")
            first_seen[key] = key_location
            result[key] = _build(value_node, path + (key,), source, loader, locations)
            locations[path + (key,)] = key_location
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), source, loader, locations) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, Location]]:
    """Parse one YAML document; return the value and the location of every key path in it."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        locations: dict[tuple, Location] = {}
        if node is None:
            return None, locations
        return _build(node, (), source, loader, locations), locations
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        raise YamlProblem(where, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(Location(source), f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> tuple[Any, dict[tuple, Location]]:
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise YamlProblem(Location(str(path)), "is a folder, not a recipe file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise YamlProblem(Location(str(path), line, 1), "the file is not valid UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml_value(text: str, source: str) -> Any:
    """Parse the value of a --set override with the same rules as a recipe file."""
    value, _ = parse_yaml(text, source)
    return "" if value is None and text.strip() not in ("null", "~") else value


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
