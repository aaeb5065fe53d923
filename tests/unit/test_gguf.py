"""GGUF writing: round trip, llama.cpp's q/k order, tokenizer metadata, refusals, LoRA adapters, Modelfiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import smollm_gguf_path


def read_metadata(path: Path, *arrays: str) -> tuple[dict, tuple]:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    return read_gguf_metadata(str(path), arrays)


@pytest.mark.slow
def test_f32_round_trip_is_bit_exact_and_metadata_is_right(merged_lora_run, tmp_path):
    from ftcli.export.gguf.check import check_model_gguf
    from ftcli.export.gguf.writer import write_model_gguf

    template = merged_lora_run.chat_template_path.read_text()
    path = tmp_path / "tied-f32.gguf"
    info = write_model_gguf(merged_lora_run.merged_dir, path, quant="f32", chat_template=template, name="tied")
    assert info["tensor_types"] == {"F32": 20}
    check = check_model_gguf(path, merged_lora_run.merged_dir, quant="f32", chat_template=template)
    assert check["bit_exact"] is True
    assert check["parity"]["agreement"] == 1.0 and check["parity"]["kl_max"] < 1e-9
    assert check["tokenizer_identical"] and check["chat_template_identical"]

    metadata, names = read_metadata(path)
    assert metadata["general.architecture"] == "llama" and metadata["general.type"] == "model"
    assert metadata["llama.attention.head_count"] == 4 and metadata["llama.attention.head_count_kv"] == 2
    assert metadata["llama.rope.freq_base"] == 10000.0 and metadata["llama.rope.dimension_count"] == 16
    assert metadata["llama.context_length"] == 1024 and metadata["llama.block_count"] == 2
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "smollm"
    assert metadata["tokenizer.ggml.eos_token_id"] == 2 and metadata["tokenizer.chat_template"] == template
    assert "output.weight" not in names and len(names) == 20  # tied: llama.cpp reuses token_embd


def test_qk_permutation_is_what_llama_cpp_and_transformers_expect():
    """Rows of a rotary head [x0..x7 | y0..y7] become pairs (x0 y0 x1 y1 ...), which transformers undoes on load."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from ftcli.export.gguf.writer import permute_rows, unpermute_rows

    heads, head_dim, width = 3, 8, 5
    weights = np.arange(heads * head_dim * width, dtype=np.float32).reshape(heads * head_dim, width)
    permuted = permute_rows(weights, heads)
    assert list(permuted[:4, 0]) == [weights[0, 0], weights[4, 0], weights[1, 0], weights[5, 0]]
    assert np.array_equal(unpermute_rows(permuted, heads), weights)
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, 6, num_kv_heads=heads)
    assert np.array_equal(undone, weights)


def test_tokenizer_metadata_equals_llama_cpps_own_smollm2_conversion(tiny_model_dir, tmp_path):
    """Every tokenizer key the embedded llama.cpp-made SmolLM2 GGUF has, we write identically."""
    import gguf

    from ftcli.export.gguf.vocab import add_tokenizer

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path=None, arch="llama")
    template = (tiny_model_dir / "chat_template.jinja").read_text()
    add_tokenizer(writer, tiny_model_dir, vocab_size=49152, chat_template=template)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.close()
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ours, _ = read_metadata(path, *arrays)
    reference, _ = read_metadata(smollm_gguf_path(), *arrays)
    compared = [key for key in reference if key.startswith("tokenizer.") and key != "tokenizer.ggml.add_space_prefix"]
    assert len(compared) >= 11
    for key in compared:
        assert list(np.atleast_1d(ours[key])) == list(np.atleast_1d(reference[key])), key


def test_unknown_pre_tokenizer_and_other_tokenizers_are_refused(tiny_model_dir, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    from ftcli.errors import NotAvailableError
    from ftcli.export.gguf.vocab import pre_tokenizer_name, require_byte_level_bpe

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert pre_tokenizer_name(tokenizer) == "smollm"
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(NotAvailableError, match="pre-tokenizer"):
        pre_tokenizer_name(tokenizer)

    folder = tmp_path / "spm"
    shutil.copytree(tiny_model_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(NotAvailableError, match="byte fallback"):
        require_byte_level_bpe(folder)


@pytest.mark.parametrize("change, reason", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}, "rope scaling"),
    ({"attention_bias": True}, "bias"),
    ({"hidden_act": "gelu"}, "activation"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "Llama-architecture"),
])
def test_models_it_cannot_write_correctly_are_refused(change, reason, tiny_model_dir, tmp_path):
    from ftcli.errors import NotAvailableError
    from ftcli.export.gguf.writer import write_model_gguf

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotAvailableError, match=reason):
        write_model_gguf(folder, tmp_path / "x.gguf", quant="f16", chat_template=None, name="x")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------- LoRA adapters


def test_lora_gguf_round_trip(merged_lora_run, tiny_model_dir, tmp_path):
    import gguf

    from ftcli.export.gguf.lora import check_lora_gguf, write_lora_gguf
    from ftcli.models.load import load_model
    from ftcli.models.run_model import parity_batch

    path = tmp_path / "lora.gguf"
    info = write_lora_gguf(merged_lora_run.adapter_dir, tiny_model_dir, path, quant="f32", name="tied")
    assert info["alpha"] == 16.0 and info["rank"] == 8 and info["modules"] == 8
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (8, 64)      # r x in
    assert shapes["blk.0.attn_q.weight.lora_b"] == (64, 8)      # out x r
    assert shapes["blk.1.attn_k.weight.lora_b"] == (32, 8)      # 2 KV heads x 16
    base = load_model(merged_lora_run.load_recipe().model, dtype="float32")
    check = check_lora_gguf(path, adapter_dir=merged_lora_run.adapter_dir, base_model=base, base_dir=tiny_model_dir,
                            quant="f32", batch=parity_batch(merged_lora_run))
    assert check["max_relative_error"] < 1e-5
    assert check["parity"]["agreement"] == 1.0 and check["parity"]["kl_mean"] < 1e-6


