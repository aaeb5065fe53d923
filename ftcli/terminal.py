"""Plain terminal output shared by every command: exact text lines, JSON documents, and failures as exit codes."""

from __future__ import annotations

import json
import sys


def say(text: str, *, stderr: bool = False, end: str = "\n") -> None:
    """Print text exactly as given (rich would also turn text like :ok: into an emoji)."""
    stream = sys.stderr if stderr else sys.stdout
    stream.write(text + end)
    stream.flush()


def print_json(document: object) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def report_failure(exc: BaseException, *, json_output: bool) -> int:
    """Print why a command failed and return its documented exit code: an FtcliError's own code with its one
    paragraph (and, under --json, an error document on stdout), 130 for an interrupt, 4 for a full disk; anything
    else is a bug in ftcli (exit 1, with the traceback)."""
    from ftcli.errors import FtcliError, Interrupted, NotAvailableError

    if isinstance(exc, FtcliError):
        say(f"error: {exc}", stderr=True)
        if json_output:  # scripts reading --json get a document on failure too
            print_json({"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code,
                        "kind": type(exc).__name__})
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        say("interrupted", stderr=True)
        return Interrupted.exit_code
    from ftcli.atomic import is_disk_full

    if is_disk_full(exc):
        say(f"error: no space left on device: {exc}", stderr=True)
        return NotAvailableError.exit_code
    import traceback

    traceback.print_exception(exc)
    say("error: unexpected failure (a bug in ftcli); the traceback is above", stderr=True)
    return 1
