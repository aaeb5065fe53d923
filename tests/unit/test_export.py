"""ftcli export: every format loads where it should, checks catch broken files, failures leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import leftovers, make_run


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with large attention weights, so attention decides its next tokens: the default one barely
    looks at context, which would let a file with scrambled q/k rows pass by luck."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharp-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for projection, factor in (("q_proj", 8), ("k_proj", 8), ("v_proj", 4), ("o_proj", 4)):
                getattr(layer.self_attn, projection).weight.mul_(factor)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def logits_of(model, text: str = "<|im_start|>user\nSay red blue<|im_end|>\n"):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_adapter_export_loads_in_peft_from_its_own_config(merged_lora_run, tiny_model_dir):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from ftcli.export.exporters import export_run

    stale = merged_lora_run.export_dir("adapter").with_name(".tmp-adapter.killed-earlier")
    stale.mkdir(parents=True)
    result = export_run(merged_lora_run, "adapter")
    folder = Path(result["path"])
    assert folder == merged_lora_run.export_dir("adapter") and not stale.exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert {"adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    exported = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)   # finds the base by itself
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         merged_lora_run.adapter_dir)
    exported.name_or_path = original.name_or_path = str(folder)
    assert torch.equal(logits_of(exported), logits_of(original))
    assert merged_lora_run.read()["exports"]["adapter"]["path"] == str(folder)


def test_merged_export_loads_in_transformers(merged_lora_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ftcli.export.exporters import export_run

    out = tmp_path / "somewhere" / "merged-copy"
    result = export_run(merged_lora_run, "merged", out=out)
    assert result["path"] == str(out) and result["merge_parity"]["merge"]["agreement"] == 1.0
    copy = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_lora_run.merged_dir, dtype=torch.float32)
    assert torch.equal(logits_of(copy), logits_of(merged))
    assert (out / "chat_template.jinja").read_text() == merged_lora_run.chat_template_path.read_text()
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_gguf_lora_export_is_checked_and_recorded(merged_lora_run):
    from ftcli.export.exporters import export_run

    result = export_run(merged_lora_run, "gguf-lora", quant="f32")
    assert result["file"] == "tied-lora-f32.gguf" and result["check"]["max_relative_error"] < 1e-5
    assert (Path(result["path"]) / result["file"]).is_file()
    assert merged_lora_run.read()["exports"]["gguf-lora"]["check"] == result["check"]


def test_exports_that_would_destroy_something_are_refused(merged_lora_run, tmp_path, tiny_model_dir):
    from ftcli.errors import UsageError
    from ftcli.export.exporters import export_run

    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="holds no earlier ftcli export"):
        export_run(merged_lora_run, "adapter", out=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UsageError, match="run's own files"):
        export_run(merged_lora_run, "merged", out=merged_lora_run.adapter_dir)
    with pytest.raises(UsageError, match="--quant"):
        export_run(merged_lora_run, "adapter", quant="f16")
    with pytest.raises(UsageError, match="--format"):
        export_run(merged_lora_run, "safetensors")
    dora = make_run(merged_lora_run.runs_root, "dora", tiny_model_dir, "dora")
    with pytest.raises(UsageError, match="DoRA"):
        export_run(dora, "gguf-lora")
    assert not dora.export_dir("gguf-lora").exists()


def test_interrupted_export_leaves_previous_output_and_no_temporary_files(merged_lora_run, monkeypatch):
    import ftcli.export.exporters
    from ftcli.export.exporters import export_run
    from ftcli.runs.rundir import EXPORT_RECORD_FILE

    target = merged_lora_run.export_dir("gguf")
    target.mkdir(parents=True, exist_ok=True)
    (target / EXPORT_RECORD_FILE).write_text("{}")
    (target / "tied-f16.gguf").write_bytes(b"previous export")
    exports_before = merged_lora_run.read().get("exports")

    def killed_midway(model_dir, path, **kwargs):
        Path(path).write_bytes(b"GGUF half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ftcli.export.exporters, "write_gguf", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        export_run(merged_lora_run, "gguf")
    assert (target / "tied-f16.gguf").read_bytes() == b"previous export"
    assert sorted(p.name for p in target.iterdir()) == sorted([EXPORT_RECORD_FILE, "tied-f16.gguf"])
    assert leftovers(merged_lora_run.path) == []
    assert merged_lora_run.read().get("exports") == exports_before


@pytest.mark.slow
def test_gguf_without_qk_permutation_fails_the_check(sharp_model_dir, tmp_path, monkeypatch):
    """Prove the round-trip check can fail: llama.cpp's q/k row order left out scrambles attention."""
    import ftcli.export.exporters
    from ftcli.errors import QualityGateError
    from ftcli.export.exporters import export_run
    from ftcli.export.gguf.writer import write_model_gguf

    run = make_run(tmp_path / "runs", "sharp", sharp_model_dir)
    def without_permutation(model_dir, path, **kwargs):
        return write_model_gguf(model_dir, path, _permute_qk=False, **kwargs)

    monkeypatch.setattr(ftcli.export.exporters, "write_gguf", without_permutation)
    with pytest.raises(QualityGateError, match="top-token agreement") as caught:
        export_run(run, "gguf", quant="f32")
    agreement = float(str(caught.value).split("top-token agreement ")[-1].split("%")[0])
    assert agreement < 60, caught.value
    assert caught.value.exit_code == 6
    assert not run.export_dir("gguf").exists() and leftovers(run.path) == []
    assert "gguf" not in (run.read().get("exports") or {})


@pytest.mark.slow
def test_cli_ollama_export(cli_inproc, merged_lora_run):
    result = cli_inproc("export", "tied", "--format", "ollama", "--quant", "q8_0",
                        "--runs-dir", merged_lora_run.runs_root, "--json")
    assert result.exit_code == 0, result
    document = result.json()
    folder = Path(document["path"])
    assert folder == merged_lora_run.export_dir("ollama")
    assert document["check"]["parity"]["agreement"] >= 0.97 and document["tensor_types"]["Q8_0"] == 15
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tied-q8_0.gguf\n") and (folder / "tied-q8_0.gguf").is_file()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert merged_lora_run.read()["exports"]["ollama"]["quant"] == "q8_0"


def test_cli_refusals_map_to_exit_codes(cli_inproc, tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    make_run(root, "prefix", tiny_model_dir, "prefix")
    merged = cli_inproc("export", "prefix", "--format", "merged", "--runs-dir", root)
    assert merged.exit_code == 2, merged
    assert "--format adapter" in merged.stderr
    missing = cli_inproc("export", "nothing-here", "--format", "adapter", "--runs-dir", root)
    assert missing.exit_code == 5, missing
