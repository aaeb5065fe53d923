"""The `ftcli` program: the plain `ftcli validate` form runs without Typer; everything else goes to ftcli.cli.app."""

from __future__ import annotations

import gc
import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["validate"]:
        from ftcli.cli.validate import parse_plain_validate

        plain = parse_plain_validate(args[1:])
        if plain is not None:
            sys.exit(run_validate(plain))
    from ftcli.cli.app import main as typer_main

    typer_main()


def run_validate(plain) -> int:
    """Validate with the collector off: building the recipe models makes ~100k short-lived objects and the
    collector's passes over them were ~7% of the command's time; the process ends right after."""
    gc.disable()
    from ftcli.cli.output import report_failure
    from ftcli.cli.validate import validate_recipes

    try:
        return validate_recipes(plain)
    except (Exception, KeyboardInterrupt) as exc:
        return report_failure(exc, json_output=plain.json_output)
    finally:
        gc.freeze()  # as ftcli.cli.app.main: no final collection over every object at exit
