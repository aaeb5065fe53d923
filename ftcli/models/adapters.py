"""model.adapter: the adapter a run starts from (a finished run's, a PEFT folder, or a hub id), checked against the
recipe's method and base model before anything is trained."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import NotAvailableError, UsageError
from ftcli.hashing import sha256_folder
from ftcli.paths import is_local_path
from ftcli.runs.rundir import ADAPTER_CONFIG_FILE, RunDir

RUN_PREFIX = "run:"


@dataclass(frozen=True)
class StartingAdapter:
    """Where a run's adapter starts: the folder, what the recipe named, and the parent run (if it is one)."""

    path: Path
    reference: str
    run: str | None
    fingerprint: str                 # sha256 of the adapter folder's files
    base_fingerprint: str | None     # the parent run's base model (None when not a run)

    def lineage(self) -> dict:
        return {"adapter": self.reference, "run": self.run, "path": str(self.path), "fingerprint": self.fingerprint}


def resolve_adapter(reference: str, runs_root: Path) -> StartingAdapter:
    """The starting adapter named by model.adapter; RunStateError (5) for a run that has none, NotAvailableError (4)
    for a missing folder or an unreachable hub id."""
    if reference.startswith(RUN_PREFIX):
        run = RunDir.open(runs_root, reference[len(RUN_PREFIX):])
        run.require_adapter("start from its adapter")
        base = (run.read().get("base_model") or {}).get("fingerprint")
        return StartingAdapter(run.adapter_dir, reference, run.name, sha256_folder(run.adapter_dir), base)
    if is_local_path(reference):
        path = Path(os.path.expanduser(reference))
        if not (path / ADAPTER_CONFIG_FILE).is_file():
            raise NotAvailableError(f"model.adapter {reference}: no {ADAPTER_CONFIG_FILE} there",
                                    hint="point model.adapter at a PEFT adapter folder, or use run:NAME")
        return StartingAdapter(path, reference, None, sha256_folder(path), None)
    return _hub_adapter(reference)


def _hub_adapter(reference: str) -> StartingAdapter:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(reference.removeprefix("hf:")))
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotAvailableError(f"model.adapter {reference} is not available: {first_line}",
                                hint="check the id and your connection, or use a local folder or run:NAME") from None
    return StartingAdapter(path, reference, None, sha256_folder(path), None)


def check_adapter_fits(adapter: StartingAdapter, method, base_fingerprint: str) -> None:
    """UsageError (exit 2) when the starting adapter is not what the recipe's method describes, or when a parent
    run trained it on another base model."""
    if adapter.base_fingerprint is not None and adapter.base_fingerprint != base_fingerprint:
        raise UsageError(f"model.adapter {adapter.reference} was trained on another base model than model.path",
                         hint="use the parent run's base model in model.path")
    config = json.loads((adapter.path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA" or method.kind not in ("lora", "qlora", "dora"):
        raise UsageError(f"model.adapter {adapter.reference} is a {config.get('peft_type')} adapter; starting from an "
                         f"adapter needs a LoRA adapter and method lora, qlora or dora (the recipe has "
                         f"{method.kind})")
    wanted = {"r": method.r, "lora_alpha": method.alpha, "use_dora": method.kind == "dora",
              "use_rslora": method.rslora}
    different = [f"{name} {config.get(name)!r} (the recipe's method: {value!r})" for name, value in wanted.items()
                 if config.get(name, False if isinstance(value, bool) else None) != value]
    if different:
        raise UsageError(f"model.adapter {adapter.reference} differs from the recipe's method: {'; '.join(different)}",
                         hint="set method.r, method.alpha, method.kind and method.rslora as the starting adapter has "
                              "them (the adapter is trained on, not re-created)")
