"""`ftcli runs list/show/compare`: summaries of run directories as tables or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftcli.errors import FtcliError
from ftcli.recipe.schema import flatten_keys
from ftcli.runs.rundir import EXPORT_DIR

FINAL_METRICS = ("train_loss", "eval_loss")
IDENTITY_KEYS = {"name"}     # differs between any two runs by definition; the table header shows it


def _latest_eval(run) -> dict | None:
    """eval/latest.json, or None when the run was never evaluated (or the file is unreadable)."""
    try:
        return json.loads(run.eval_latest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _resolved_recipe(run) -> tuple[dict | None, str | None]:
    """(the run's resolved recipe as plain data, None) or (None, why it could not be read)."""
    try:
        return run.load_recipe().model_dump(mode="json"), None
    except FtcliError as exc:
        return None, str(exc).splitlines()[0]


def _summary(run) -> dict[str, Any]:
    try:
        info = run.read()
    except FtcliError as exc:
        return {"name": run.name, "status": "unreadable", "error": str(exc)}
    metrics = info.get("metrics") or {}
    return {
        "name": run.name,
        "status": info.get("status"),
        "method": info.get("method"),
        "base_model": (info.get("base_model") or {}).get("reference"),
        "steps": info.get("step"),
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "created_at": info.get("created_at"),
        "path": str(run.path),
    }


def runs_summary(root) -> list[dict]:
    """One row per run under `root`, oldest first; a run with a corrupt run.json is listed as unreadable."""
    from ftcli.runs.rundir import list_runs

    rows = [_summary(run) for run in list_runs(Path(root))]
    return sorted(rows, key=lambda row: (row.get("created_at") or "", row["name"]))


def run_details(run) -> dict:
    """run.json, the resolved recipe and which artifacts exist (adapter, merged, exports, latest eval)."""
    info = run.read()
    recipe, recipe_error = _resolved_recipe(run)
    exports_root = run.path / EXPORT_DIR
    latest = _latest_eval(run)
    return {
        "name": run.name,
        "path": str(run.path),
        "run": info,
        "recipe": recipe,
        "recipe_error": recipe_error,
        "tracking": info.get("tracking") or {},   # where training.report_to's trackers wrote
        "artifacts": {
            "adapter": str(run.adapter_dir) if run.has_adapter() else None,
            "merged": str(run.merged_dir) if run.has_merged_model() else None,
            "exports": {p.name: str(p) for p in sorted(exports_root.iterdir()) if p.is_dir()
                        and not p.name.startswith(".")} if exports_root.is_dir() else {},
            "eval_latest": str(run.eval_latest_path) if latest is not None else None,
        },
        "eval": {"metrics": latest.get("metrics"), "base_metrics": latest.get("base_metrics"),
                 "evaluated_at": latest.get("evaluated_at"), "data": latest.get("data")} if latest else None,
    }


_ABSENT = object()


def compare_runs(runs: list) -> dict:
    """Recipe keys whose values differ between the runs, and their final and latest-eval metrics side by side."""
    names = [run.name for run in runs]
    recipes = [flatten_keys(_resolved_recipe(run)[0] or {}) for run in runs]
    keys = sorted(set().union(*recipes) - IDENTITY_KEYS)
    differences = {}
    for key in keys:
        values = [recipe.get(key, _ABSENT) for recipe in recipes]
        if any(v != values[0] for v in values[1:]):
            # A run whose recipe has no such key (another method's field) is left out of that key's entry.
            differences[key] = {name: v for name, v in zip(names, values) if v is not _ABSENT}
    metrics: dict[str, dict[str, Any]] = {}
    for run in runs:
        info = run.read()
        row = {f"final.{k}": (info.get("metrics") or {}).get(k) for k in FINAL_METRICS}
        row["steps"] = info.get("step")
        row["status"] = info.get("status")
        latest = _latest_eval(run)
        for name, value in ((latest or {}).get("metrics") or {}).items():
            row[f"eval.{name}"] = value
        metrics[run.name] = row
    return {"runs": names, "recipe_differences": differences, "metrics": metrics}


# ---------------------------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    """A metric or a recipe value as table text: floats to 4 significant digits, None as '-'."""
    from rich.markup import escape

    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(value if isinstance(value, str) else json.dumps(value))


def _model_label(reference: str | None) -> str | None:
    """A local model folder by its name (the full path is in --json and runs show); hub ids and builtins as is."""
    return Path(reference).name if reference and reference.startswith(("/", "~", ".")) else reference


def _short_time(stamp: str | None) -> str | None:
    return stamp[:16].replace("T", " ") if stamp else stamp


def render_runs_list(rows: list[dict], console) -> None:
    from rich.table import Table

    if not rows:
        console.print("no runs yet (train one with: ftcli train RECIPE)", markup=False)
        return
    table = Table()
    for title in ("name", "status", "method"):
        table.add_column(title, no_wrap=True)
    table.add_column("base model", overflow="fold", ratio=1)
    for title in ("steps", "train loss", "eval loss"):
        table.add_column(title, justify="right", no_wrap=True)
    table.add_column("created (UTC)", overflow="fold", ratio=1)
    for row in rows:
        cells = [row.get("name"), row.get("status"), row.get("method"), _model_label(row.get("base_model")),
                 row.get("steps"), row.get("train_loss"), row.get("eval_loss")]
        table.add_row(*[_cell(v) for v in cells], _cell(_short_time(row.get("created_at"))))
    console.print(table)


def render_run(details: dict, console) -> None:
    from rich.table import Table

    info = details["run"]
    table = Table(title=f"run {details['name']}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    base = info.get("base_model") or {}
    parent = info.get("parent") or {}
    rows = [("status", info.get("status")), ("path", details["path"]), ("method", info.get("method")),
            ("objective", info.get("objective")), ("base model", base.get("reference")),
            ("started from", parent.get("adapter") and f"{parent['adapter']} (adapter sha256 "
                                                       f"{str(parent.get('fingerprint'))[:12]})"),
            ("created", info.get("created_at")),
            ("finished", info.get("finished_at")), ("steps", info.get("step")), ("error", info.get("error"))]
    rows += [(name, value) for name, value in (info.get("metrics") or {}).items()]
    rows += [(f"artifact {name}", value or "-") for name, value in details["artifacts"].items() if name != "exports"]
    rows += [(f"export {name}", path) for name, path in details["artifacts"]["exports"].items()]
    if details.get("eval"):
        rows += [(f"eval {name}", value) for name, value in (details["eval"]["metrics"] or {}).items()]
    rows += _tracking_rows(details.get("tracking") or {})
    for key, value in rows:
        if value is not None:
            table.add_row(key, _cell(value))
    console.print(table)
    if details.get("recipe_error"):
        console.print(f"recipe: {details['recipe_error']}", markup=False)


def _tracking_rows(tracking: dict) -> list[tuple[str, Any]]:
    """Per tracker, where it wrote (and its run id), and the command that shows it."""
    rows: list[tuple[str, Any]] = []
    for tracker, where in tracking.items():
        target = where.get("run_dir") or where.get("logdir") or where.get("tracking_uri") or where.get("dir")
        if where.get("run_id"):
            target = f"{target} (run {where['run_id']})"
        rows.append((f"tracking {tracker}", target))
        rows.append((f"view {tracker}", where.get("view")))
    return rows


def render_comparison(comparison: dict, console) -> None:
    from rich.table import Table

    names = comparison["runs"]
    differences = Table("recipe key", *names, title="recipe differences")
    for key, values in comparison["recipe_differences"].items():
        differences.add_row(key, *[_cell(values[name]) if name in values else "(absent)" for name in names])
    if comparison["recipe_differences"]:
        console.print(differences)
    else:
        console.print("the runs' recipes are identical", markup=False)
    metrics = Table("metric", *names, title="metrics")
    keys = sorted({k for row in comparison["metrics"].values() for k in row})
    for key in keys:
        metrics.add_row(key, *[_cell(comparison["metrics"][name].get(key)) for name in names])
    console.print(metrics)
