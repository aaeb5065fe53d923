"""TRL's fused LM head as ftcli runs it on the CPU (ftcli/models/fused_head.py): only labelled positions projected and
scored by ftcli's chunked cross-entropy, with the loss, gradients and metrics of TRL's own head over every position."""

from __future__ import annotations

import pytest
from helpers import METHOD_SETTINGS


def _settings(method: str) -> list[str]:
    """METHOD_SETTINGS's --set pairs as override strings."""
    args = METHOD_SETTINGS[method]
    return [args[i + 1] for i in range(0, len(args), 2)]


def _trainer_and_batch(tiny_recipe, tmp_path, method: str):
    from rich.console import Console

    from ftcli.recipe.loader import load_recipe
    from ftcli.runs.rundir import RunDir
    from ftcli.training.session import TrainingSession
    from ftcli.training.trainer import RealTokenCount

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
    logged = {name: trainer._metrics["train"][name][-1] for name in ("entropy", "mean_token_accuracy")}
    return loss.item(), grads, projected_rows, logged


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_only_labelled_positions_are_projected_with_the_same_loss_and_gradients(method, tiny_recipe, tmp_path,
                                                                                 monkeypatch):
    from trl.trainer import utils as trl_utils

    trainer, batch = _trainer_and_batch(tiny_recipe, tmp_path, method)
    assert hasattr(trl_utils._use_triton, "trl_choice"), "building ftcli's trainer installs both choices"
    assert hasattr(trl_utils._ChunkedLogProbFunction, "trl_function")
    labels = batch["labels"]
    labelled = int((labels[:, 1:] != -100).sum())
    every_position = labels.shape[0] * (labels.shape[1] - 1)
    assert labelled < every_position / 2, "the chat data must be mostly prompt for this test to mean anything"

    loss, grads, rows, logged = _loss_grads_and_rows(trainer, batch, monkeypatch)
    # Prompt tuning prepends virtual tokens (never labelled), so its head sees more positions, but the same labels.
    assert rows == [labelled], (rows, labelled, every_position)

    # TRL's own head: every position, scored by its tile folding.
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton.trl_choice)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction.trl_function)
    every_loss, every_grads, every_rows, every_logged = _loss_grads_and_rows(trainer, batch, monkeypatch)
    assert every_rows[0] >= every_position
    assert loss == pytest.approx(every_loss, rel=1e-6)
    assert logged == pytest.approx(every_logged, rel=1e-5) and logged["entropy"] > 0
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

    from ftcli.models.fused_head import with_fused_head

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


def test_cpu_scoring_matches_trls_kernel_with_every_option(monkeypatch):
    """ftcli's chunked cross-entropy against TRL's tile folding: bias, logit scale, soft-capping, temperature, every
    optional output, several chunks, gradients for the hidden states and the weight; and an empty batch."""
    import torch
    from trl.trainer import utils as trl_utils

    from ftcli.models import fused_head

    fused_head.prepare_fused_head()
    trl_function = trl_utils._ChunkedLogProbFunction.trl_function
    monkeypatch.setattr(fused_head, "CPU_CHUNK_LOGITS", 300 * 7)   # 7 positions of the 300-word vocabulary a chunk
    assert fused_head.cpu_chunk_positions(300) == 7                # (20 positions: three chunks)
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(20, 16), torch.randn(300, 16) * 0.3, torch.randn(300) * 0.1
    targets = torch.randint(0, 300, (20,))
    targets[3] = int((hidden[3] @ weight.T + bias).argmax())   # at least one top-1 hit
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    options = (0.7, 64, 5.0, 1.3, outputs)   # temperature, TRL's tile width, soft-cap, logit scale
    results = {}
    for name, score in (("ftcli", lambda *a: fused_head.cpu_label_log_probs(*a[:5], *a[6:])),
                        ("trl", trl_function.apply)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = score(h, w, bias, targets, *options)
        (out[0] * torch.linspace(0.5, 1.5, 20)).sum().backward()
        results[name] = (out, h.grad, w.grad)
    (ours, our_h, our_w), (theirs, their_h, their_w) = results["ftcli"], results["trl"]
    for name, mine, trls in zip(outputs, ours, theirs):
        if name == "is_top1":
            assert torch.equal(mine, trls) and bool(mine[3])
        else:
            torch.testing.assert_close(mine, trls, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(our_h, their_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(our_w, their_w, rtol=1e-4, atol=1e-6)

    empty = torch.zeros(0, 16, requires_grad=True)
    log_probs, *_ = fused_head.cpu_label_log_probs(empty, weight, None, targets[:0], 1.0, None, 1.0, ("log_probs",))
    assert log_probs.shape == (0,)
    log_probs.sum().backward()   # a batch without a labelled position still trains (a zero gradient)
    assert torch.equal(empty.grad, torch.zeros(0, 16))
