"""Resolve a model reference (hub id, local folder, .gguf file, builtin name) and load model and tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import NotAvailableError, UsageError
from ftcli.models.quiet import quiet_libraries
from ftcli.models.sources import (  # noqa: F401  (re-exported: part of this module's interface)
    BUILTINS,
    builtin_folder,
    builtin_gguf_path,
    fingerprint,
    hub_folder,
    require_safetensors,
)
from ftcli.paths import BUILTIN_PREFIX, HUB_PREFIX, cache_dir, is_local_path
from ftcli.recipe.schema import ModelConfig, QuantizationConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per weight of each model dtype


@dataclass(frozen=True)
class ResolvedModel:
    reference: str        # what the recipe said
    local_dir: Path       # a plain Hugging Face folder with safetensors weights and tokenizer
    kind: str             # builtin | hub | local | gguf
    fingerprint: str      # stable hash of config + weights file names/sizes (identifies the base model)


# ---------------------------------------------------------------------------------------------- resolution


def resolve_model(model: ModelConfig, *, trust_remote_code: bool = False) -> ResolvedModel:
    """Find or build a local folder for the model; NotAvailableError (exit 4) with one clear line otherwise."""
    reference = model.path
    if reference.startswith(BUILTIN_PREFIX):
        kind, folder = "builtin", builtin_folder(reference[len(BUILTIN_PREFIX):], cache_dir())
    elif reference.startswith(HUB_PREFIX):
        kind = "hub"
        folder = hub_folder(reference[len(HUB_PREFIX):], model.revision, trust_remote_code=bool(trust_remote_code))
    elif reference.lower().endswith(".gguf"):
        from ftcli.models.gguf_import import ensure_converted

        kind, folder = "gguf", ensure_converted(Path(reference).expanduser(), cache_dir())
    elif Path(reference).expanduser().is_dir():
        kind, folder = "local", Path(reference).expanduser().resolve()
    elif is_local_path(reference):
        raise NotAvailableError(
            f"model folder not found: {reference}",
            hint="model.path must be an existing folder, a .gguf file, a hub id (org/name) or builtin:NAME",
        )
    else:
        kind, folder = "hub", hub_folder(reference, model.revision, trust_remote_code=bool(trust_remote_code))
    require_safetensors(folder, reference)
    return ResolvedModel(reference=reference, local_dir=folder, kind=kind, fingerprint=fingerprint(folder))


# ---------------------------------------------------------------------------------------------- devices


def resolve_device(requested: str = "auto") -> str:
    """cpu or cuda."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise NotAvailableError("model.device is cuda but no CUDA GPU is available",
                                hint="set model.device: auto or cpu")
    if requested not in ("cpu", "cuda"):
        raise UsageError(f"model.device must be auto, cpu or cuda (got {requested!r})")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    """float32 | bfloat16 | float16 for 'auto' and explicit values."""
    if requested == "auto":
        return "bfloat16" if _cuda_bf16(device) else "float32"
    if requested not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"model.dtype must be auto, float32, bfloat16 or float16 (got {requested!r})")
    if requested == "bfloat16" and device.startswith("cuda") and not _cuda_bf16(device):
        raise UsageError("model.dtype bfloat16 is not supported by this GPU", hint="use float16 or auto")
    return requested


def resolve_compute_dtype(requested: str, device: str) -> str:
    """bitsandbytes compute dtype: auto is bf16 on GPUs that support it, else fp32 (on the CPU bitsandbytes
    computes in bf16 internally whatever is asked)."""
    return ("bfloat16" if _cuda_bf16(device) else "float32") if requested == "auto" else requested


def resolve_precision(requested: str, device: str) -> str:
    """training.precision: auto is bf16 where the hardware computes it natively (GPUs that support it; CPUs with
    AVX512-BF16 or AMX, where bf16 autocast trained 1.5x faster at the same eval loss, bench/RESULTS.md), fp16 on
    older GPUs, fp32 on other CPUs."""
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bf16" if _cuda_bf16(device) else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


