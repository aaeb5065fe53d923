"""ftcli's trainer projects only labelled positions through TRL's fused LM head on the CPU (ftcli/fused_head.py), and
gets the loss and gradients of projecting every position."""

from __future__ import annotations

import pytest

from test_train import METHOD_SETTINGS


def _settings(method: str) -> list[str]:
    """METHOD_SETTINGS's --set pairs as override strings."""
    args = METHOD_SETTINGS[method]
    return [args[i + 1] for i in range(0, len(args), 2)]


def _trainer_and_batch(tiny_recipe, tmp_path, method: str):
    from rich.console import Console

    from ftcli.recipe_loader import load_recipe
    from ftcli.runs import RunDir
    from ftcli.sft_trainer import RealTokenCount
    from ftcli.train import TrainingSession

    recipe = load_recipe(tiny_recipe, [*_settings(method), "training.precision=fp32"]).recipe
    session = TrainingSession(recipe, RunDir(tmp_path / "runs", "head"), trust_remote_code=False,
                              console=Console(quiet=True))
    session.prepare()
    trainer = session.make_trainer(RealTokenCount(), [])
    import torch

    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without a gradient to compare
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def _loss_grads_and_rows(trainer, batch, monkeypatch):
    """One forward and backward through the trainer's compute_loss; the rows TRL's fused head projected."""
    from trl.trainer import utils as trl_utils

    projected_rows = []
    chunked = trl_utils._ChunkedLogProbFunction

    class CountingChunked:
        @staticmethod
        def apply(hidden, *args):
            projected_rows.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingChunked)
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()})
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", chunked)
    return loss.item(), grads, projected_rows


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_only_labelled_positions_are_projected_with_the_same_loss_and_gradients(method, tiny_recipe, tmp_path,
                                                                                 monkeypatch):
    from trl.trainer import utils as trl_utils

    trainer, batch = _trainer_and_batch(tiny_recipe, tmp_path, method)
    assert hasattr(trl_utils._use_triton, "trl_choice"), "building ftcli's trainer installs the choice"
    labels = batch["labels"]
    labelled = int((labels[:, 1:] != -100).sum())
    every_position = labels.shape[0] * (labels.shape[1] - 1)
    assert labelled < every_position / 2, "the chat data must be mostly prompt for this test to mean anything"

    loss, grads, rows = _loss_grads_and_rows(trainer, batch, monkeypatch)
    # Prompt tuning prepends virtual tokens (never labelled), so its head sees more positions, but the same labels.
    assert rows == [labelled], (rows, labelled, every_position)

    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton.trl_choice)  # TRL's own: every position
    every_loss, every_grads, every_rows = _loss_grads_and_rows(trainer, batch, monkeypatch)
    assert every_rows[0] >= every_position
    assert loss == pytest.approx(every_loss, rel=1e-6)
    assert grads.keys() == every_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert (grad - every_grads[name]).abs().max() <= 1e-5 * max(every_grads[name].abs().max(), 1e-8), name


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_eval_scoring_through_the_fused_head_matches_full_logits(method, tiny_recipe, tmp_path):
    """ftcli eval scores with with_fused_head (as training does): the same NLL as cross-entropy over full logits,
    also where virtual tokens shift the positions (prompt tuning) or live in the cache (prefix tuning)."""
    import torch
    import torch.nn.functional as F

    from ftcli.fused_head import with_fused_head

    trainer, batch = _trainer_and_batch(tiny_recipe, tmp_path, method)
    model = trainer.model.eval()
    labels = batch["labels"]
    with torch.inference_mode():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = before[:, -labels.shape[1]:]   # prompt tuning returns a position per virtual token first
        full = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
        scored = with_fused_head(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        labels=labels, fused_lm_head=True)
        again = with_fused_head(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       labels=labels, fused_lm_head=True)   # installing twice changes nothing
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float(full) > 0
    assert -float(scored.log_probs.sum()) == pytest.approx(float(full), rel=1e-5)
    assert torch.equal(scored.log_probs, again.log_probs)
    assert torch.equal(plain, before), "the plain forward (generation) is unchanged"
