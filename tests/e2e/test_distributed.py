"""Scale-out: `--nproc` through torch.distributed.run (DDP with gloo on the CPU), launcher configs, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_RECIPE, losses, memorisable_chat, metrics, run_cli, write_jsonl, write_recipe

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


def _two_nodes(recipe: Path, port: int, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """`ftcli train RECIPE --nnodes 2` as two machines would run it, each node one process, both on this machine
    (gloo over 127.0.0.1): node 1 started first, as a cluster scheduler might; (node 0's result, node 1's)."""
    def command(rank: int) -> list[str]:
        return [sys.executable, "-m", "ftcli", "train", str(recipe), "--nnodes", "2", "--node-rank", str(rank),
                "--master-addr", "127.0.0.1", "--master-port", str(port), *args]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # one core per node: two nodes on two cores
    node1 = subprocess.Popen(command(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             stdin=subprocess.DEVNULL)
    try:
        node0 = subprocess.run(command(0), capture_output=True, text=True, env=env, timeout=600,
                               stdin=subprocess.DEVNULL)
        out, err = node1.communicate(timeout=120)
    finally:
        node1.kill()
    return node0, subprocess.CompletedProcess(node1.args, node1.returncode, out, err)


def test_two_nodes_match_one_process_and_resume_across_both(single, tiny_recipe, runs_dir):
    """A two-machine run simulated on one machine: the same per-step losses as one process with the same global
    batch, one run written (by global rank 0), and a resume that both nodes take up."""
    args = ["--name", "nodes", "--set", "training.batch_size=4", *COMMON]
    node0, node1 = _two_nodes(tiny_recipe, 29551, *args, "--json")
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, node1.stderr[-3000:]
    assert json.loads(node0.stdout)["status"] == "completed"
    assert node1.stdout.strip() == ""   # global rank 1 reports nothing: the run is rank 0's
    info = json.loads((runs_dir / "nodes" / "run.json").read_text())
    assert info["distributed"] == {"world_size": 2, "strategy": "ddp", "global_batch_size": 8}
    assert info["cpu_threads"]["threads"] == 1
    steps = [m["step"] for m in metrics(runs_dir / "nodes") if "loss" in m]
    assert steps == [1, 2, 3, 4]   # one writer: every step logged once
    one, two = losses(single), losses(runs_dir / "nodes")
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), (step, one, two)

    node0, node1 = _two_nodes(tiny_recipe, 29552, *args[:4], "--resume", *COMMON[2:], "--set",
                              "training.max_steps=6")
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr[-3000:], node1.stderr[-3000:])
    assert "resuming from checkpoint-4" in node0.stderr
    assert json.loads((runs_dir / "nodes" / "run.json").read_text())["step"] == 6
    assert [m["step"] for m in metrics(runs_dir / "nodes") if "loss" in m] == [1, 2, 3, 4, 5, 6]


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