# FTCLI_CPU_BF16 overrides the detection below: "off" makes `precision: auto` behave as on a CPU without native
# bf16 (the fp32 path most users' CPUs take; CI runs it on every machine), "on" as on one with it.
CPU_BF16_ENV = "FTCLI_CPU_BF16"
CPU_BF16_CHOICES = {"auto": None, "on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), unless FTCLI_CPU_BF16 says otherwise."""
    setting = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if setting not in CPU_BF16_CHOICES:
        raise UsageError(f"{CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]!r} is not one of auto, on, off",
                         hint=f"unset {CPU_BF16_ENV} to detect the CPU's bf16 support")
    forced = CPU_BF16_CHOICES[setting]
    return detected_cpu_bf16() if forced is None else forced


def cpu_bf16_facts() -> dict:
    """For run.json: what the CPU offers and what FTCLI_CPU_BF16 made of it."""
    return {"detected": detected_cpu_bf16(), "override": os.environ.get(CPU_BF16_ENV), "used": cpu_has_native_bf16()}


def detected_cpu_bf16() -> bool:
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # a private torch API: treat any change in it as "no"
        return False


def _cuda_bf16(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _placement(device: str) -> str:
    """The concrete device of this process: its own GPU under a multi-process launcher (LOCAL_RANK)."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(model: ModelConfig, *, trust_remote_code: bool = False, padding_side: str = "right"):
    """The model's tokenizer with a pad token set (never the EOS token's id being masked by accident).

    When the tokenizer has no pad token, the unk token is used if there is one, else EOS. pad == eos is safe in
    ftcli because the data module builds labels explicitly from the attention structure (it never masks "every
    pad id"), so the real EOS at the end of a completion keeps its label. Padding is on the right for training.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(model, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.local_dir, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(model.path, exc, what="its tokenizer",
                         hint="the folder needs tokenizer files (tokenizer.json ...)") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_error(reference: str, exc: Exception, *, what: str = "the model", hint: str | None = None):
    """One clear line for a model that transformers refuses: custom code without the flag is a usage error."""
    first_line = str(exc).strip().split("\n")[0]
    if "trust_remote_code" in str(exc):
        return UsageError(
            f"{reference}: {what} needs custom code shipped with the model, which ftcli does not run by default",
            hint="read the model's .py files; if you trust them, set model.trust_remote_code: true and pass "
            "--trust-remote-code",
        )
    return NotAvailableError(f"{reference}: cannot load {what}: {type(exc).__name__}: {first_line}", hint=hint)


def bnb_config(quantization: QuantizationConfig, device: str):
    """The transformers BitsAndBytesConfig for a recipe's quantization section."""
    import torch
    from transformers import BitsAndBytesConfig

    quiet_libraries()
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, resolve_compute_dtype(quantization.compute_dtype, device)),
    )


def load_model(model: ModelConfig, *, quantization: QuantizationConfig | None = None,
               trust_remote_code: bool = False, dtype: str | None = None, device: str | None = None):
    """Load the base model: safetensors only, dtype auto (bf16 on capable GPUs, fp32 on CPU), 4/8-bit when asked."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(model, trust_remote_code=trust_remote_code)
    device = resolve_device(device or model.device)
    dtype = resolve_dtype(dtype or model.dtype, device)
    kwargs: dict = {
        "dtype": getattr(torch, dtype),
        "use_safetensors": True,
        "trust_remote_code": bool(trust_remote_code),  # None would make transformers prompt
    }
    if model.attn_implementation != "auto":
        kwargs["attn_implementation"] = model.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization, device)
        kwargs["device_map"] = {"": _placement(device)}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(resolved.local_dir, **kwargs)
    except (ImportError, ValueError, KeyError) as exc:  # custom code refused, unknown architecture, missing extra
        raise load_error(model.path, exc) from exc
    if quantization is None and device != "cpu":  # from_pretrained loads onto the CPU; .to() would only walk it
        loaded.to(_placement(device))
    return loaded


def linear_module_names(model) -> list[str]:
    """Sorted unique leaf names of the model's linear layers (q_proj, v_proj, ...), lm_head excluded."""
    import torch

    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style "linear" layers

        linear_types += (Conv1D,)
    except ImportError:
        pass
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not output and name.rsplit(".", 1)[-1] != "lm_head"
    }
    return sorted(names)
