"""Plain terminal output shared by every command: exact text lines, JSON documents, and failures as exit codes."""

from __future__ import annotations

import json
import math
import sys


def say(text: str, *, stderr: bool = False, end: str = "\n") -> None:
    """Print text exactly as given (rich would also turn text like :ok: into an emoji)."""
    stream = sys.stderr if stderr else sys.stdout
    stream.write(text + end)
    stream.flush()


def print_json(document: object) -> None:
    """One strict JSON document on stdout: a NaN or infinite metric (a diverged loss) becomes null, which every
    parser reads, where Python's default NaN / Infinity tokens break jq and most other JSON parsers."""
    sys.stdout.write(json.dumps(_finite(document), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def report_failure(exc: BaseException, *, json_output: bool) -> int:
    """Print why a command failed and return its documented exit code: an FtcliError's own code with its one
    paragraph, 130 for an interrupt, 4 for a full disk; anything else is a bug in ftcli (exit 1, with the
    traceback). Under --json an error document goes to stdout too, whatever the failure: scripts read one."""
    from ftcli.errors import FtcliError, Interrupted, NotAvailableError

    hint = None
    if isinstance(exc, FtcliError):
        say(f"error: {exc}", stderr=True)
        code, message, hint, kind = exc.exit_code, exc.message, exc.hint, type(exc).__name__
    elif isinstance(exc, KeyboardInterrupt):
        say("interrupted", stderr=True)
        code, message, kind = Interrupted.exit_code, "interrupted", Interrupted.__name__
    else:
        from ftcli.atomic import is_disk_full

        if is_disk_full(exc):
            message, code, kind = f"no space left on device: {exc}", NotAvailableError.exit_code, "DiskFullError"
            say(f"error: {message}", stderr=True)
        else:
            import traceback

            traceback.print_exception(exc)
            message, code, kind = f"unexpected failure (a bug in ftcli): {exc!r}", 1, type(exc).__name__
            say("error: unexpected failure (a bug in ftcli); the traceback is above", stderr=True)
    if json_output:
        print_json({"error": message, "hint": hint, "exit_code": code, "kind": kind})
    return code
