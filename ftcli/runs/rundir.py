"""RunDir: the one definition of the run-directory layout, run.json, status and locking."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from ftcli.atomic import STAGING_PREFIX, atomic_write_json, atomic_write_text
from ftcli.errors import NotAvailableError, RunStateError, UsageError
from ftcli.recipe.schema import SCHEMA_VERSION, check_run_name

# The layout: every file and folder name of a run is defined here and nowhere else.
RECIPE_FILE = "recipe.yaml"
RUN_JSON_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
LOCK_FILE = ".lock"
RUN_JSON_LOCK_FILE = ".run.json.lock"  # serialises run.json updates; not LOCK_FILE, which a command holds throughout
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
REJECTED_CHECKPOINTS_DIR = "rejected"  # checkpoints/rejected/: checkpoints --resume could not use, kept, never deleted
EVAL_DIR = "eval"
EVAL_LATEST_FILE = "latest.json"      # eval/latest.json: the newest eval result (eval/<stamp>.json are all)
MERGED_DIR = "merged"
EXPORT_DIR = "export"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_CONFIG_FILE = "adapter_config.json"        # PEFT's own names inside adapter/
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CONFIG_FILE = "config.json"                  # transformers' name in a model folder (merged/, a base)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights that unpickle, and so may run code
CHECKPOINT_COMPLETE_MARKER = "COMPLETE"
TRACKING_DIR = "tracking"              # tracking/: what training.report_to's trackers wrote, unless the env moved them
TENSORBOARD_DIR = "tensorboard"        # tracking/tensorboard/: TensorBoard event files
MLFLOW_DIR = "mlflow"                  # tracking/mlflow/: an MLflow store (MLFLOW_DB_FILE) and its artifacts
MLFLOW_DB_FILE = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "artifacts"
WANDB_DIR = "wandb"                    # tracking/wandb/: W&B's own folder name under the dir it is given
EXPORT_RECORD_FILE = "ftcli-export.json"  # inside every export folder: what it holds; marks it replaceable
FILE_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"  # eval/<stamp>.json: sorts by time, unique to the microsecond, no ':'

STATUSES = ("created", "running", "completed", "failed", "interrupted")
TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "ftcli")


def now_iso() -> str:
    """The current UTC time for run.json and result files, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def now_stamp() -> str:
    """The current UTC time as a file-name stamp (FILE_STAMP_FORMAT)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime(FILE_STAMP_FORMAT)


def validate_run_name(name: str) -> str:
    """Return `name` if it can be a run folder (plain letters, digits, '.', '_', '-'), else raise UsageError."""
    if "\x00" in name:
        raise UsageError("run name contains a NUL character")
    try:
        return check_run_name(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(path: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return None


_RUN_JSON_LOCKS_HELD: dict[str, int] = {}   # run.json lock path -> depth, for this process


class RunDir:
    """A named run folder under the runs root."""

    def __init__(self, root: Path, name: str):
        validate_run_name(name)
        self.runs_root = Path(root)
        self.name = name
        self.path = (self.runs_root / name).resolve()
        if self.path.parent != self.runs_root.resolve():
            raise UsageError(f"run name {name!r} would leave the runs folder {self.runs_root}")
        self._lock_handle = None

    # -- layout
    recipe_path = property(lambda self: self.path / RECIPE_FILE)
    run_json_path = property(lambda self: self.path / RUN_JSON_FILE)
    metrics_path = property(lambda self: self.path / METRICS_FILE)
    loss_plot_path = property(lambda self: self.path / LOSS_PLOT_FILE)
    adapter_dir = property(lambda self: self.path / ADAPTER_DIR)
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS_DIR)
    eval_dir = property(lambda self: self.path / EVAL_DIR)
    eval_latest_path = property(lambda self: self.eval_dir / EVAL_LATEST_FILE)
    merged_dir = property(lambda self: self.path / MERGED_DIR)
    chat_template_path = property(lambda self: self.adapter_dir / CHAT_TEMPLATE_FILE)
    lock_path = property(lambda self: self.path / LOCK_FILE)
    run_json_lock_path = property(lambda self: self.path / RUN_JSON_LOCK_FILE)
    tracking_dir = property(lambda self: self.path / TRACKING_DIR)
    tensorboard_dir = property(lambda self: self.tracking_dir / TENSORBOARD_DIR)
    mlflow_dir = property(lambda self: self.tracking_dir / MLFLOW_DIR)
    mlflow_db_path = property(lambda self: self.mlflow_dir / MLFLOW_DB_FILE)
    mlflow_artifacts_dir = property(lambda self: self.mlflow_dir / MLFLOW_ARTIFACTS_DIR)
    wandb_dir = property(lambda self: self.tracking_dir / WANDB_DIR)   # W&B writes here when given tracking_dir

    def eval_result_path(self, stamp: str) -> Path:
        return self.eval_dir / f"{stamp}.json"

    def export_dir(self, fmt: str) -> Path:
        return self.path / EXPORT_DIR / fmt

    def exists(self) -> bool:
        return self.run_json_path.exists()

    def has_adapter(self) -> bool:
        return (self.adapter_dir / ADAPTER_CONFIG_FILE).exists()

    def has_merged_model(self) -> bool:
        return (self.merged_dir / MODEL_CONFIG_FILE).is_file()

    # -- lifecycle
    @classmethod
    def open(cls, root: Path, name: str) -> RunDir:
        run = cls(root, name)
        if not run.exists():
            known = ", ".join(sorted(r.name for r in list_runs(root))[:10]) or "none"
            raise RunStateError(f"run {name!r} not found in {root} (runs there: {known})",
                                hint="pass --runs-dir or set FTCLI_RUNS_DIR if it lives elsewhere")
        return run

    @classmethod
    def prepare(cls, root: Path, name: str, *, resume: bool, overwrite: bool) -> RunDir:
        """Check that a training run may start here; the caller then locks it and calls initialise()."""
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        run = cls(root, name)
        if run.path.exists() and not run.path.is_dir():
            raise RunStateError(f"{run.path} exists and is not a folder", hint="pick another --name")
        if run.path.exists() and not run.exists():
            foreign = sorted(p.name for p in run.path.iterdir() if not _is_layout_name(p.name))
            if foreign:
                # Never --overwrite a folder ftcli did not make: it would delete someone's files.
                raise RunStateError(f"{run.path} exists and is not an ftcli run (it holds {', '.join(foreign[:5])})",
                                    hint="pick another --name or --runs-dir")
        if run.exists() and not (resume or overwrite):
            raise RunStateError(
                f"run {name!r} already exists ({run.read().get('status')}) at {run.path}",
                hint="continue it with --resume, replace it with --overwrite, or pick another --name",
            )
        if resume and not run.exists():
            raise RunStateError(f"run {name!r} does not exist in {root}; nothing to resume",
                                hint="start it without --resume")
        return run

    def initialise(self, recipe_yaml: str, recipe_file: Path, *, overwrite: bool, extra: dict | None = None) -> None:
        """Write recipe.yaml and run.json for a new (or overwritten) run. Call while holding the lock."""
        if self.exists() and not overwrite:
            # Checked again under the lock: another process may have created the run since prepare().
            raise RunStateError(f"run {self.name!r} already exists at {self.path}",
                                hint="continue it with --resume, replace it with --overwrite, or pick another --name")
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for child in self.path.iterdir():
                if child.name not in (LOCK_FILE, RUN_JSON_LOCK_FILE):  # others may hold or wait on them
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        atomic_write_text(self.recipe_path, recipe_yaml)
        info = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "status": "created",
            "created_at": now_iso(),
            "recipe_file": str(recipe_file),
            "git_commit": git_commit(Path(recipe_file).parent),
            "versions": package_versions(),
        }
        info.update(extra or {})
        with self._run_json_lock():
            atomic_write_json(self.run_json_path, info)

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json_path.read_text())
        except FileNotFoundError:
            raise RunStateError(f"run {self.name!r} has no {RUN_JSON_FILE}") from None
        except json.JSONDecodeError as exc:
            raise RunStateError(f"{self.run_json_path} is corrupt: {exc}") from None

    @contextlib.contextmanager
    def _run_json_lock(self) -> Iterator[None]:
        """Serialise run.json writers across processes (eval beside export, say). Blocking but brief: held for one
        read and one write. A file of its own: flock on a second open of LOCK_FILE would block against the run
        lock this very process may hold. Re-entrant within the process: a signal handler that records a second
        Ctrl-C while the interrupted code holds this lock would otherwise wait on its own process forever."""
        key = str(self.run_json_lock_path)
        if _RUN_JSON_LOCKS_HELD.get(key):
            _RUN_JSON_LOCKS_HELD[key] += 1
            try:
                yield
            finally:
                _RUN_JSON_LOCKS_HELD[key] -= 1
            return
        try:
            handle = open(self.run_json_lock_path, "a")
        except FileNotFoundError:  # no run folder
            raise RunStateError(f"run {self.name!r} has no {RUN_JSON_FILE}") from None
        with handle:  # closing releases the lock, as does the kernel on kill -9
            fcntl.flock(handle, fcntl.LOCK_EX)
            _RUN_JSON_LOCKS_HELD[key] = 1
            try:
                yield
            finally:
                _RUN_JSON_LOCKS_HELD.pop(key, None)

    def modify(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply `change` (it edits the dict in place) to run.json's current content, all under the run.json lock,
        and return the new content. Use it for any change computed from what run.json holds: a read() then an
        update() outside it loses what another process wrote in between."""
        with self._run_json_lock():
            info = self.read()
            change(info)
            info["updated_at"] = now_iso()
            atomic_write_json(self.run_json_path, info)
        return info

    def update(self, **fields: Any) -> dict[str, Any]:
        """Set top-level fields of run.json, keeping everything else it holds at the time of writing."""
        return self.modify(lambda info: info.update(fields))

    def set_status(self, status: str, **fields: Any) -> dict[str, Any]:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r} (one of {', '.join(STATUSES)})")
        return self.update(status=status, **fields)

    def require_status(self, *allowed: str, action: str) -> dict[str, Any]:
        info = self.read()
        status = info.get("status")
        if status not in allowed:
            advice = {
                "running": "wait for it to finish",
                "interrupted": f"finish it with: ftcli train {info.get('recipe_file', 'RECIPE')} --resume",
                "failed": f"see the reason in run.json ({info.get('error', 'no reason recorded')}), "
                          "fix it and train again",
                "created": "train it first",
            }.get(status, "train it first")
            raise RunStateError(f"can't {action} run {self.name!r}: its status is {status}", hint=advice)
        return info

    def require_adapter(self, action: str) -> None:
        """A completed run with a safetensors adapter; pickle-only adapter weights are refused, never unpickled."""
        self.require_status("completed", action=action)
        if not self.has_adapter():
            raise RunStateError(f"run {self.name!r} has no adapter in {self.adapter_dir}",
                                hint="train it again with --overwrite")
        if not (self.adapter_dir / ADAPTER_WEIGHTS_FILE).exists():
            pickles = sorted(p.name for p in self.adapter_dir.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
            if pickles:
                raise NotAvailableError(
                    f"run {self.name!r}: the adapter weights are pickle files only ({', '.join(pickles)}); ftcli "
                    "loads safetensors only, because loading a pickle file can run arbitrary code",
                    hint=f"convert them to {ADAPTER_WEIGHTS_FILE} in an environment you trust",
                )
            raise RunStateError(f"run {self.name!r} has no {ADAPTER_WEIGHTS_FILE} in {self.adapter_dir}",
                                hint="train it again with --overwrite")

    def load_recipe(self):
        from ftcli.recipe.loader import load_recipe

        return load_recipe(self.recipe_path, name=self.name).recipe

    # -- locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold an exclusive lock on the run; released by the kernel even on kill -9."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunStateError(f"run {self.name!r} is in use by another ftcli process (pid {holder})",
                                hint="wait for it to finish or stop that process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield self
        finally:
            with contextlib.suppress(OSError):
                handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line in a single write: a crash can cut only the last line, which read_metrics skips."""
        line = (json.dumps(record, default=str) + "\n").encode("utf-8")
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows


def _is_layout_name(name: str) -> bool:
    """True for the names ftcli itself writes in a run folder (a run left half-initialised holds only these)."""
    layout = {RECIPE_FILE, RUN_JSON_FILE, METRICS_FILE, LOSS_PLOT_FILE, LOCK_FILE, RUN_JSON_LOCK_FILE, ADAPTER_DIR,
              CHECKPOINTS_DIR, EVAL_DIR, MERGED_DIR, EXPORT_DIR, TRACKING_DIR}
    return name in layout or name.startswith(STAGING_PREFIX)


def list_runs(root: Path) -> list[RunDir]:
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for child in sorted(root.iterdir()):
        with contextlib.suppress(UsageError):
            run = RunDir(root, child.name)
            if run.exists():
                runs.append(run)
    return runs
