"""The errors ftcli raises on purpose, each kind carrying its documented exit code."""

from __future__ import annotations


class FtcliError(Exception):
    """An expected failure: printed as one clear message, no traceback, with the kind's exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def __reduce__(self):
        # Errors raised in worker processes reach the parent pickled: keep every field (hint, problems ...).
        return _restore_error, (type(self), self.args, dict(self.__dict__))


class UsageError(FtcliError):
    """Bad command-line usage or a bad recipe (exit 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """One or more mistakes in a recipe, all reported at once (exit 2)."""

    def __init__(self, problems: list[str], *, source: str | None = None):
        self.problems = problems
        head = f"{source}: " if source else ""
        count = len(problems)
        title = f"{head}{count} problem{'s' if count != 1 else ''} in recipe"
        super().__init__(title + "\n" + "\n".join(f"  {p}" for p in problems))


class DataError(FtcliError):
    """The training or eval data is missing, malformed or unusable (exit 3)."""

    exit_code = 3


class NotAvailableError(FtcliError):
    """A model, package or file is not available here (exit 4)."""

    exit_code = 4


class RunStateError(FtcliError):
    """A run exists, is locked, is missing or has the wrong status for the command (exit 5)."""

    exit_code = 5


class QualityGateError(FtcliError):
    """A quality gate failed: --fail-under, a merge or export parity check (exit 6)."""

    exit_code = 6


class Interrupted(FtcliError):
    """Stopped by a signal; the run can continue with --resume (exit 130)."""

    exit_code = 130


EXIT_CODES = {
    0: "success",
    1: "unexpected failure (a bug: the traceback is printed)",
    2: "usage or recipe error",
    3: "data error",
    4: "model, package or file not available",
    5: "run-state conflict (exists, locked, not found, wrong status)",
    6: "a quality gate failed (--fail-under, merge or export parity)",
    130: "interrupted; continue with --resume",
}


def _restore_error(cls: type, args: tuple, fields: dict) -> FtcliError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(fields)
    return error
