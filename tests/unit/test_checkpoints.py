"""Checkpoint completeness on synthetic Trainer, DeepSpeed and FSDP layouts, and --resume setting rejected ones
aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcli.runs.checkpoints import checkpoint_problem, mark_complete, scan_checkpoints, set_aside


def _write(path: Path, data: bytes = b"state") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _adapter(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 4)}, str(folder / "adapter_model.safetensors"))


def make_checkpoint(root: Path, step: int, layout: str = "plain", *, complete: bool = True) -> Path:
    """A checkpoint folder as Trainer writes it for `layout` (file names from transformers, accelerate, DeepSpeed)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    _write(folder / "scheduler.pt")
    _write(folder / "rng_state.pth")
    if layout == "plain":
        _write(folder / "optimizer.pt")
        _adapter(folder)
    elif layout == "fsdp_full":  # accelerate's save_fsdp_optimizer with FULL_STATE_DICT
        _write(folder / "optimizer.bin")
        _write(folder / "pytorch_model_fsdp.bin")
        _adapter(folder)
    elif layout == "deepspeed":  # engine.save_checkpoint: a tag folder named by `latest`; the adapter via save_model
        tag = f"global_step{step}"
        _write(folder / "latest", tag.encode())
        _write(folder / tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
        _write(folder / tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
        _write(folder / tag / "mp_rank_00_model_states.pt")
        _write(folder / "zero_to_fp32.py", b"# DeepSpeed's converter\n")
        _adapter(folder)
    elif layout == "fsdp_sharded":  # torch.distributed.checkpoint folders; save_model writes no adapter file then
        for name in ("optimizer_0", "pytorch_model_fsdp_0"):
            _write(folder / name / "__0_0.distcp")
            _write(folder / name / "__1_0.distcp")
            _write(folder / name / ".metadata")
    else:
        raise ValueError(layout)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        mark_complete(folder)
    return folder


@pytest.mark.parametrize("layout", ["plain", "fsdp_full", "deepspeed", "fsdp_sharded"])
def test_complete_checkpoints_of_every_layout_are_accepted(layout, tmp_path):
    folder = make_checkpoint(tmp_path, 20, layout)
    assert checkpoint_problem(folder) is None
    assert scan_checkpoints(tmp_path).newest_complete == folder


def _remove(folder: Path, *names: str) -> None:
    import shutil

    for name in names:
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


@pytest.mark.parametrize(("layout", "remove", "reason"), [
    ("plain", ["optimizer.pt"], "the optimizer state is missing"),
    ("fsdp_full", ["optimizer.bin"], "the optimizer state is missing"),
    ("deepspeed", ["global_step20"], "names 'global_step20', which is no global_stepN/ folder"),
    ("deepspeed", ["latest"], "DeepSpeed's latest file is missing"),
    ("deepspeed", ["global_step20/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "global_step20/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"],
     "holds no DeepSpeed *optim_states.pt"),
    ("deepspeed", ["global_step20/mp_rank_00_model_states.pt"], "holds no DeepSpeed *model_states.pt"),
    ("fsdp_sharded", ["optimizer_0"], "the optimizer state is missing"),
    ("fsdp_sharded", ["optimizer_0/.metadata"], "optimizer_0/.metadata is missing"),
    ("fsdp_sharded", ["optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp"], "optimizer_0/ holds no"),
    ("fsdp_sharded", ["pytorch_model_fsdp_0/.metadata"], "pytorch_model_fsdp_0/.metadata is missing"),
    ("fsdp_sharded", ["pytorch_model_fsdp_0"], "adapter_model.safetensors is missing"),
    ("plain", ["adapter_model.safetensors"], "adapter_model.safetensors is missing"),
    ("plain", ["scheduler.pt"], "scheduler.pt is missing"),
])
def test_checkpoints_missing_state_are_rejected_naming_what(layout, remove, reason, tmp_path):
    folder = make_checkpoint(tmp_path, 20, layout)
    _remove(folder, *remove)
    problem = checkpoint_problem(folder)
    assert problem is not None and reason in problem, problem


def test_missing_optimizer_names_every_form_looked_for(tmp_path):
    folder = make_checkpoint(tmp_path, 20)
    _remove(folder, "optimizer.pt")
    problem = checkpoint_problem(folder)
    for form in ("optimizer.pt", "global_step", "latest", "optimizer_0/"):
        assert form in problem


@pytest.mark.parametrize("layout", ["plain", "deepspeed", "fsdp_sharded"])
def test_the_other_checks_hold_for_every_layout(layout, tmp_path):
    unmarked = make_checkpoint(tmp_path / "a", 2, layout, complete=False)
    assert "no completion marker" in checkpoint_problem(unmarked)

    shrunk = make_checkpoint(tmp_path / "b", 2, layout)
    (shrunk / "scheduler.pt").write_bytes(b"s")  # a top-level file cut short after the marker recorded its size
    assert "scheduler.pt changed size" in checkpoint_problem(shrunk)

    other_step = make_checkpoint(tmp_path / "c", 2, layout)
    (other_step / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert "names another step" in checkpoint_problem(other_step)

    empty = make_checkpoint(tmp_path / "d", 2, layout)
    (empty / "trainer_state.json").write_text("")
    assert "trainer_state.json is empty" in checkpoint_problem(empty)


def test_a_truncated_adapter_is_rejected(tmp_path):
    folder = make_checkpoint(tmp_path, 4, complete=False)
    adapter = folder / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])
    mark_complete(folder)  # sizes recorded after the damage: only reading the file shows it
    assert "adapter_model.safetensors is truncated" in checkpoint_problem(folder)


def test_scan_takes_the_newest_complete_and_never_the_rejected_folder(tmp_path):
    make_checkpoint(tmp_path, 2)
    four = make_checkpoint(tmp_path, 4, "deepspeed")
    six = make_checkpoint(tmp_path, 6, complete=False)
    make_checkpoint(tmp_path / "rejected", 8)  # complete, but set aside earlier: never resumed from
    scan = scan_checkpoints(tmp_path)
    assert scan.newest_complete == four
    assert [path for path, _ in scan.skipped] == [six]


def test_set_aside_moves_whole_checkpoints_with_a_suffix_when_taken(tmp_path):
    first = make_checkpoint(tmp_path, 6, complete=False)
    moved = set_aside(first)
    assert moved == tmp_path / "rejected" / "checkpoint-6" and not first.exists()
    assert (moved / "optimizer.pt").read_bytes() == b"state"
    for expected in ("checkpoint-6-2", "checkpoint-6-3"):
        again = make_checkpoint(tmp_path, 6, complete=False)
        assert set_aside(again) == tmp_path / "rejected" / expected
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == ["checkpoint-6", "checkpoint-6-2",
                                                                         "checkpoint-6-3"]


def test_trainer_rotation_and_lookup_leave_the_rejected_folder_alone(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

    for step in (2, 4):
        make_checkpoint(tmp_path, step)
    set_aside(make_checkpoint(tmp_path, 6, complete=False))
    rotate_checkpoints(output_dir=str(tmp_path), save_total_limit=1, use_mtime=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "rejected"]
    assert (tmp_path / "rejected" / "checkpoint-6" / "optimizer.pt").exists()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")


def test_resume_sets_a_corrupt_checkpoint_aside_and_completes(tiny_recipe, runs_dir, cli_inproc):
    settings = ["--set", "training.save_steps=2", "--set", "training.save_total_limit=5"]
    assert cli_inproc("train", tiny_recipe, *settings, "--set", "training.max_steps=6").exit_code == 0
    run = runs_dir / "tiny"
    newest = run / "checkpoints" / "checkpoint-6"
    cut = (newest / "optimizer.pt").read_bytes()[:100]
    (newest / "optimizer.pt").write_bytes(cut)  # as a full disk or kill -9 mid-save would leave it

    resumed = cli_inproc("train", tiny_recipe, "--resume", *settings, "--set", "training.max_steps=8")
    assert resumed.exit_code == 0, resumed.output
    assert "set aside checkpoint-6 in checkpoints/rejected/: optimizer.pt changed size" in resumed.output
    assert "resuming from checkpoint-4" in resumed.output
    kept = run / "checkpoints" / "rejected" / "checkpoint-6"
    assert (kept / "optimizer.pt").read_bytes() == cut and (kept / "adapter_model.safetensors").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["step"] == 8
    [record] = info["rejected_checkpoints"]
    assert record["checkpoint"] == "checkpoint-6" and record["moved_to"] == "checkpoints/rejected/checkpoint-6"
    assert "optimizer.pt" in record["reason"]
    assert scan_checkpoints(run / "checkpoints").newest_complete == run / "checkpoints" / "checkpoint-8"

    # Both newer checkpoints broken this time: both set aside, the retrained checkpoint-6 beside the first one.
    for step in (6, 8):
        (run / "checkpoints" / f"checkpoint-{step}" / "COMPLETE").unlink()
    again = cli_inproc("train", tiny_recipe, "--resume", *settings, "--set", "training.max_steps=10")
    assert again.exit_code == 0, again.output
    assert "set aside checkpoint-6 in checkpoints/rejected/ as checkpoint-6-2" in again.output
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["step"] == 10
    assert [r["moved_to"] for r in info["rejected_checkpoints"]] == [
        "checkpoints/rejected/checkpoint-6", "checkpoints/rejected/checkpoint-8", "checkpoints/rejected/checkpoint-6-2"]
    assert sorted(p.name for p in kept.parent.iterdir()) == ["checkpoint-6", "checkpoint-6-2", "checkpoint-8"]
