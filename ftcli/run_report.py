"""`ftcli runs list/show/compare`: summaries of run directories as tables or JSON."""
# CONTRACT (owned by the eval helper; replace the stubs, keep the signatures):

from __future__ import annotations


def runs_summary(root) -> list[dict]:
    raise NotImplementedError


def render_runs_list(rows: list[dict], console) -> None:
    raise NotImplementedError


def run_details(run) -> dict:
    raise NotImplementedError


def render_run(details: dict, console) -> None:
    raise NotImplementedError


def compare_runs(runs: list) -> dict:
    raise NotImplementedError


def render_comparison(comparison: dict, console) -> None:
    raise NotImplementedError
