"""ftcli merge: parity of LoRA, DoRA, IA3 and QLoRA merges, refusals, reuse, and writes that never half-happen."""

from __future__ import annotations

import errno
import json
import stat
from pathlib import Path

import pytest
from helpers import leftovers, make_run


def adapter_and_merged_logits(run, texts=("Say red blue", "The capital of France is")):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = run.load_recipe()
    tokenizer = AutoTokenizer.from_pretrained(run.merged_dir)
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32)
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(base, run.adapter_dir)(**batch).logits
        merged = AutoModelForCausalLM.from_pretrained(run.merged_dir, dtype=torch.float32)(**batch).logits
    return adapter, merged, batch["attention_mask"].bool()


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merge_parity(kind, tmp_path, tiny_model_dir):
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path / "runs", f"m-{kind}", tiny_model_dir, kind)
    result = merge_run(run)
    assert result["reused"] is False
    merge = run.read()["merge"]
    assert merge["parity"]["merge"]["agreement"] == 1.0 and merge["parity"]["merge"]["kl_max"] < 1e-4
    assert merge["parity"]["merge"]["max_abs_logit_diff"] <= 1e-3
    assert merge["parity"]["saved"]["agreement"] == 1.0
    assert merge["parity"]["merge"]["positions"] > 100
    assert merge["agreement"] == 1.0 and merge["compared_with"] == "base + adapter"
    # Independently of ftcli's own check: the merged folder loads in plain transformers and matches PEFT.
    adapter, merged, mask = adapter_and_merged_logits(run)
    assert (adapter - merged).abs().amax(-1)[mask].max() < 1e-3
    # The adapter really changes the model, so agreeing is not trivially true.
    import torch
    from transformers import AutoModelForCausalLM

    base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(
        **{"input_ids": torch.tensor([[1, 2, 3, 4]])}).logits
    merged_logits = AutoModelForCausalLM.from_pretrained(run.merged_dir, dtype=torch.float32)(
        **{"input_ids": torch.tensor([[1, 2, 3, 4]])}).logits
    assert (base_logits - merged_logits).abs().max() > 1e-3
    files = {p.name for p in run.merged_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "chat_template.jinja", "README.md"} <= files
    for path in run.merged_dir.iterdir():
        assert path.stat().st_mode & stat.S_IROTH, f"{path.name} is not readable by others"
    card = (run.merged_dir / "README.md").read_text()
    assert f"kind: {kind}" in card and "top-token agreement (ties respected)" in card and "mean KL" in card
    assert (run.merged_dir / "chat_template.jinja").read_text() == run.chat_template_path.read_text()
    assert leftovers(run.path) == []


@pytest.mark.slow   # two merges and their parity checks
def test_merge_reuses_up_to_date_output_and_force_merges_again(tmp_path, tiny_model_dir):
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path / "runs", "reuse", tiny_model_dir)
    merge_run(run)
    stamp = (run.merged_dir / "model.safetensors").stat().st_mtime_ns
    again = merge_run(run)
    assert again["reused"] is True
    assert (run.merged_dir / "model.safetensors").stat().st_mtime_ns == stamp
    forced = merge_run(run, force=True)
    assert forced["reused"] is False
    # A different adapter is never mistaken for the merged one.
    (run.adapter_dir / "adapter_config.json").write_text(
        (run.adapter_dir / "adapter_config.json").read_text().replace('"lora_alpha": 16', '"lora_alpha": 12'))
    assert merge_run(run)["reused"] is False


def test_half_precision_merge(tmp_path, tiny_model_dir):
    from ftcli.export.merge import ensure_merged, merge_run

    run = make_run(tmp_path / "runs", "half", tiny_model_dir)
    result = merge_run(run, dtype="bfloat16")
    config = json.loads((run.merged_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert result["parity"]["merge"]["agreement"] == 1.0
    saved = result["parity"]["saved"]
    assert saved["fmt"] == "bfloat16" and saved["agreement"] >= 0.97 and 0 < saved["kl_mean"] < 1e-2
    # Exports take the merge the user made; a plain `ftcli merge` goes back to the recipe's dtype.
    with run.lock():
        assert ensure_merged(run, any_settings=True)["reused"] is True
    assert merge_run(run)["dtype"] == "float32"


def test_free_space_is_checked_before_any_work(tmp_path, tiny_model_dir, monkeypatch):
    import shutil as shutil_module

    from ftcli.atomic import DiskFullError
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path / "runs", "tight", tiny_model_dir)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=1024))
    with pytest.raises(DiskFullError, match="not enough free space"):
        merge_run(run)
    assert not run.merged_dir.exists() and "merge" not in run.read()


