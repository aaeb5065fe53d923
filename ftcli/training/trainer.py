"""TRL's trainers with ftcli's changes: a real-token count for every objective, data tokenized by ftcli's pipeline,
TRL's fused LM head made fast on the CPU (ftcli/models/fused_head.py); for SFT length-grouped batches in random
order; for KTO the KL answers drawn within each batch, so that batches can be shuffled; for every objective the
optimizer's parameter groups of ftcli/training/optimizer.py (LoRA+, lr_multipliers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

from ftcli.data.packing import REAL_TOKENS_KEY
from ftcli.models.fused_head import prepare_fused_head
from ftcli.training.optimizer import GroupedOptimizer
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
                counted = _attended_tokens(inputs)
            counted = torch.as_tensor(counted, device=self.accelerator.device).reshape(1)
            self.real_tokens.total += int(self.accelerator.gather_for_metrics(counted).sum().item())
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def _attended_tokens(inputs: dict):
    """The batch's non-padding tokens: its attention mask, or a pair's two (chosen_, rejected_attention_mask)."""
    import torch

    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    if "completion_mask" in inputs:   # GRPO: a prompt and its sampled completion
        return inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()
    masks = [inputs[f"{side}_attention_mask"] for side in ("chosen", "rejected") if f"{side}_attention_mask" in inputs]
    return sum(mask.sum() for mask in masks) if masks else torch.tensor(inputs["input_ids"].numel())


class FtcliSFTTrainer(GroupedOptimizer, CountsRealTokens, SFTTrainer):
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


class FtcliDPOTrainer(GroupedOptimizer, CountsRealTokens, DPOTrainer):
    """DPO over pairs ftcli's data pipeline already validated, rendered, tokenized and truncated."""

    def __init__(self, *args, real_tokens: RealTokenCount, **kwargs):
        self.real_tokens = real_tokens
        prepare_fused_head()
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset   # prompt_ids, chosen_ids, rejected_ids: what TRL's own preparation would produce


class FtcliKTOTrainer(GroupedOptimizer, CountsRealTokens, KTOTrainer):
    """KTO over answers ftcli's data pipeline already tokenized: unpaired (prompt_ids, completion_ids, label) or
    pairs, each pair counting as a desirable and an undesirable answer."""

    def __init__(self, *, real_tokens: RealTokenCount, args, processing_class, **kwargs):
        self.real_tokens = real_tokens
        prepare_fused_head()
        # TRL pairs each answer with another's prompt (the KL estimate) in a fixed order of the dataset, so it asks
        # for sequential sampling; UnpairedAnswers draws them within each batch instead, so the order may be random.
        sampling = args.train_sampling_strategy
        args.train_sampling_strategy = "sequential"
        super().__init__(args=args, processing_class=processing_class,
                         data_collator=UnpairedAnswers(processing_class, kl=args.loss_type == "kto"), **kwargs)
        self.args.train_sampling_strategy = sampling

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class FtcliGRPOTrainer(GroupedOptimizer, CountsRealTokens, GRPOTrainer):
    """GRPO over prompts ftcli rendered through the run's chat template (text, tokenized as they are, keeping their
    last `prompt_limit` tokens), sampling until any of the model's end-of-turn tokens."""

    def __init__(self, *, real_tokens: RealTokenCount, prompt_limit: int, model, processing_class, **kwargs):
        from ftcli.models.stop_tokens import stop_token_ids

        self.real_tokens = real_tokens
        self.prompt_limit = prompt_limit
        prepare_fused_head()
        model.generation_config.eos_token_id = stop_token_ids(processing_class, model)
        super().__init__(model=model, processing_class=processing_class, **kwargs)

    def _tokenize_prompts(self, prompts: list):
        encoded = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
        return [list(ids[-self.prompt_limit:]) for ids in encoded], None, {}


class UnpairedAnswers:
    """Batches KTO's collator expects from ftcli's rows: pairs split into their two answers, and each answer's KL
    answer (TRL's KL_completion_ids) the answer of another prompt in the same batch."""

    def __init__(self, tokenizer, *, kl: bool):
        from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

        self.kl = kl
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collate = DataCollatorForUnpairedPreference(pad_token_id=pad)

    def __call__(self, rows: list[dict]) -> dict:
        answers = [{"prompt_ids": row["prompt_ids"], "completion_ids": row["completion_ids"], "label": row["label"]}
                   for row in rows if "completion_ids" in row]
        paired = [row for row in rows if "chosen_ids" in row]
        # Every chosen answer first, then every rejected one: the neighbour before each answer is always another
        # pair's (for two pairs or more).
        answers += [{"prompt_ids": row["prompt_ids"], "completion_ids": row[side], "label": side == "chosen_ids"}
                    for side in ("chosen_ids", "rejected_ids") for row in paired]
        if self.kl:
            for index, answer in enumerate(answers):
                answer["KL_completion_ids"] = answers[index - 1]["completion_ids"]
        return self.collate(answers)


@contextlib.contextmanager
def datasets_cache_off() -> Iterator[None]:
    """TRL's older trainers map the dataset they are given; with the cache off, datasets writes those maps to
    temporary files, not beside ftcli's prepared data."""
    import datasets

    was_on = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_caching()


class TokenizedPairs:
    """ORPO and CPO (SimPO) rows from ftcli's tokenized pairs, in place of TRL's tokenize_row: the prompt, and each
    answer's sequence with its labels (the prompt's masked)."""

    def tokenize_row(self, feature, model=None) -> dict:
        from ftcli.data.types import IGNORE_INDEX

        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = list(feature[f"{side}_ids"])
            row[f"{side}_input_ids"] = prompt + answer
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
        return row


class AnswerOnlyNll:
    """ORPO's supervised term on the chosen answer's tokens only (data.train_on: completion), as SFT's loss; TRL's
    ORPOTrainer takes it over the prompt too (what data.train_on: all keeps)."""

    def concatenated_forward(self, model, batch):
        import torch.nn.functional as F

        from ftcli.data.types import IGNORE_INDEX

        outputs = super().concatenated_forward(model, batch)
        chosen_logits = outputs[2]          # the chosen rows' logits, each position predicting the next token
        labels = batch["chosen_labels"][:, 1:].to(chosen_logits.device)
        width = chosen_logits.shape[1]
        labels = F.pad(labels, (0, max(0, width - labels.shape[1])), value=IGNORE_INDEX)[:, :width]
        nll = F.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]).float(), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX)
        return (*outputs[:4], nll, *outputs[5:])


def make_pair_trainer(kind: str, *, real_tokens: RealTokenCount, answers_only: bool, **kwargs):
    """TRL's ORPO trainer, or its CPO trainer for SimPO, over ftcli's tokenized pairs (experimental in TRL, so
    imported only when used); `answers_only`: ORPO's supervised term on the chosen answer alone."""
    if kind == "orpo":
        from trl.experimental.orpo import ORPOTrainer as trl_trainer
    else:
        from trl.experimental.cpo import CPOTrainer as trl_trainer
    mixins = (AnswerOnlyNll,) if kind == "orpo" and answers_only else ()

    class FtcliPairTrainer(*mixins, TokenizedPairs, GroupedOptimizer, CountsRealTokens, trl_trainer):
        def __init__(self, **arguments):
            self.real_tokens = real_tokens
            with datasets_cache_off():
                super().__init__(**arguments)

    return FtcliPairTrainer(**kwargs)
