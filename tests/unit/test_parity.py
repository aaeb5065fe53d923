"""Parity gates: near ties pass where plain argmax flips, and every planted defect is refused with exit 6."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import leftovers, make_run


def synthetic_logits(positions: int = 64, vocabulary: int = 500, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, positions, vocabulary, generator=generator) * 3
    return logits, torch.ones(1, positions, dtype=torch.long)


def test_a_near_tie_within_f16_rounding_passes_where_plain_argmax_disagrees():
    import torch

    from ftcli.models import parity

    reference, mask = synthetic_logits()
    # Position 5: the two best tokens 0.005 apart in the reference, as in a real f16 export of SmolLM2.
    top = reference[0, 5].topk(2).indices
    reference[0, 5, top[1]] = reference[0, 5, top[0]] - 0.005
    # The candidate: every logit rounded to float16 and moved by f16-sized noise, which swaps the near tie.
    candidate = reference.half().float() + 0.01 * torch.randn(reference.shape,
                                                              generator=torch.Generator().manual_seed(1))
    candidate[0, 5, top[1]] = candidate[0, 5, top[0]] + 0.01
    check = parity.compare(reference, candidate, mask, parity.BOUNDS["gguf_f16"])
    assert check.top_token_agreement < 1.0                   # what the old gate required, and failed
    assert check.agreement == 1.0 and check.kl_max < 1e-3
    assert check.failures(parity.BOUNDS["gguf_f16"]) == []
    # At f32 the same swap is not a tie: the exact bounds refuse it.
    assert parity.compare(reference, candidate, mask, parity.BOUNDS["gguf_f32"]).failures(parity.BOUNDS["gguf_f32"])


def test_a_clear_disagreement_is_not_a_tie():
    from ftcli.models import parity

    reference, mask = synthetic_logits()
    candidate = reference.clone()
    candidate[0, 7] = reference[0, 7].flip(-1)   # the reference's worst token becomes the candidate's best
    check = parity.compare(reference, candidate, mask, parity.BOUNDS["gguf_q8_0"])
    assert check.agreement == pytest.approx(63 / 64) and check.top_token_agreement == pytest.approx(63 / 64)
    assert check.kl_max > 1.0


@pytest.mark.parametrize("bounds", ["merge_float32", "gguf_f16", "gguf_bf16", "gguf_q8_0", "qlora_merge"])
def test_shuffled_logits_fail_every_gate(bounds):
    import torch

    from ftcli.models import parity

    reference, mask = synthetic_logits()
    candidate = reference[:, torch.randperm(64, generator=torch.Generator().manual_seed(2))]
    failures = parity.compare(reference, candidate, mask, parity.BOUNDS[bounds]).failures(parity.BOUNDS[bounds])
    assert any("top-token agreement" in failure for failure in failures)
    assert any("mean KL" in failure for failure in failures)


def test_identical_logits_are_exact_and_padding_is_ignored():
    from ftcli.models import parity

    reference, mask = synthetic_logits()
    candidate = reference.clone()
    mask[0, 40:] = 0
    candidate[0, 40:] = 0   # padding positions may hold anything
    check = parity.compare(reference, candidate, mask, parity.BOUNDS["merge_float32"])
    assert check.positions == 40 and check.agreement == check.top_token_agreement == 1.0
    assert check.kl_max == 0.0 and check.max_abs_logit_diff == 0.0


# ---------------------------------------------------------------------------------------------- planted defects


@pytest.fixture(scope="module")
def merged_lora(tmp_path_factory, tiny_model_dir):
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path_factory.mktemp("planted") / "runs", "planted", tiny_model_dir)
    merge_run(run)
    return run


def _export_refused(run, fmt: str = "gguf", quant: str = "f16") -> str:
    from ftcli.errors import QualityGateError
    from ftcli.export.exporters import export_run

    exports_before = run.read().get("exports")
    with pytest.raises(QualityGateError) as refused:
        export_run(run, fmt, quant=quant)
    assert refused.value.exit_code == 6
    assert not run.export_dir(fmt).exists() and leftovers(run.path) == []
    assert run.read().get("exports") == exports_before
    return str(refused.value)


@pytest.mark.slow
def test_gguf_with_a_wrong_vocabulary_is_refused(merged_lora, monkeypatch):
    import ftcli.export.gguf.vocab

    original = ftcli.export.gguf.vocab.vocabulary

    def swapped(tokenizer, vocab_size):
        tokens, types = original(tokenizer, vocab_size)
        the, sun = (tokenizer(word, add_special_tokens=False).input_ids[0] for word in (" the", " sun"))
        tokens[the], tokens[sun] = tokens[sun], tokens[the]   # two words of the check texts trade ids
        return tokens, types

    monkeypatch.setattr(ftcli.export.gguf.vocab, "vocabulary", swapped)
    message = _export_refused(merged_lora)
    assert "tokenizer splits the check texts differently" in message


@pytest.mark.slow
@pytest.mark.parametrize("defect", ["wrong", "missing"])
def test_gguf_with_a_wrong_or_missing_chat_template_is_refused(merged_lora, monkeypatch, defect):
    import gguf

    import ftcli.export.exporters
    from ftcli.export.gguf.writer import write_model_gguf

    if defect == "missing":
        monkeypatch.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, template: None)
    else:   # ChatML without the newline after each turn's end
        wrong = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        monkeypatch.setattr(ftcli.export.exporters, "write_gguf", lambda model_dir, path, **kwargs: write_model_gguf(
            model_dir, path, **{**kwargs, "chat_template": wrong}))
    message = _export_refused(merged_lora)
    assert "chat template it carries renders conversations differently" in message


def test_merge_with_a_lora_scale_off_by_a_factor_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    """Merged at alpha/r where the adapter trained at alpha/sqrt(r) (rsLoRA), or any other wrong scale."""
    from peft.tuners.lora import LoraLayer, LoraModel

    from ftcli.errors import QualityGateError
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path / "runs", "scale", tiny_model_dir)
    original = LoraModel.merge_and_unload

    def rescaled_merge(self, *args, **kwargs):
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.scaling = {name: value * 8 ** -0.5 for name, value in module.scaling.items()}
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "merge_and_unload", rescaled_merge)
    with pytest.raises(QualityGateError, match="merged model \\(fp32\\) does not reproduce") as refused:
        merge_run(run)
    assert refused.value.exit_code == 6 and "mean KL divergence" in str(refused.value)
    assert not run.merged_dir.exists() and "merge" not in run.read()


def test_gguf_lora_written_without_the_rslora_scale_is_refused(merged_lora, tiny_model_dir, tmp_path):
    from ftcli.errors import QualityGateError
    from ftcli.export.gguf.lora import check_lora_gguf, write_lora_gguf
    from ftcli.models.load import load_model
    from ftcli.models.run_model import parity_batch

    trained = tmp_path / "rslora-adapter"
    shutil.copytree(merged_lora.adapter_dir, trained)
    config = json.loads((trained / "adapter_config.json").read_text())
    (trained / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    # The defect: a writer that ignores rsLoRA writes alpha as if the scale were alpha/r.
    write_lora_gguf(merged_lora.adapter_dir, tiny_model_dir, tmp_path / "plain.gguf", quant="f32", name="rs")
    base = load_model(merged_lora.load_recipe().model, dtype="float32")
    with pytest.raises(QualityGateError) as refused:
        check_lora_gguf(tmp_path / "plain.gguf", adapter_dir=trained, base_model=base, base_dir=tiny_model_dir,
                        quant="f32", batch=parity_batch(merged_lora))
    message = str(refused.value)
    assert "adapter.lora.alpha is 16.0" in message and "with the file applied to the base" in message


def test_qlora_adapter_merged_into_the_wrong_base_is_refused(tmp_path, tiny_model_dir, tokenizer_dir, monkeypatch):
    """The fp32 base loaded for the merge is not the model the adapter was trained on (a resolution bug): the
    merged model no longer reproduces the trained 4-bit model."""
    from helpers import build_tiny_llama

    import ftcli.models.load
    from ftcli.errors import QualityGateError
    from ftcli.export.merge import merge_run
    from ftcli.recipe.schema import ModelConfig

    run = make_run(tmp_path / "runs", "qlora-wrong-base", tiny_model_dir, "qlora")
    other = build_tiny_llama(tmp_path / "other-llama", tokenizer_dir, seed=5)
    load_model = ftcli.models.load.load_model

    def wrong_base(config, **kwargs):
        return load_model(ModelConfig(path=str(other)) if kwargs.get("dtype") == "float32" else config, **kwargs)

    monkeypatch.setattr(ftcli.models.load, "load_model", wrong_base)
    with pytest.raises(QualityGateError, match="dequantized 4-bit base does not reproduce") as refused:
        merge_run(run)
    assert refused.value.exit_code == 6 and not run.merged_dir.exists()
