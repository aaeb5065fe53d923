"""`ftcli export`: adapter, merged, GGUF, GGUF LoRA and Ollama artifacts, each checked after writing."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ftcli.atomic import atomic_write_json, atomic_write_text, check_free_space, remove_stale_staging, staged_dir
from ftcli.console import note
from ftcli.errors import UsageError
from ftcli.models.load import DTYPE_BYTES
from ftcli.runs.rundir import ADAPTER_CONFIG_FILE, EXPORT_RECORD_FILE, now_iso

EXPORT_FORMATS = ("adapter", "merged", "gguf", "gguf-lora", "ollama")
GGUF_FORMATS = ("gguf", "gguf-lora", "ollama")
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # in a GGUF file, by quant
MODELFILE = "Modelfile"
HEADROOM = 64 * 2**20


def export_run(run, fmt: str, *, quant: str | None = None, out=None, console=None) -> dict:
    """Write the run as `fmt` into --out or export/FMT, atomically, check it, and record it in run.json."""
    from ftcli.export.gguf.writer import check_quant
    from ftcli.models.quiet import quiet_libraries

    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if quant is not None and fmt not in GGUF_FORMATS:
        raise UsageError(f"--quant applies to {', '.join(GGUF_FORMATS)}, not to --format {fmt}")
    run.require_adapter("export")
    recipe = run.load_recipe()
    if fmt in GGUF_FORMATS:
        quant = check_quant(quant or recipe.export.gguf_quant)
    target = Path(out).expanduser().resolve() if out is not None else run.export_dir(fmt)
    check_target(run, target)
    quiet_libraries()
    with run.lock():
        if target.is_relative_to(run.path):  # the run lock guards it: leftovers of a killed export can go
            remove_stale_staging(target)
        started = time.perf_counter()
        result = EXPORTERS[fmt](run, recipe, target, quant, console)
        result.update(format=fmt, path=str(target), exported_at=now_iso(),
                      seconds=round(time.perf_counter() - started, 2))
        run.modify(lambda info: info.update(exports={**(info.get("exports") or {}), fmt: result}))
    note(console, f"exported {fmt} to {target}")
    return result


def check_target(run, target: Path) -> None:
    """Refuse destinations whose replacement would destroy something: the run's own folders, or a folder that
    holds anything but a previous ftcli export."""
    own = [run.adapter_dir, run.merged_dir, run.checkpoints_dir, run.eval_dir]
    if target == run.path or run.path.is_relative_to(target) or any(target.is_relative_to(p) for p in own):
        raise UsageError(f"--out {target} would overwrite the run's own files", hint="pick a new or empty folder")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {target} is a file", hint="pick a new or empty folder")
    if target.is_dir() and any(target.iterdir()) and not (target / EXPORT_RECORD_FILE).is_file():
        raise UsageError(f"--out {target} is not empty and holds no earlier ftcli export; refusing to replace it",
                         hint="pick a new or empty folder")


# ---------------------------------------------------------------------------------------------- formats


def export_adapter(run, recipe, target: Path, quant, console) -> dict:
    """The PEFT adapter with base_model_name_or_path set to something loadable, plus tokenizer and template."""
    from ftcli.models.run_model import check_base_fingerprint

    base = check_base_fingerprint(run, recipe, trust_remote_code=recipe.model.trust_remote_code)
    loadable = base["reference"] if base.get("kind") == "hub" else base["local_dir"]
    check_free_space(target.parent, _folder_bytes(run.adapter_dir) + HEADROOM)
    with staged_dir(target) as staging:
        for path in run.adapter_dir.iterdir():
            if path.is_file():
                shutil.copy2(path, staging / path.name)
        config_path = staging / ADAPTER_CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = loadable
        atomic_write_json(config_path, config)
        _check_peft_config(staging)
        record = {"base_model_name_or_path": loadable, "method": recipe.method.kind}
        _write_record(staging, run, "adapter", record)
    return record


def export_merged(run, recipe, target: Path, quant, console) -> dict:
    """The merged model (merging first when merged/ is missing or stale), hard-linked where possible."""
    from ftcli.export.merge import ensure_merged

    merge = ensure_merged(run, any_settings=True, console=console)
    check_free_space(target.parent, _folder_bytes(run.merged_dir) + HEADROOM)
    with staged_dir(target) as staging:
        for path in run.merged_dir.iterdir():
            if path.is_file():
                _link_or_copy(path, staging / path.name)
        record = {"dtype": merge["dtype"], "merge_parity": merge.get("parity")}
        _write_record(staging, run, "merged", record)
    return record


def export_gguf(run, recipe, target: Path, quant: str, console) -> dict:
    """The merged model as one GGUF file, read back with transformers and compared with merged/."""
    with staged_dir(target) as staging:
        record = _write_checked_gguf(run, recipe, staging, quant, console, free_space_at=target.parent)
        _write_record(staging, run, "gguf", record)
    return record


def export_ollama(run, recipe, target: Path, quant: str, console) -> dict:
    """The GGUF plus a Modelfile whose template, system prompt and stop words come from the run's template."""
    from ftcli.export.modelfile import modelfile, turn_format
    from ftcli.models.run_model import load_run_tokenizer, run_chat_template

    tokenizer = load_run_tokenizer(run, recipe, trust_remote_code=recipe.model.trust_remote_code)
    fmt = turn_format(run_chat_template(run), tokenizer)  # refuse before any merging or writing
    with staged_dir(target) as staging:
        record = _write_checked_gguf(run, recipe, staging, quant, console, free_space_at=target.parent)
        atomic_write_text(staging / MODELFILE, modelfile(record["file"], fmt, tokenizer))
        record.update(modelfile=MODELFILE, default_system=fmt.default_system,
                      create_command=f"ollama create {run.name} -f {target / MODELFILE}")
        _write_record(staging, run, "ollama", record)
    return record


