"""Turn a .gguf file into a cached plain safetensors folder, once, verified against the GGUF-loaded model."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from ftcli.atomic import atomic_write_json, staged_dir
from ftcli.console import note
from ftcli.errors import NotAvailableError, QualityGateError

CONVERSION_RECORD = "ftcli-conversion.json"  # written last inside a converted folder: its presence means complete
CONVERSION_FORMAT = 1  # bump to force every cached conversion to be redone
PROBE_TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
# fp32 both sides and the same kernels: the copy should be bit-exact; allow rounding noise only.
MAX_PROBE_DIFF = 1e-4


class ConversionMismatch(QualityGateError):
    """The converted copy does not reproduce the GGUF model's logits (exit 6; nothing is cached)."""


def conversion_key(gguf_path: Path) -> str:
    """Changes when the file is replaced (size or mtime) or when ftcli's conversion changes."""
    stat = gguf_path.stat()
    source = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_FORMAT}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def converted_dir_for(gguf_path: Path, cache_root: Path) -> Path:
    return cache_root / "converted" / f"{gguf_path.stem}-{conversion_key(gguf_path)}"


def is_converted(folder: Path) -> bool:
    return (folder / CONVERSION_RECORD).is_file()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Two processes converting the same file wait for each other instead of converting twice."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(gguf_path: Path, cache_root: Path, *, label: str | None = None) -> Path:
    """The cached safetensors folder for `gguf_path`, converting (about 20 s for 135M parameters) on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise NotAvailableError(f"GGUF file not found: {gguf_path}", hint="check model.path in the recipe")
    target = converted_dir_for(gguf_path, cache_root)
    if is_converted(target):
        return target
    with _exclusive(target.with_name(target.name + ".lock")):
        if is_converted(target):  # another process finished it while we waited
            return target
        from rich.console import Console

        console = Console(stderr=True, soft_wrap=True)
        message = f"converting {label or gguf_path.name} to safetensors in {target.parent} (once)"
        if console.is_terminal:
            with console.status(message + " ..."):
                _convert(gguf_path, target)
        else:
            note(console, message)
            _convert(gguf_path, target)
            note(console, f"converted {label or gguf_path.name}")
    return target


def _load_gguf(gguf_path: Path):
    """(tokenizer, model) read from the GGUF file, dequantized to float32."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     **_dequantize_kwargs())
    except (ValueError, KeyError, OSError) as exc:  # unsupported architecture, tokenizer or a broken file
        raise NotAvailableError(
            f"transformers {transformers.__version__} cannot read {gguf_path}: {exc}".split("\n")[0],
            hint="use a GGUF of a supported architecture (llama, mistral, qwen2, ...) or a safetensors folder",
        ) from exc
    return tokenizer, model


def _convert(gguf_path: Path, target: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    with _transformers_bars_off():
        tokenizer, gguf_model = _load_gguf(gguf_path)
        gguf_model.eval()
        probe = tokenizer(PROBE_TEXT, return_tensors="pt")
        with torch.no_grad():
            reference = gguf_model(**probe).logits

        # A fresh model built from the config carries no GGUF quantization marker, so it can be saved normally.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(gguf_model.state_dict(), strict=True)
        fresh.tie_weights()
        fresh.generation_config = gguf_model.generation_config
        _complete_generation_config(fresh.generation_config, tokenizer)
        del gguf_model

        with staged_dir(target) as staging:
            fresh.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            # Verify what was written, not what is in memory: reload the folder the way ftcli will load it.
            copy = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32, use_safetensors=True)
            copy.eval()
            with torch.no_grad():
                converted = copy(**probe).logits
            diff = (converted - reference).abs().max().item()
            same_argmax = bool(torch.equal(converted.argmax(-1), reference.argmax(-1)))
            if not diff <= MAX_PROBE_DIFF or not same_argmax:
                raise ConversionMismatch(
                    f"converting {gguf_path} changed the model: max |logit difference| {diff:.3g} "
                    f"(allowed {MAX_PROBE_DIFF}), same next tokens: {same_argmax}",
                    hint="nothing was cached; please report this with the GGUF file's origin",
                )
            atomic_write_json(staging / CONVERSION_RECORD, {
                "format": CONVERSION_FORMAT,
                "source": str(gguf_path.resolve()),
                "source_size": gguf_path.stat().st_size,
                "source_mtime_ns": gguf_path.stat().st_mtime_ns,
                "transformers": transformers.__version__,
                "probe_max_abs_logit_diff": diff,
            })


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    """Our one status line replaces transformers' per-tensor bars (the GGUF one calls tqdm directly)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _dequantize_kwargs() -> dict:
    """Ask for plain dense weights (transformers 5 may otherwise keep GGUF blocks packed when kernels exist)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _complete_generation_config(generation_config, tokenizer) -> None:
    """Generation stops at the chat EOS (<|im_end|> for ChatML models) and pads with the tokenizer's pad."""
    if generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        generation_config.eos_token_id = tokenizer.eos_token_id
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def read_conversion_record(folder: Path) -> dict:
    return json.loads((Path(folder) / CONVERSION_RECORD).read_text(encoding="utf-8"))

