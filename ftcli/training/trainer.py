"""TRL's trainers with ftcli's changes: a real-token count for every objective; for SFT length-grouped batches in random
order and TRL's fused LM head made fast on the CPU (ftcli/models/fused_head.py); for DPO, data tokenized by ftcli."""

from __future__ import annotations

from trl import DPOTrainer, SFTTrainer

from ftcli.data.packing import REAL_TOKENS_KEY
from ftcli.models.fused_head import prepare_fused_head
from ftcli.training.samplers import LengthBatchedSampler


class RealTokenCount:
    """Non-padding training tokens seen so far, summed over all processes; read by MetricsCallback.

    TRL's own num_tokens counts one row's width per packed batch (it reads position_ids.size(1)), so packed runs
    reported ~batch-size times too few tokens."""

    def __init__(self) -> None:
        self.total = 0


class CountsRealTokens:
    """Adds each training batch's non-padding tokens to `real_tokens` before the objective's own loss."""

    real_tokens: RealTokenCount

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        counted = inputs.pop(REAL_TOKENS_KEY, None)
        if model.training:
            if counted is None:
                mask = inputs.get("attention_mask")
                counted = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            counted = torch.as_tensor(counted, device=inputs["input_ids"].device).reshape(1)
            self.real_tokens.total += int(self.accelerator.gather_for_metrics(counted).sum().item())
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class FtcliSFTTrainer(CountsRealTokens, SFTTrainer):
    def __init__(self, *args, real_tokens: RealTokenCount, group_by_length: bool, **kwargs):
        self.real_tokens = real_tokens
        self.group_by_length = group_by_length
        prepare_fused_head()
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or dataset is None:
            return super()._get_train_sampler(train_dataset)
        import pyarrow.compute as pc

        lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy()
        return LengthBatchedSampler(lengths, self.args.per_device_train_batch_size, self.args.seed)


class FtcliDPOTrainer(CountsRealTokens, DPOTrainer):
    """DPO over pairs ftcli's data pipeline already validated, rendered, tokenized and truncated."""

    def __init__(self, *args, real_tokens: RealTokenCount, **kwargs):
        self.real_tokens = real_tokens
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset   # prompt_ids, chosen_ids, rejected_ids: what TRL's own preparation would produce
