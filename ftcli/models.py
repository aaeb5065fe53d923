"""Resolve a model reference (hub id, local folder, .gguf file, builtin name) and load model and tokenizer."""
# CONTRACT (owned by the models helper; replace the stubs, keep the signatures):

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftcli.recipe import ModelConfig, QuantizationConfig

CACHE_DIR_ENV = "FTCLI_CACHE_DIR"  # default ~/.cache/ftcli


def cache_dir() -> Path:
    """$FTCLI_CACHE_DIR, else ~/.cache/ftcli (builtin conversions, tokenized data)."""
    raise NotImplementedError


@dataclass(frozen=True)
class ResolvedModel:
    reference: str        # what the recipe said
    local_dir: Path       # a plain Hugging Face folder with safetensors weights and tokenizer
    kind: str             # builtin | hub | local | gguf
    fingerprint: str      # stable hash of config + weights file names/sizes (identifies the base model)


def resolve_model(model: ModelConfig, *, trust_remote_code: bool = False) -> ResolvedModel:
    """Find or build a local folder for the model; NotAvailableError (exit 4) with one clear line otherwise."""
    raise NotImplementedError


def load_tokenizer(model: ModelConfig, *, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token set (never the EOS token's id being masked by accident)."""
    raise NotImplementedError


def load_model(model: ModelConfig, *, quantization: QuantizationConfig | None = None,
               trust_remote_code: bool = False, dtype: str | None = None, device: str | None = None):
    """Load the base model: safetensors only, dtype auto (bf16 on capable GPUs, fp32 on CPU), 4/8-bit when asked."""
    raise NotImplementedError


def resolve_device(requested: str = "auto") -> str:
    """cpu or cuda."""
    raise NotImplementedError


def resolve_dtype(requested: str, device: str) -> str:
    """float32 | bfloat16 | float16 for 'auto' and explicit values."""
    raise NotImplementedError


def linear_module_names(model) -> list[str]:
    """Sorted unique leaf names of the model's linear layers (q_proj, v_proj, ...), lm_head excluded."""
    raise NotImplementedError