def export_gguf_lora(run, recipe, target: Path, quant: str, console) -> dict:
    """The LoRA adapter as a llama.cpp adapter GGUF, read back and checked against PEFT's own merge."""
    from ftcli.export.gguf.lora import check_lora_gguf, require_lora_capable, write_lora_gguf
    from ftcli.models.load import load_model
    from ftcli.models.run_model import check_base_fingerprint, parity_batch

    require_lora_capable(recipe.method.kind, run.name)
    base = check_base_fingerprint(run, recipe, trust_remote_code=recipe.model.trust_remote_code)
    base_dir = Path(base["local_dir"])
    check_free_space(target.parent, int(_folder_bytes(run.adapter_dir) * 1.1) + HEADROOM)
    with staged_dir(target) as staging:
        path = staging / f"{run.name}-lora-{quant}.gguf"
        note(console, f"writing the LoRA adapter as {path.name}")
        record = write_lora_gguf(run.adapter_dir, base_dir, path, quant=quant, name=run.name, console=console)
        base_model = load_model(recipe.model, dtype="float32", trust_remote_code=recipe.model.trust_remote_code)
        record["check"] = check_lora_gguf(path, adapter_dir=run.adapter_dir, base_model=base_model,
                                          base_dir=base_dir, quant=quant, batch=parity_batch(run, recipe))
        record["base_model"] = base["reference"]
        if recipe.method.kind == "qlora":
            record["note"] = ("trained against the 4-bit base: applied to a full-precision base GGUF it drifts the "
                              "way a merge into the original weights does (see ftcli merge --qlora-base)")
        _write_record(staging, run, "gguf-lora", record)
    return record


EXPORTERS: dict[str, Callable] = {
    "adapter": export_adapter,
    "merged": export_merged,
    "gguf": export_gguf,
    "gguf-lora": export_gguf_lora,
    "ollama": export_ollama,
}


# ---------------------------------------------------------------------------------------------- helpers


def _write_checked_gguf(run, recipe, staging: Path, quant: str, console, *, free_space_at: Path) -> dict:
    from ftcli.export.gguf.check import check_model_gguf
    from ftcli.export.merge import ensure_merged
    from ftcli.models.run_model import run_chat_template

    merge = ensure_merged(run, any_settings=True, console=console)
    merged_bytes = _folder_bytes(run.merged_dir, "*.safetensors")
    weights = merged_bytes / DTYPE_BYTES[merge["dtype"]]
    check_free_space(free_space_at, int(weights * BYTES_PER_WEIGHT[quant]) + HEADROOM)
    path = staging / f"{run.name}-{quant}.gguf"
    template = run_chat_template(run)
    note(console, f"writing {path.name}")
    record = write_gguf(run.merged_dir, path, quant=quant, chat_template=template, name=run.name, console=console)
    note(console, "reading it back with transformers to compare with the merged model")
    record["check"] = check_model_gguf(path, run.merged_dir, quant=quant, chat_template=template, console=console)
    record["merge_dtype"] = merge["dtype"]
    return record


def write_gguf(model_dir: Path, path: Path, **kwargs) -> dict:
    """The one place export writes a model GGUF (tests replace it to write a deliberately broken file)."""
    from ftcli.export.gguf.writer import write_model_gguf

    return write_model_gguf(model_dir, path, **kwargs)


def _check_peft_config(folder: Path) -> None:
    from peft import PeftConfig

    PeftConfig.from_pretrained(folder)  # raises on a config PEFT can't read


def _write_record(staging: Path, run, fmt: str, record: dict) -> None:
    atomic_write_json(staging / EXPORT_RECORD_FILE, {"run": run.name, "run_path": str(run.path), "format": fmt,
                                                     "written_at": now_iso(), **record})


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard links cost no space and are safe: ftcli never rewrites a file in place, it replaces whole folders."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(path.stat().st_size for path in Path(folder).glob(pattern) if path.is_file())
