"""The CLI contract's in-process parts: the plain validate parser and the documented exit codes."""

from __future__ import annotations

import inspect

import pytest

from ftcli import errors


@pytest.mark.parametrize("args, expected", [
    (["a.yaml"], (["a.yaml"], [], False)),
    (["a.yaml", "b.yaml", "--json"], (["a.yaml", "b.yaml"], [], True)),
    (["--set", "x=1", "a.yaml", "--set=y=-2", "--set", "-z"], (["a.yaml"], ["x=1", "y=-2", "-z"], False)),
    ([], None),
    (["--json"], None),
    (["a.yaml", "--help"], None),
    (["a.yaml", "-h"], None),
    (["a.yaml", "--"], None),
    (["a.yaml", "--set"], None),
    (["a.yaml", "--runs-dir", "x"], None),
])
def test_plain_validate_parsing(args, expected):
    from ftcli.cli.validate import parse_plain_validate

    parsed = parse_plain_validate(args)
    if expected is None:
        assert parsed is None
    else:
        assert ([str(p) for p in parsed.recipes], parsed.overrides, parsed.json_output) == expected


def test_exit_codes_are_documented():
    kinds = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.FtcliError)]
    assert len(kinds) >= 7
    for kind in kinds:
        if kind is not errors.FtcliError:
            assert kind.exit_code in errors.EXIT_CODES, kind
    assert {0, 1, 2, 3, 4, 5, 6, 130} <= set(errors.EXIT_CODES)
    assert errors.RecipeError([]).exit_code == errors.UsageError("x").exit_code == 2
    assert errors.RunStateError("x").exit_code == 5