def test_qlora_merge_parity_for_both_bases(tmp_path, tiny_model_dir):
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path / "runs", "qlora", tiny_model_dir, "qlora")
    dequantized = merge_run(run)
    assert dequantized["qlora_base"] == "dequantized"
    trained = dequantized["parity"]["trained_4bit"]
    assert trained["agreement"] >= 0.95 and trained["kl_mean"] < 2e-2
    assert dequantized["kl_mean"] == trained["kl_mean"]   # the headline figure
    original = merge_run(run, qlora_base="original")
    assert original["reused"] is False and run.read()["merge"]["qlora_base"] == "original"
    # Merging into the original weights drifts further from the trained 4-bit model than the default.
    drift = original["parity"]["trained_4bit"]
    assert drift["kl_mean"] > trained["kl_mean"]
    print(f"\nQLoRA tiny: dequantized {trained}, original {drift}")


def test_dequantize_like_training_reproduces_the_4bit_weights(tiny_model_dir):
    """Re-quantizing the fp32 weights gives exactly what the Linear4bit layers hold (read before any forward)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    from ftcli.export.qlora_merge import dequantize_like_training
    from ftcli.models.load import load_model
    from ftcli.recipe.schema import ModelConfig, QuantizationConfig

    config, quantization = ModelConfig(path=str(tiny_model_dir)), QuantizationConfig(double_quant=True)
    four_bit = load_model(config, quantization=quantization)
    held = {name: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for name, m in four_bit.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(held) == 14
    full = load_model(config, dtype="float32")
    dequantize_like_training(full, {name: 64 for name in held}, quantization, source_dtype="float32")
    modules = dict(full.named_modules())
    for name, weight in held.items():
        assert torch.equal(modules[name].weight.data, weight.float()), name


def test_failed_parity_leaves_previous_merge_intact(tmp_path, tiny_model_dir, monkeypatch):
    import torch
    from peft.tuners.lora import LoraModel

    from ftcli.errors import QualityGateError
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path / "runs", "gate", tiny_model_dir)
    merge_run(run)
    before = (run.merged_dir / "model.safetensors").read_bytes()
    original = LoraModel.merge_and_unload

    def sloppy_merge(self, *args, **kwargs):
        merged = original(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", sloppy_merge)
    with pytest.raises(QualityGateError, match="does not reproduce its reference"):
        merge_run(run, force=True)
    assert (run.merged_dir / "model.safetensors").read_bytes() == before
    assert leftovers(run.path) == []


def test_disk_full_during_merge_keeps_previous_output(tmp_path, tiny_model_dir, monkeypatch):
    import transformers

    from ftcli.atomic import DiskFullError
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path / "runs", "enospc", tiny_model_dir)
    merge_run(run)
    before = sorted((p.name, p.read_bytes()) for p in run.merged_dir.iterdir())
    record = run.read()["merge"]

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(DiskFullError, match="no space left") as caught:
        merge_run(run, force=True)
    assert caught.value.exit_code == 4
    assert sorted((p.name, p.read_bytes()) for p in run.merged_dir.iterdir()) == before
    assert run.read()["merge"] == record
    assert leftovers(run.path) == []


def test_cli_merge_refusals(cli_inproc, tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    make_run(root, "prefix", tiny_model_dir, "prefix")
    refused = cli_inproc("merge", "prefix", "--runs-dir", root)
    assert refused.exit_code == 2, refused
    assert "ftcli export prefix --format adapter" in refused.stderr
    assert not (root / "prefix" / "merged").exists()

    make_run(root, "unfinished", tiny_model_dir, status="interrupted")
    unfinished = cli_inproc("merge", "unfinished", "--runs-dir", root)
    assert unfinished.exit_code == 5, unfinished
    assert "interrupted" in unfinished.stderr

    wrong = cli_inproc("merge", "prefix", "--runs-dir", root, "--qlora-base", "original")
    assert wrong.exit_code == 2, wrong
