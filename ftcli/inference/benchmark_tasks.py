"""lm-evaluation-harness tasks for `ftcli eval --tasks`, loaded before any model: registry names and task YAML files,
with what goes wrong (a missing file, a typo, hub data out of reach offline, broken data) said in ftcli's terms."""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ftcli.errors import DataError, NotAvailableError, UsageError

INSTALL_HINT = "pip install 'ftcli[benchmarks]'   (or: pip install lm_eval)"
TASK_FILE_SUFFIXES = (".yaml", ".yml")
# Datasets builders that read local files (dataset_path: json + data_files), not a hub dataset.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


def is_task_file(spec: str) -> bool:
    return spec.lower().endswith(TASK_FILE_SUFFIXES) or os.sep in spec or Path(spec).is_file()


@functools.cache
def task_manager(*, registry: bool):
    """lm_eval's TaskManager; with its registry's index of some 15,000 tasks only when a task is named rather than
    given as a file (the index takes seconds to build, so it is built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=registry)


def import_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise NotAvailableError("benchmarks (--tasks, eval.tasks) need lm-evaluation-harness, which is not "
                                "installed", hint=INSTALL_HINT) from None
    return lm_eval


def task_file_code(path: Path, seen: frozenset = frozenset()) -> str | None:
    """Where a task file (or a file it includes) loads Python through lm_eval's `!function` tag, as "FILE:LINE:
    !function NAME"; None when it loads none."""
    path = path.resolve()
    if path in seen or not path.is_file():
        return None
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if "!function" in line.split("#", 1)[0]:
            return f"{path}:{number}: {line.strip()}"
        included = re.match(r"\s*include:\s*['\"]?([^'\"#\s]+)", line)
        if included:
            found = task_file_code(path.parent / included.group(1), seen | {path})
            if found:
                return found
    return None


def load_task(manager, spec: str, *, allow_code: bool = False) -> dict:
    """lm_eval's TaskManager.load of one task, group or task file, its errors said in ftcli's terms. A task file's
    relative paths (its data_files) are read from the file's folder, as a recipe's are. A task file that loads
    Python (`!function`) is refused unless allow_code (ftcli eval --allow-code), as a recipe's Python rewards are;
    the registry's own tasks come with the installed harness."""
    path = Path(spec).expanduser()
    if is_task_file(spec):
        if not path.is_file():
            raise NotAvailableError(f"benchmark task file {spec}: no such file")
        code = None if allow_code else task_file_code(path)
        if code:
            raise UsageError(f"benchmark task file {spec} runs Python from beside it ({code})",
                             hint="read that code, then pass --allow-code to ftcli eval")
        spec = str(path.resolve())
    elif spec not in manager.all_tasks:
        close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
        raise UsageError(f"benchmark task {spec!r} is not in lm-evaluation-harness's registry",
                         hint=f"did you mean {', '.join(close)}?" if close else "`lm-eval ls tasks` lists them; "
                                                                               "or give a task YAML file")
    try:
        with _working_dir(path.resolve().parent if is_task_file(spec) else None):
            return manager.load([spec])
    except ConnectionError as exc:
        raise _unreachable(manager, spec, exc) from None
    except FileNotFoundError as exc:
        if type(exc).__module__.startswith("datasets") and not _local_data(manager, spec):   # a hub dataset
            raise _unreachable(manager, spec, exc) from None
        raise NotAvailableError(f"benchmark task {spec}: {exc}") from None
    except Exception as exc:
        if type(exc).__name__ in ("DatasetGenerationError", "ArrowInvalid", "JSONDecodeError"):
            raise DataError(f"benchmark task {spec}: its data can't be read: {exc.__cause__ or exc}") from None
        if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)) or "yaml" in type(exc).__module__ \
                or "jinja2" in type(exc).__module__:
            raise UsageError(f"benchmark task {spec}: {type(exc).__name__}: {exc}",
                             hint="check the task file against lm-evaluation-harness's task guide") from None
        raise


def _task_config(manager, spec: str) -> dict:
    entry = manager.task_index.get(spec)
    if entry is not None and entry.cfg:
        return entry.cfg
    if is_task_file(spec):
        with contextlib.suppress(Exception):
            from lm_eval.tasks._yaml_loader import load_yaml

            return load_yaml(spec, resolve_func=False)
    return {}


def _local_data(manager, spec: str) -> bool:
    return str(_task_config(manager, spec).get("dataset_path", "")) in LOCAL_BUILDERS


def _unreachable(manager, spec: str, exc: Exception) -> NotAvailableError:
    """Exit 4 naming the hub dataset a task needs where the hub can't be reached (offline, or no network)."""
    config = _task_config(manager, spec)
    quoted = re.search(r"'([^']+)'", str(exc))
    dataset = config.get("dataset_path") or (quoted.group(1) if quoted else "its dataset")
    if config.get("dataset_name"):
        dataset = f"{dataset} (config {config['dataset_name']})"
    offline = [name for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
               if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    why = f"offline mode is on ({', '.join(f'{n}=1' for n in offline)})" if offline else f"no connection: {exc}"
    return NotAvailableError(f"benchmark task {spec} needs the dataset {dataset} from the Hugging Face Hub, which "
                             f"is not in the local cache and can't be downloaded here: {why}",
                             hint="run it once where the hub is reachable (datasets keeps a copy), or score a local "
                                  "task YAML over local data: --tasks path/to/task.yaml")


def top_level(loaded: dict) -> list:
    """The tasks and groups TaskManager.load built for one spec, without those inside a group (which its group
    carries), so that groups are scored with their aggregate."""
    groups, tasks = loaded.get("groups", {}), loaded["tasks"]
    children = {child for kids in loaded.get("group_map", {}).values() for child in kids}
    grouped = {task.task_name for group in groups.values() for task in group.get_all_tasks()}
    return [g for name, g in groups.items() if name not in children] + \
           [t for name, t in tasks.items() if name not in grouped]


@contextlib.contextmanager
def _working_dir(folder: Path | None) -> Iterator[None]:
    if folder is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
