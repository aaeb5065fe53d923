"""Checkpoint completeness: mark each checkpoint complete atomically, and find the newest complete one to resume."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ftcli.atomic import atomic_write_text
from ftcli.errors import RunStateError
from ftcli.runs.rundir import ADAPTER_WEIGHTS_FILE, CHECKPOINT_COMPLETE_MARKER, REJECTED_CHECKPOINTS_DIR

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What Trainer writes into a checkpoint (transformers' trainer.py, accelerate's fsdp_utils.py, DeepSpeed's engine).
TRAINER_STATE_FILE = "trainer_state.json"  # written last by Trainer
SCHEDULER_FILE = "scheduler.pt"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # plain Trainer; FSDP with a full state dict
DEEPSPEED_LATEST_FILE = "latest"  # DeepSpeed: names the folder (global_stepN) holding its model and optimizer states
DEEPSPEED_TAG = re.compile(r"global_step\d+")  # the folder name DeepSpeed uses when Trainer passes no tag
DEEPSPEED_OPTIMIZER_GLOB = "*optim_states.pt"  # e.g. bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt
DEEPSPEED_MODEL_GLOB = "*model_states.pt"  # mp_rank_00_model_states.pt (ZeRO-3: zero_pp_rank_0_mp_rank_00_...)
FSDP_OPTIMIZER_DIR = "optimizer_0"  # FSDP with a sharded state dict: torch.distributed.checkpoint folders instead
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # of optimizer.pt and of the adapter file, which is then not written
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint renames it into place once every shard is written
DCP_SHARD_GLOB = "*.distcp"
MISSING_OPTIMIZER = (f"the optimizer state is missing (no {' or '.join(OPTIMIZER_FILES)}, no DeepSpeed "
                     f"{DEEPSPEED_LATEST_FILE} and global_step*/ folder, no FSDP {FSDP_OPTIMIZER_DIR}/ folder)")


@dataclass(frozen=True)
class CheckpointScan:
    newest_complete: Path | None
    skipped: list[tuple[Path, str]]  # (checkpoint, why it can't be used)


def _step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else -1


def _file_problem(path: Path, name: str) -> str | None:
    file = path / name
    if not file.is_file():
        return f"{name} is missing"
    return f"{name} is empty" if file.stat().st_size == 0 else None


def _sharded_problem(path: Path, name: str) -> str | None:
    """Why a torch.distributed.checkpoint folder (FSDP's sharded state dict) is unusable, or None."""
    if _file_problem(path / name, DCP_METADATA_FILE):
        return f"{name}/{DCP_METADATA_FILE} is missing or empty (the sharded save never finished)"
    return None if any((path / name).glob(DCP_SHARD_GLOB)) else f"{name}/ holds no {DCP_SHARD_GLOB} shards"


def _deepspeed_problem(path: Path) -> str | None:
    """Why DeepSpeed can't resume: `latest` must name a global_stepN/ folder with optimizer and model states."""
    if _file_problem(path, DEEPSPEED_LATEST_FILE):
        return f"DeepSpeed's {DEEPSPEED_LATEST_FILE} file is missing or empty"
    tag = (path / DEEPSPEED_LATEST_FILE).read_text().strip()
    folder = path / tag
    if not DEEPSPEED_TAG.fullmatch(tag) or not folder.is_dir():
        return f"DeepSpeed's {DEEPSPEED_LATEST_FILE} names {tag!r}, which is no global_stepN/ folder of this checkpoint"
    for pattern in (DEEPSPEED_OPTIMIZER_GLOB, DEEPSPEED_MODEL_GLOB):
        if not any(f.stat().st_size > 0 for f in folder.glob(pattern)):
            return f"{tag}/ holds no DeepSpeed {pattern} file"
    return None


def _optimizer_problem(path: Path) -> str | None:
    """The optimizer state in any form Trainer writes: optimizer.pt, DeepSpeed's global_step*/, FSDP's shards."""
    for name in OPTIMIZER_FILES:
        if (path / name).exists():
            return _file_problem(path, name)
    if (path / DEEPSPEED_LATEST_FILE).exists() or any(DEEPSPEED_TAG.fullmatch(p.name) for p in path.iterdir()):
        return _deepspeed_problem(path)
    if (path / FSDP_OPTIMIZER_DIR).exists():
        return _sharded_problem(path, FSDP_OPTIMIZER_DIR)
    return MISSING_OPTIMIZER


def _adapter_problem(path: Path) -> str | None:
    """The adapter weights: the safetensors file, readable to its end, or FSDP's shards when it sharded them."""
    if not (path / ADAPTER_WEIGHTS_FILE).exists() and (path / FSDP_MODEL_DIR).exists():
        return _sharded_problem(path, FSDP_MODEL_DIR)
    problem = _file_problem(path, ADAPTER_WEIGHTS_FILE)
    if problem:
        return problem
    try:
        from safetensors import safe_open

        with safe_open(str(path / ADAPTER_WEIGHTS_FILE), framework="pt") as handle:
            list(handle.keys())
    except Exception:  # safetensors raises its own error type for truncated files
        return f"{ADAPTER_WEIGHTS_FILE} is truncated or corrupt"
    return None


def _trainer_state_problem(path: Path) -> str | None:
    try:
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{TRAINER_STATE_FILE} is truncated or corrupt"
    return None if state.get("global_step") == _step(path) else f"{TRAINER_STATE_FILE} names another step"


def _size_problem(path: Path) -> str | None:
    """A top-level file whose size differs from the one the completion marker recorded."""
    for line in (path / CHECKPOINT_COMPLETE_MARKER).read_text().strip().splitlines():
        name, _, size = line.partition(" ")
        if size.isdigit() and (path / name).exists() and (path / name).stat().st_size != int(size):
            return f"{name} changed size after the save (now truncated?)"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder can't be resumed from, or None when it is complete."""
    if not (path / CHECKPOINT_COMPLETE_MARKER).exists():
        return "its save never finished (no completion marker)"
    return (_file_problem(path, TRAINER_STATE_FILE) or _optimizer_problem(path) or _file_problem(path, SCHEDULER_FILE)
            or _adapter_problem(path) or _trainer_state_problem(path) or _size_problem(path))


def mark_complete(path: Path) -> None:
    """Record the size of every file; written last, atomically, so its presence means the save finished."""
    lines = [f"{f.name} {f.stat().st_size}" for f in sorted(path.iterdir()) if f.is_file()
             and f.name != CHECKPOINT_COMPLETE_MARKER]
    atomic_write_text(path / CHECKPOINT_COMPLETE_MARKER, "\n".join(lines) + "\n")


def scan_checkpoints(checkpoints_dir: Path) -> CheckpointScan:
    """The newest complete checkpoint, and every newer one with why it can't be used (rejected/ is no checkpoint)."""
    if not checkpoints_dir.is_dir():
        return CheckpointScan(None, [])
    candidates = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and _step(p) >= 0), key=_step,
                        reverse=True)
    skipped = []
    for candidate in candidates:
        try:
            problem = checkpoint_problem(candidate)
        except OSError as exc:  # unreadable, or moved aside by the main process while a worker looks
            problem = f"it can't be read ({exc})"
        if problem is None:
            return CheckpointScan(candidate, skipped)
        skipped.append((candidate, problem))
    return CheckpointScan(None, skipped)


