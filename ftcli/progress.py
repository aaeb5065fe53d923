"""Progress of a long step on the stderr console: a rich bar on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

INTERVAL_ENV = "FTCLI_PROGRESS_INTERVAL"   # seconds between plain progress lines (0: a line at every update)
DEFAULT_INTERVAL_S = 5.0
_LIVE: dict[int, list] = {}                # id(console) -> [its rich Progress, steps using it]: nested steps share it


def interval_s() -> float:
    """Seconds between plain lines: $FTCLI_PROGRESS_INTERVAL, else DEFAULT_INTERVAL_S (also for a bad value)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Bar:
    """One step's progress: advance() as work gets done, update() when counts are known another way, describe()
    for what it is doing now. Made by progress(); does nothing when the step has no console."""

    def __init__(self, console, label: str, total: float | None, unit: str, interval: float, estimate: bool = True):
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.interval, self.estimate = interval, estimate
        self.completed = 0.0
        self.info = ""
        self.started = self._last_line = time.monotonic()
        self.lines = 0              # plain lines printed
        self._rich = None           # (rich Progress, task id) on a terminal

    # -- reporting
    def advance(self, amount: float = 1) -> None:
        self.update(completed=self.completed + amount)

    def update(self, *, completed: float | None = None, total: float | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        self._show()

    def describe(self, info: str) -> None:
        """What the step is doing now, shown after the counts (a stage of a merge, say)."""
        self.info = info
        self._show()

    # -- display
    def rate(self) -> float | None:
        elapsed = time.monotonic() - self.started
        return self.completed / elapsed if self.estimate and elapsed > 0 and self.completed else None

    def text(self, *, final: bool = False) -> str:
        """The plain line: counts, share, rate, elapsed and remaining time."""
        elapsed = time.monotonic() - self.started
        done = f"{self.completed:,.0f}"
        parts = [f"{done}/{self.total:,.0f} {self.unit}" if self.total else f"{done} {self.unit}"]
        if self.total and not final:
            parts[0] += f" ({100 * min(self.completed / self.total, 1):.0f}%)"
        rate = self.rate()
        if rate:
            parts.append(f"{rate:,.1f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s")
        parts.append(("done in " if final else "") + _duration(elapsed))
        if self.total and rate and not final and self.completed < self.total:
            parts.append(f"about {_duration(max(self.total - self.completed, 0) / rate)} left")
        return f"{self.label}: " + ", ".join(parts) + (f" ({self.info})" if self.info and not final else "")

    def _show(self) -> None:
        if self._rich is not None:
            live, task = self._rich
            rate = self.rate()
            live.update(task, completed=self.completed, total=self.total,
                        rate=f"{rate:,.1f} {self.unit}/s" if rate else "", info=self.info)
        elif self.console is not None and time.monotonic() - self._last_line >= self.interval:
            self._line(self.text())

    def _line(self, text: str) -> None:
        from ftcli.console import note

        note(self.console, text)
        self._last_line = time.monotonic()
        self.lines += 1


def _rich_task(console, bar: Bar):
    """(the console's live rich Progress, a task of `bar` on it), shared by nested steps; None when another live
    display (training's own bar) holds the console."""
    from rich.errors import LiveError
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Remaining(TimeRemainingColumn):
        """rich's time left, for the steps that estimate it."""

        def render(self, task):
            return super().render(task) if task.fields["estimate"] else Text("")

    shared = _LIVE.get(id(console))
    if shared is None:
        live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[unit]}  {task.fields[rate]}"), TimeElapsedColumn(), Remaining(),
                        TextColumn("{task.fields[info]}"), console=console)
        try:
            live.start()
        except LiveError:
            return None
        shared = _LIVE[id(console)] = [live, 0]
    shared[1] += 1
    task = shared[0].add_task(bar.label, total=bar.total, unit=bar.unit, rate="", info="", estimate=bar.estimate)
    return shared[0], task


def _release(console) -> None:
    shared = _LIVE.get(id(console))
    if shared is None:
        return
    shared[1] -= 1
    if shared[1] == 0:
        shared[0].stop()
        del _LIVE[id(console)]


@contextlib.contextmanager
def progress(console, label: str, *, total: float | None = None, unit: str = "items", estimate: bool = True
             ) -> Iterator[Bar]:
    """Show the progress of the step inside the block on `console` (ftcli's stderr console; None shows nothing):

        with progress(console, "tokenizing", total=len(rows), unit="examples") as bar:
            for chunk in chunks:
                ...
                bar.advance(len(chunk))

    On a terminal a rich bar (count, rate, elapsed and remaining time; total=None leaves the bar open-ended); else a
    plain line every $FTCLI_PROGRESS_INTERVAL seconds (default 5), and when any was printed, a last one with the
    step's figures. Steps that finish sooner print nothing. estimate=False leaves out the rate and the time left
    (for stages of very different lengths)."""
    bar = Bar(console, label, total, unit, interval_s(), estimate)
    if console is not None and console.is_terminal:
        bar._rich = _rich_task(console, bar)
    finished = False
    try:
        yield bar
        finished = True
    finally:
        if bar._rich is not None:
            live, task = bar._rich
            if finished:   # an open-ended bar ends full
                live.update(task, completed=bar.completed, total=bar.total or bar.completed or 1)
            _release(console)
        elif bar.lines and finished:
            bar._line(bar.text(final=True))
