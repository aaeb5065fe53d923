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


class YamlProblem(Exception):
    """A file that is not a plain, unambiguous YAML mapping; `problems` lists every (location, message) found."""

    def __init__(self, location: Location, message: str, problems: list[tuple[Location, str]] | None = None):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message
        self.problems = problems or [(location, message)]

    def lines(self) -> list[str]:
        return [f"{where}: {message}" for where, message in self.problems]


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars: `no` stays a string, `1e-4` is a float, `010` is ten, no dates."""


_REPLACED_TAGS = {"tag:yaml.org,2002:" + t for t in ("bool", "int", "float", "timestamp")}
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"), list("-+0123456789")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text, 10)  # a leading zero is still decimal in YAML 1.2 (PyYAML's 1.1 reads 010 as eight)


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

# Aliases expand into copies; this bound stops a "billion laughs" file from exhausting memory.
MAX_NODES = 100_000

_STANDARD_TAGS = {
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")
}


class _Builder:
    """Turns a composed YAML node tree into plain values, noting each key's location and every problem."""

    def __init__(self, loader: _RecipeLoader, source: str):
        self.loader = loader
        self.source = source
        self.locations: dict[tuple, Location] = {}
        self.problems: list[tuple[Location, str]] = []
        self.nodes = 0

    def where(self, node: yaml.Node) -> Location:
        return Location(self.source, node.start_mark.line + 1, node.start_mark.column + 1)

    def build(self, node: yaml.Node, path: tuple) -> Any:
        self.locations[path] = self.where(node)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise YamlProblem(self.where(node), f"the recipe expands to more than {MAX_NODES} values (aliases?)")
        if node.tag not in _STANDARD_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problems.append(
                (self.where(node),
                 f"{format_path(path)}: tag {tag} is not allowed in a recipe (only plain YAML values)")
            )
            return None
        if isinstance(node, yaml.MappingNode):
            return self.build_mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)

    def build_mapping(self, node: yaml.MappingNode, path: tuple) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, Location] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problems.append(
                    (self.where(key_node), f"{format_path(path)}: YAML merge keys (<<) are not supported; use extends:")
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append((self.where(key_node), f"{format_path(path)}: keys must be plain names"))
                continue
            key = str(key_node.value)
            key_location = self.where(key_node)
            if key in result:
                self.problems.append((
                    key_location,
                    f"{format_path(path + (key,))}: duplicate key (first given at line {first_seen[key].line})",
                ))
                continue
            first_seen[key] = key_location
            result[key] = self.build(value_node, path + (key,))
            self.locations[path + (key,)] = key_location
        return result


def parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, Location]]:
    """Parse one YAML document; return the value and the location of every key path in it."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        builder = _Builder(loader, source)
        value = builder.build(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        raise YamlProblem(where, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlProblem(Location(source), f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if builder.problems:
        first_where, first_message = builder.problems[0]
        raise YamlProblem(first_where, first_message, builder.problems)
    return value, builder.locations


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


class _RecipeDumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 readers or ftcli's own reading would take for another type."""


for _first, _resolvers in _RecipeLoader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        _RecipeDumper.add_implicit_resolver(_tag, _regexp, [_first])


def dump_yaml(value: Any) -> str:
    """Plain YAML (keys in their given order) that parse_yaml reads back to an equal value."""
    return yaml.dump(value, Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True)


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
