"""Scale-out: `--nproc` through torch.distributed.run (DDP with gloo on the CPU), launcher configs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, TINY_RECIPE, losses, memorisable_chat, run_cli, write_jsonl, write_recipe

from ftcli.training.launch import launch_command, worker_arguments

# fp32: bf16 autocast (auto on CPUs with native bf16) rounds differently for each per-rank batch shape.
COMMON = ["--set", "training.max_steps=4", "--set", "training.save_steps=2", "--set", "training.scheduler=linear",
          "--set", "training.group_by_length=false", "--set", "training.precision=fp32"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir) -> Path:
    """The one-process baseline (global batch 8, fp32), trained once for the DDP and FSDP comparisons: its run
    folder."""
    root = tmp_path_factory.mktemp("single-process")
    data = write_jsonl(root / "data" / "train.jsonl", memorisable_chat())
    recipe = write_recipe(root / "tiny.yaml", TINY_RECIPE.format(model=tiny_model_dir, data=data))
    result = run_cli("train", recipe, "--name", "single", "--runs-dir", root / "runs", "--set", "training.batch_size=8",
                     *COMMON)
    assert result.exit_code == 0, result
    return root / "runs" / "single"


def test_worker_arguments_drop_only_launcher_options():
    argv = ["train", "r.yaml", "--nproc", "2", "--set", "training.lr=1", "--master-port=1234", "--nnodes", "1",
            "--json"]
    assert worker_arguments(argv) == ["train", "r.yaml", "--set", "training.lr=1", "--json"]
    command = launch_command(argv, nproc=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=29512)
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in command
    assert command[-6:] == ["ftcli", "train", "r.yaml", "--set", "training.lr=1", "--json"]


def test_two_processes_match_one_process_with_the_same_global_batch(single, tiny_recipe, runs_dir):
    common = COMMON
    double = run_cli("train", tiny_recipe, "--name", "double", "--set", "training.batch_size=4", "--nproc", "2",
                     "--master-port", "29531", *common, "--json")
    assert double.exit_code == 0, double
    assert json.loads(double.stdout)["status"] == "completed"  # one document: only rank 0 reports
    info = json.loads((runs_dir / "double" / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["distributed"] == {"world_size": 2, "strategy": "ddp", "global_batch_size": 8}
    assert (runs_dir / "double" / "adapter" / "adapter_model.safetensors").exists()
    one, two = losses(single), losses(runs_dir / "double")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    # Same examples in each global step; only the order of float reductions differs (and each rank pads its own
    # half-batch), so the losses agree to float32 rounding, far tighter than any real divergence.
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), (step, one, two)
    assert not list((runs_dir / "double").glob(".tmp-*"))

    resumed = run_cli("train", tiny_recipe, "--name", "double", "--resume", "--set", "training.batch_size=4",
                      "--nproc", "2", "--master-port", "29532", *common[2:], "--set", "training.max_steps=6")
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-4" in resumed.stderr
    assert json.loads((runs_dir / "double" / "run.json").read_text())["step"] == 6


def test_fsdp_on_the_cpu_matches_one_process_and_resumes(single, tiny_recipe, runs_dir):
    """FSDP2 (fully_shard) with gloo: LoRA and QLoRA shard, train, checkpoint and resume like DDP."""
    common = COMMON
    fsdp = ["--set", "training.batch_size=4", "--nproc", "2", "--set", "training.distributed=fsdp"]
    sharded = run_cli("train", tiny_recipe, "--name", "sharded", *fsdp, "--master-port", "29541", *common)
    assert sharded.exit_code == 0, sharded
    info = json.loads((runs_dir / "sharded" / "run.json").read_text())
    assert info["distributed"] == {"world_size": 2, "strategy": "fsdp", "global_batch_size": 8}
    one, two = losses(single), losses(runs_dir / "sharded")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), (step, one, two)
    from safetensors.torch import load_file

    adapter = load_file(runs_dir / "sharded" / "adapter" / "adapter_model.safetensors")
    reference = load_file(single / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()   # whole tensors gathered from the shards, not one rank's half
    for key in adapter:
        assert adapter[key].shape == reference[key].shape
        assert (adapter[key] - reference[key]).abs().max() < 1e-3, key

    resumed = run_cli("train", tiny_recipe, "--name", "sharded", "--resume", *fsdp, "--master-port", "29542",
                      *common[2:], "--set", "training.max_steps=6")
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-4" in resumed.stderr
    quantized = run_cli("train", tiny_recipe, "--name", "qlora", "--set", "method.kind=qlora", *fsdp,
                        "--master-port", "29543", *common)
    assert quantized.exit_code == 0, quantized


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_unavailable_engines_are_refused_before_any_run(strategy, tiny_recipe, runs_dir):
    result = run_cli("train", tiny_recipe, "--set", f"training.distributed={strategy}")
    assert result.exit_code == 4, result
    assert strategy in result.stderr and ("CUDA" in result.stderr or "deepspeed" in result.stderr.lower())
    assert not (runs_dir / "tiny").exists()


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import ClusterConfig

    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# accelerate launch --config_file configs/accelerate/")
    cluster = ClusterConfig.from_yaml_file(str(config))
    assert cluster.num_processes >= 2
    if cluster.distributed_type.value == "DEEPSPEED":
        ds_file = REPO / cluster.deepspeed_config["deepspeed_config_file"]
        stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in config.stem
    if cluster.distributed_type.value == "FSDP":
        assert cluster.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
