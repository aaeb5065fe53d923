"""Checkpoint completeness: mark each checkpoint complete atomically, and find the newest complete one to resume."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ftcli.atomic import atomic_write_text
from ftcli.runs import CHECKPOINT_COMPLETE_MARKER

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What a resumable checkpoint must hold (Trainer's own file names); any one missing or truncated disqualifies it.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")


@dataclass(frozen=True)
class CheckpointScan:
    newest_complete: Path | None
    skipped: list[tuple[Path, str]]  # (checkpoint, why it can't be used)


def _step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder can't be resumed from, or None when it is complete."""
    if not (path / CHECKPOINT_COMPLETE_MARKER).exists():
        return "its save never finished (no completion marker)"
    for name in REQUIRED_FILES:
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().st_size == 0:
            return f"{name} is empty"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("global_step") != _step(path):
            return "trainer_state.json names another step"
    except (OSError, json.JSONDecodeError):
        return "trainer_state.json is truncated or corrupt"
    try:
        from safetensors import safe_open

        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
            list(handle.keys())
    except Exception:  # safetensors raises its own error type for truncated files
        return "adapter_model.safetensors is truncated or corrupt"
    recorded = (path / CHECKPOINT_COMPLETE_MARKER).read_text().strip().splitlines()
    for line in recorded:
        name, _, size = line.partition(" ")
        if size.isdigit() and (path / name).exists() and (path / name).stat().st_size != int(size):
            return f"{name} changed size after the save (now truncated?)"
    return None


def mark_complete(path: Path) -> None:
    """Record the size of every file; written last, atomically, so its presence means the save finished."""
    lines = [f"{f.name} {f.stat().st_size}" for f in sorted(path.iterdir()) if f.is_file()
             and f.name != CHECKPOINT_COMPLETE_MARKER]
    atomic_write_text(path / CHECKPOINT_COMPLETE_MARKER, "\n".join(lines) + "\n")


def scan_checkpoints(checkpoints_dir: Path) -> CheckpointScan:
    if not checkpoints_dir.is_dir():
        return CheckpointScan(None, [])
    candidates = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and _step(p) >= 0), key=_step,
                        reverse=True)
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return CheckpointScan(candidate, skipped)
        skipped.append((candidate, problem))
    return CheckpointScan(None, skipped)


def remove_unfinished(run_path: Path, checkpoints_dir: Path) -> None:
    """After an abrupt stop: drop checkpoints whose save never finished and staging leftovers of atomic writes."""
    import shutil

    from ftcli.atomic import STAGING_PREFIX

    if checkpoints_dir.is_dir():
        for candidate in checkpoints_dir.iterdir():
            if candidate.is_dir() and _step(candidate) >= 0 and not (candidate / CHECKPOINT_COMPLETE_MARKER).exists():
                shutil.rmtree(candidate, ignore_errors=True)
    for leftover in run_path.rglob(STAGING_PREFIX + "*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)

