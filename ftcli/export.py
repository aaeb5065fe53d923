"""`ftcli export`: adapter, merged, GGUF, GGUF LoRA and Ollama artifacts, each checked after writing."""
# CONTRACT (owned by the merge/export helper; replace the stubs, keep the signatures):

from __future__ import annotations

EXPORT_FORMATS = ("adapter", "merged", "gguf", "gguf-lora", "ollama")


def export_run(run, fmt: str, *, quant: str | None = None, out=None, console=None) -> dict:
    raise NotImplementedError
