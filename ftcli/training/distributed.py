"""The multi-process strategy of a run (DDP, FSDP, DeepSpeed ZeRO) as Trainer arguments, refused where unavailable."""

from __future__ import annotations

import importlib.util
import os

from ftcli.errors import NotAvailableError

DEEPSPEED_STAGES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a multi-process one (the launcher sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_strategy(requested: str, size: int) -> str:
    if size <= 1 and requested == "auto":
        return "none"
    return "ddp" if requested == "auto" else requested


def _deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}


def strategy_arguments(strategy: str, device: str) -> dict:
    """Extra TrainingArguments for the strategy; NotAvailableError (exit 4) when the engine or device is missing."""
    if strategy in ("none", "ddp"):
        # LoRA leaves most parameters frozen; scanning for unused ones each step only costs time.
        return {"ddp_find_unused_parameters": False} if strategy == "ddp" else {}
    if strategy == "fsdp":  # FSDP2 (fully_shard) runs with gloo on the CPU too: tested there
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"fsdp_version": 2, "cpu_ram_efficient_loading": True, "reshard_after_forward": True,
                                "transformer_layer_cls_to_wrap": None, "activation_checkpointing": False}}
    if device != "cuda":
        raise NotAvailableError(
            f"training.distributed: {strategy} needs CUDA GPUs and this machine trains on the {device}",
            hint="use training.distributed: ddp or fsdp (gloo on the CPU), or run on GPUs",
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise NotAvailableError(f"training.distributed: {strategy} needs DeepSpeed, which is not installed",
                                hint="pip install deepspeed, or use training.distributed: ddp or fsdp")
    return {"deepspeed": _deepspeed_config(DEEPSPEED_STAGES[strategy])}