def test_lora_gguf_check_catches_a_missing_permutation(merged_lora_run, tiny_model_dir, tmp_path, monkeypatch):
    import ftcli.export.gguf.writer
    from ftcli.errors import QualityGateError
    from ftcli.export.gguf.lora import check_lora_gguf, write_lora_gguf
    from ftcli.models.load import load_model
    from ftcli.models.run_model import parity_batch

    path = tmp_path / "lora.gguf"
    with monkeypatch.context() as patch:
        patch.setattr(ftcli.export.gguf.writer, "permute_rows", lambda weights, heads: weights)
        write_lora_gguf(merged_lora_run.adapter_dir, tiny_model_dir, path, quant="f32", name="tied")
    base = load_model(merged_lora_run.load_recipe().model, dtype="float32")
    with pytest.raises(QualityGateError, match="differs from PEFT's merge") as failed:
        check_lora_gguf(path, adapter_dir=merged_lora_run.adapter_dir, base_model=base, base_dir=tiny_model_dir,
                        quant="f32", batch=parity_batch(merged_lora_run))
    assert "with the file applied to the base" in str(failed.value)   # the logits tell too


def test_bfloat16_rslora_adapter(merged_lora_run, tiny_model_dir, tmp_path):
    """QLoRA trainings save bfloat16 adapters; rank-stabilised scaling needs alpha * sqrt(r) for llama.cpp."""
    from safetensors.torch import load_file, save_file

    from ftcli.export.gguf.lora import check_lora_gguf, write_lora_gguf
    from ftcli.models.load import load_model
    from ftcli.models.run_model import parity_batch

    adapter = tmp_path / "adapter"
    shutil.copytree(merged_lora_run.adapter_dir, adapter)
    weights = adapter / "adapter_model.safetensors"
    save_file({key: value.bfloat16() for key, value in load_file(weights).items()}, weights)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    info = write_lora_gguf(adapter, tiny_model_dir, tmp_path / "rs.gguf", quant="f16", name="rs")
    assert info["alpha"] == pytest.approx(16.0 * 8 ** 0.5)
    base = load_model(merged_lora_run.load_recipe().model, dtype="float32")
    check_lora_gguf(tmp_path / "rs.gguf", adapter_dir=adapter, base_model=base, base_dir=tiny_model_dir, quant="f16",
                    batch=parity_batch(merged_lora_run))


def test_adapters_llama_cpp_cannot_apply_are_refused(merged_lora_run, tiny_model_dir, tmp_path):
    from ftcli.errors import UsageError
    from ftcli.export.gguf.lora import require_lora_capable, write_lora_gguf

    for kind in ("dora", "ia3", "prefix", "prompt"):
        with pytest.raises(UsageError):
            require_lora_capable(kind)
    with pytest.raises(UsageError, match="--format adapter"):
        require_lora_capable("prefix")
    require_lora_capable("qlora")
    adapter = tmp_path / "adapter"
    shutil.copytree(merged_lora_run.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value, reason in (("modules_to_save", ["lm_head"], "modules_to_save"),
                               ("use_dora", True, "DoRA"), ("alpha_pattern", {"q_proj": 4}, "alpha")):
        (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(UsageError, match=reason):
            write_lora_gguf(adapter, tiny_model_dir, tmp_path / "no.gguf", quant="f32", name="no")
    assert not (tmp_path / "no.gguf").exists()


# ---------------------------------------------------------------------------------------------- Modelfile


def render_go_template(template: str, messages: list[dict]) -> str:
    """Enough of Go's text/template for the templates ftcli writes: one range over .Messages, then literal text."""
    import re

    match = re.fullmatch(r"\{\{- range \.Messages \}\}(.*)\{\{ \.Role \}\}(.*)\{\{ \.Content \}\}(.*)\{\{ end \}\}(.*)",
                         template, flags=re.S)
    assert match, template
    before, between, after, tail = match.groups()
    return "".join(f"{before}{m['role']}{between}{m['content']}{after}" for m in messages) + tail


def test_modelfile_reproduces_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from ftcli.export.modelfile import go_template, modelfile, turn_format

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = tokenizer.chat_template
    fmt = turn_format(template, tokenizer)
    assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    ]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Ollama puts the Modelfile SYSTEM in front as a system message when a request has none.
        sent = messages if messages[0]["role"] == "system" else [
            {"role": "system", "content": fmt.default_system}, *messages]
        assert render_go_template(go_template(fmt), sent) == expected
    text = modelfile("tied-f16.gguf", fmt, tokenizer)
    assert text.startswith("FROM ./tied-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert f'SYSTEM """{fmt.default_system}"""' in text


def test_templates_it_cannot_translate_are_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    from ftcli.errors import UsageError
    from ftcli.export.modelfile import turn_format

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    llama2 = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
              "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    for template in (llama2, None):
        with pytest.raises(UsageError, match="Ollama"):
            turn_format(template, tokenizer)