def set_aside(checkpoint: Path) -> Path:
    """Move a checkpoint that can't be resumed into checkpoints/rejected/ (a judgement can be wrong: never delete it).

    Returns where it went: rejected/<name>, or rejected/<name>-2, -3, ... when an earlier resume set one aside under
    that name. Call from the main process only, holding the run lock.
    """
    rejected = checkpoint.parent / REJECTED_CHECKPOINTS_DIR
    target, n = rejected / checkpoint.name, 2
    try:
        rejected.mkdir(exist_ok=True)
        while target.exists():
            target, n = rejected / f"{checkpoint.name}-{n}", n + 1
        checkpoint.rename(target)
    except OSError as exc:
        raise RunStateError(f"can't set aside checkpoint {checkpoint} in {rejected}: {exc}",
                            hint=f"move it out of {checkpoint.parent} yourself, then resume again") from None
    return target


def set_aside_unfinished(run_path: Path, checkpoints_dir: Path) -> None:
    """After an abrupt stop: move checkpoints without a completion marker into rejected/ (the save the stop cut off;
    Trainer may have finished it a moment before the marker, so it is kept) and drop staging leftovers of ftcli's
    own atomic writes."""
    import contextlib
    import shutil

    from ftcli.atomic import STAGING_PREFIX

    if checkpoints_dir.is_dir():
        for candidate in checkpoints_dir.iterdir():
            if candidate.is_dir() and _step(candidate) >= 0 and not (candidate / CHECKPOINT_COMPLETE_MARKER).exists():
                with contextlib.suppress(RunStateError):  # exiting at once: a checkpoint left in place is skipped
                    set_aside(candidate)
    for leftover in run_path.rglob(STAGING_PREFIX + "*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
