"""Run directories: safe names, the runs root, refusing existing or locked runs, run.json, atomic writes."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from helpers import leftovers, make_bare_run

from ftcli.errors import NotAvailableError, RunStateError, UsageError
from ftcli.paths import runs_root
from ftcli.recipe.schema import SCHEMA_VERSION
from ftcli.runs.rundir import (
    LOCK_FILE,
    STATUSES,
    RunDir,
    list_runs,
    validate_run_name,
)

RECIPE = """\
name: named-run
model:
  path: org/never-loaded
method:
  kind: lora
data:
  train: train.jsonl
"""


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


# ---------------------------------------------------------------------------------------------- names




@pytest.mark.parametrize("name", ["../x", "/abs/run", "a/b", "..", ".", "x" * 101])
def test_train_refuses_escaping_names_before_loading_anything(name, recipe_file, runs_dir, cli_inproc):
    started = time.perf_counter()
    result = cli_inproc("train", recipe_file, "--name", name)
    assert result.exit_code == 2, result
    assert "run name" in result.output and "not allowed" in result.output
    assert time.perf_counter() - started < 20  # no model load: a model here would not even exist
    assert not runs_dir.exists() or not any(runs_dir.iterdir())
    assert not (recipe_file.parent / "x").exists()


@pytest.mark.parametrize("name", ["a\x00b", "", "a\\b", "run\n"])
def test_names_argv_cannot_carry_are_refused_too(name, recipe_file, runs_dir, cli_inproc):
    result = cli_inproc("train", recipe_file, "--name", name)
    assert result.exit_code == 2, result.output
    with pytest.raises(UsageError):
        validate_run_name(name)


def test_commands_taking_a_run_refuse_escaping_names(runs_dir, cli_inproc):
    for command in (["runs", "show", "../etc"], ["eval", "a/b"], ["merge", ".."]):
        result = cli_inproc(*command)
        assert result.exit_code == 2, (command, result)


def test_name_of_100_characters_is_fine(tmp_path):
    run = RunDir(tmp_path, "x" * 100)
    assert run.path == (tmp_path / ("x" * 100)).resolve()


# ---------------------------------------------------------------------------------------------- runs root


def test_runs_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FTCLI_RUNS_DIR", raising=False)
    assert runs_root() == tmp_path / "runs"
    monkeypatch.setenv("FTCLI_RUNS_DIR", str(tmp_path / "env"))
    assert runs_root() == tmp_path / "env"
    assert runs_root(tmp_path / "flag") == tmp_path / "flag"
    assert runs_root("relative") == tmp_path / "relative"


def test_symlinked_runs_root_is_followed(tmp_path, recipe_file):
    target = tmp_path / "real-runs"
    target.mkdir()
    link = tmp_path / "runs-link"
    link.symlink_to(target, target_is_directory=True)
    root = runs_root(link)
    assert root == target.resolve()  # resolved once, as runs_root's docstring says
    run = make_bare_run(root, "r1", recipe_file)
    assert (target / "r1" / "run.json").is_file()
    assert [r.name for r in list_runs(link)] == ["r1"]
    assert RunDir.open(link, "r1").path == run.path


def test_run_folder_symlinked_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UsageError, match="leave the runs folder"):
        RunDir(root, "sneaky")
    assert list_runs(root) == []


# ---------------------------------------------------------------------------------------------- existing, locked


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, recipe_file, runs_dir, cli_inproc):
    existing = make_bare_run(runs_dir, "named-run", recipe_file)
    result = cli_inproc("train", recipe_file)
    assert result.exit_code == 5, result
    assert "already exists" in result.output and "--resume" in result.output
    assert existing.read()["status"] == "created"  # untouched
    result = cli_inproc("train", recipe_file, "--resume", "--overwrite")
    assert result.exit_code == 2, result


def test_prepare_rules(tmp_path, recipe_file):
    root = tmp_path / "runs"
    with pytest.raises(RunStateError, match="nothing to resume"):
        RunDir.prepare(root, "new", resume=True, overwrite=False)
    make_bare_run(root, "old", recipe_file)
    with pytest.raises(RunStateError, match="already exists"):
        RunDir.prepare(root, "old", resume=False, overwrite=False)
    assert RunDir.prepare(root, "old", resume=True, overwrite=False).exists()
    # A folder ftcli did not make is never overwritten.
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RunStateError, match="not an ftcli run"):
        RunDir.prepare(root, "mine", resume=False, overwrite=True)
    assert (root / "mine" / "thesis.tex").read_text() == "precious"
    (root / "afile").write_text("x")
    with pytest.raises(RunStateError, match="not a folder"):
        RunDir.prepare(root, "afile", resume=False, overwrite=True)


def test_overwrite_replaces_the_run(tmp_path, recipe_file):
    root = tmp_path / "runs"
    run = make_bare_run(root, "r", recipe_file)
    (run.adapter_dir).mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    run = RunDir.prepare(root, "r", resume=False, overwrite=True)
    with run.lock():
        run.initialise("name: r\n", recipe_file, overwrite=True)
    assert not run.adapter_dir.exists()
    assert run.read()["status"] == "created"


def test_initialise_rechecks_under_the_lock(tmp_path, recipe_file):
    root = tmp_path / "runs"
    first = RunDir.prepare(root, "race", resume=False, overwrite=False)
    second = RunDir.prepare(root, "race", resume=False, overwrite=False)
    with first.lock():
        first.initialise("name: race\n", recipe_file, overwrite=False)
    with second.lock(), pytest.raises(RunStateError, match="already exists"):
        second.initialise("name: race\n", recipe_file, overwrite=False)


def test_lock_excludes_a_second_holder_in_the_same_process(tmp_path):
    run = RunDir(tmp_path, "locked")
    with run.lock():
        with pytest.raises(RunStateError, match=f"pid {os.getpid()}"):
            with RunDir(tmp_path, "locked").lock():
                pass
    with RunDir(tmp_path, "locked").lock():  # released on exit
        pass


HOLD_LOCK = """
import sys, time
from pathlib import Path
from ftcli.runs.rundir import RunDir
with RunDir(Path(sys.argv[1]), sys.argv[2]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_locked_run_is_refused_naming_the_holder_and_freed_by_kill_9(tmp_path, recipe_file, runs_dir, cli_inproc):
    run = make_bare_run(runs_dir, "named-run", recipe_file)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(runs_dir), "named-run"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli_inproc("train", recipe_file, "--resume")
        assert result.exit_code == 5, result
        assert f"pid {holder.pid}" in result.output
        with pytest.raises(RunStateError, match=f"pid {holder.pid}"):
            with run.lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run.lock():  # the kernel dropped the dead holder's lock
        assert (run.path / LOCK_FILE).read_text() == str(os.getpid())


# ---------------------------------------------------------------------------------------------- run.json


def test_run_json_fields(tmp_path, recipe_file):
    run = make_bare_run(tmp_path / "runs", "r", recipe_file)
    info = run.read()
    assert info["schema_version"] == SCHEMA_VERSION
    assert info["name"] == "r" and info["status"] == "created" and info["status"] in STATUSES
    assert dt.datetime.fromisoformat(info["created_at"]).tzinfo is not None
    assert info["recipe_file"] == str(recipe_file)
    versions = info["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    for package in ("torch", "transformers", "peft", "trl"):
        assert versions[package] == metadata.version(package)
    assert info["git_commit"] is None  # tmp_path is in no repository
    assert run.recipe_path.read_text() == "name: x\n"


def test_run_json_records_the_recipes_git_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    recipe = repo / "recipe.yaml"
    recipe.write_text(RECIPE)
    subprocess.run([*git, "add", "recipe.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "r"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    run = make_bare_run(tmp_path / "runs", "r", recipe)
    assert run.read()["git_commit"] == head
    recipe.write_text(RECIPE + "# edited\n")
    assert make_bare_run(tmp_path / "runs", "r2", recipe).read()["git_commit"] == head + "-dirty"


def test_status_updates(tmp_path, recipe_file):
    run = make_bare_run(tmp_path / "runs", "r", recipe_file)
    for status in ("running", "interrupted", "running", "completed"):
        info = run.set_status(status, step=3)
        assert run.read()["status"] == status and info["step"] == 3
        assert "updated_at" in run.read()
    with pytest.raises(ValueError, match="unknown run status"):
        run.set_status("done")
    assert run.read()["status"] == "completed"
    assert leftovers(run.path) == []


def test_status_gates(tmp_path, recipe_file):
    run = make_bare_run(tmp_path / "runs", "r", recipe_file)
    with pytest.raises(RunStateError, match="status is created"):
        run.require_adapter("merge")
    run.set_status("completed")
    with pytest.raises(RunStateError, match="no adapter"):
        run.require_adapter("merge")
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(RunStateError, match="no adapter_model.safetensors"):
        run.require_adapter("merge")
    (run.adapter_dir / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(NotAvailableError, match="pickle"):
        run.require_adapter("merge")
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"{}")
    run.require_adapter("merge")


def test_open_missing_run_lists_what_is_there(tmp_path, recipe_file, cli_inproc):
    root = tmp_path / "runs"
    make_bare_run(root, "alpha", recipe_file)
    with pytest.raises(RunStateError, match="alpha"):
        RunDir.open(root, "beta")
    result = cli_inproc("runs", "show", "beta", "--runs-dir", root)
    assert result.exit_code == 5, result


def test_corrupt_run_json_is_a_run_state_error(tmp_path, recipe_file):
    run = make_bare_run(tmp_path / "runs", "r", recipe_file)
    run.run_json_path.write_text("{truncated")
    with pytest.raises(RunStateError, match="corrupt"):
        run.read()


def test_metrics_lines_survive_a_cut_last_line(tmp_path, recipe_file):
    run = make_bare_run(tmp_path / "runs", "r", recipe_file)
    run.append_metrics({"step": 1, "loss": 2.0})
    run.append_metrics({"step": 2, "loss": 1.5})
    with open(run.metrics_path, "a") as handle:
        handle.write('{"step": 3, "lo')  # a crash mid-line
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert json.loads(run.metrics_path.read_text().splitlines()[0]) == {"step": 1, "loss": 2.0}


def test_layout_names_live_in_runs_module(tmp_path):
    run = RunDir(tmp_path, "r")
    assert run.chat_template_path == run.adapter_dir / "chat_template.jinja"
    assert run.export_dir("gguf").parent.parent == run.path
    paths = [run.recipe_path, run.run_json_path, run.metrics_path, run.adapter_dir, run.checkpoints_dir,
             run.eval_dir, run.merged_dir, run.lock_path]
    assert len(set(paths)) == len(paths) and all(p.parent == run.path for p in paths)
