"""run.json under concurrent writers: every update is one locked read-modify-write, so none is lost."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftcli.atomic import atomic_write_json
from ftcli.errors import RunStateError
from ftcli.runs.rundir import LOCK_FILE, RUN_JSON_LOCK_FILE, RunDir, list_runs

WRITERS, UPDATES = 4, 25
ORIGINAL_READ = RunDir.read


def _slow_read(self):
    # Widens the window between reading run.json and writing it back, as a loaded machine would: without the
    # lock, another writer's record lands in that window and is then overwritten.
    info = ORIGINAL_READ(self)
    time.sleep(0.003)
    return info


def _writer(root: Path, index: int, locked: bool, start) -> None:
    RunDir.read = _slow_read  # in this forked child only
    run = RunDir(root, "shared")
    start.wait()
    for step in range(UPDATES):
        key = f"w{index}-{step}"
        if locked:
            run.update(**{key: step})
            run.modify(lambda info, key=key: info.setdefault("log", []).append(key))
        else:  # the pattern RunDir.update and export's record used to follow: read, change, write, nothing held
            info = run.read()
            atomic_write_json(run.run_json_path, {**info, key: step})
            info = run.read()
            atomic_write_json(run.run_json_path, {**info, "log": [*info.get("log", []), key]})


def _hammer(tmp_path: Path, *, locked: bool) -> tuple[int, int]:
    """WRITERS processes x UPDATES (a distinct key each, and an append to one shared list); returns how many of
    the keys and of the list entries run.json holds at the end."""
    root = tmp_path / "runs"
    atomic_write_json(root / "shared" / "run.json", {"name": "shared", "status": "completed"})
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(root, i, locked, start)) for i in range(WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    info = RunDir(root, "shared").read()
    assert info["status"] == "completed"
    return sum(key.startswith("w") for key in info), len(info.get("log", []))


def test_concurrent_updates_and_modifies_all_land(tmp_path):
    keys, log = _hammer(tmp_path, locked=True)
    assert (keys, log) == (WRITERS * UPDATES, WRITERS * UPDATES)


def test_the_unlocked_pattern_loses_records(tmp_path):
    """The control arm: the same load through a plain read-then-write loses records, so the test above can fail."""
    keys, log = _hammer(tmp_path, locked=False)
    assert keys < WRITERS * UPDATES or log < WRITERS * UPDATES


def test_run_json_lock_is_its_own_file_and_part_of_the_layout(tmp_path):
    root = tmp_path / "runs"
    run = RunDir(root, "r")
    with pytest.raises(RunStateError, match="has no run.json"):
        run.update(status="completed")  # no folder: a clear run-state error, no stray lock file
    atomic_write_json(run.run_json_path, {"name": "r", "status": "created"})
    with run.lock():  # the run lock held for a whole command must not block its own run.json updates
        assert run.update(status="completed")["status"] == "completed"
    assert {p.name for p in run.path.iterdir()} == {"run.json", LOCK_FILE, RUN_JSON_LOCK_FILE}
    assert [r.name for r in list_runs(root)] == ["r"]
    run.run_json_path.unlink()  # a half-made run holding only ftcli's own files may be trained into
    RunDir.prepare(root, "r", resume=False, overwrite=False)
    run.initialise("name: r\n", tmp_path / "r.yaml", overwrite=True)
    assert {LOCK_FILE, RUN_JSON_LOCK_FILE} <= {p.name for p in run.path.iterdir()}


def _signal_inside_a_locked_write(folder: str) -> None:
    import os
    import signal

    run = RunDir(Path(folder), "r")

    def second_ctrl_c(*_):   # as GracefulStop does: record, then leave at once
        run.update(status="interrupted")
        os._exit(130)

    signal.signal(signal.SIGALRM, second_ctrl_c)

    def change(info):
        signal.raise_signal(signal.SIGALRM)   # the handler runs here, with the lock held
        info["step"] = 3

    run.modify(change)


def test_an_update_from_a_signal_handler_inside_a_locked_write_does_not_wait_on_itself(tmp_path):
    """A second Ctrl-C records `interrupted` from the signal handler, which can run while the interrupted code is
    inside run.modify: the handler's update must go through, not wait forever on its own process's lock."""
    run = RunDir(tmp_path / "runs", "r")
    run.path.mkdir(parents=True)
    atomic_write_json(run.run_json_path, {"name": "r", "status": "running"})
    child = multiprocessing.get_context("fork").Process(target=_signal_inside_a_locked_write,
                                                        args=(str(run.runs_root),))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 130, "the signal handler's run.json update waited on its own process's lock"
    assert run.read()["status"] == "interrupted"


@pytest.mark.slow
def test_eval_beside_export_keeps_both_records(memorised, tmp_path):
    """The lost update of the issue, end to end: `ftcli eval` and `ftcli export` of one run at the same time."""
    runs, source = memorised
    root = tmp_path / "runs"
    shutil.copytree(runs / source, root / "pair")
    run = RunDir(root, "pair")
    for _ in range(2):
        run.modify(lambda info: (info.pop("eval", None), info.pop("exports", None)))
        procs = [subprocess.Popen([sys.executable, "-m", "ftcli", *args, "--runs-dir", str(root)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
                 for args in (["eval", "pair", "--max-samples", "2", "--json"],
                              ["export", "pair", "--format", "adapter"])]
        outputs = [proc.communicate(timeout=300) for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], outputs
        info = run.read()
        assert info["eval"]["path"] == json.loads(outputs[0][0])["path"]
        assert info["exports"]["adapter"]["path"] == str(run.export_dir("adapter"))
