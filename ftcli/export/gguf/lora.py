"""Write a PEFT LoRA adapter as a llama.cpp adapter GGUF, then read it back and rebuild the merged weights from it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import QualityGateError, UsageError

# Allowed max |rebuilt delta - PEFT's delta| relative to the largest delta entry, per tensor type.
MAX_RELATIVE_ERROR = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}


@dataclass(frozen=True)
class LoraPair:
    hf_module: str     # model.layers.0.self_attn.q_proj
    gguf_name: str     # blk.0.attn_q.weight
    a: object          # r x in (numpy float32)
    b: object          # out x r


def refuse(reason: str, hint: str = "export the merged model instead: ftcli export RUN --format gguf") -> None:
    raise UsageError(f"can't export this adapter as a llama.cpp LoRA GGUF: {reason}", hint=hint)


def read_lora_adapter(adapter_dir: Path, shape) -> tuple[dict, list[LoraPair], float]:
    """(adapter config, A/B pairs by llama tensor name, the alpha llama.cpp needs); UsageError for what a llama.cpp
    LoRA can't express (DoRA, IA3, prompt methods, modules_to_save, per-module alphas, embeddings)."""
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    from ftcli.export.gguf.writer import gguf_name

    config = json.loads((Path(adapter_dir) / CONFIG_NAME).read_text(encoding="utf-8"))
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        refuse(f"it is a {peft_type} adapter; llama.cpp adapters are plain LoRA")
    if config.get("use_dora"):
        refuse("DoRA's magnitude vectors have no llama.cpp equivalent")
    if config.get("modules_to_save"):
        refuse(f"it trains whole modules too (modules_to_save: {config['modules_to_save']})")
    if config.get("alpha_pattern"):
        refuse("it uses per-module alphas (alpha_pattern)")
    if config.get("lora_bias"):
        refuse("it trains LoRA biases")
    if config.get("use_rslora") and config.get("rank_pattern"):
        refuse("rank-stabilised scaling with per-module ranks can't be written as one alpha")

    # torch reads every dtype PEFT saves (QLoRA adapters come out in bfloat16; numpy has no bfloat16)
    saved = load_file(Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME)
    tensors = {key: value.float().numpy() for key, value in saved.items()}
    halves: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        for half in ("lora_A", "lora_B"):
            marker = f".{half}.weight"
            if key.endswith(marker):
                module = key[: -len(marker)].removeprefix("base_model.model.")
                halves.setdefault(module, {})[half] = value
                break
        else:
            refuse(f"it holds {key!r}, which is not a LoRA A/B matrix of a linear layer")
    pairs = []
    for module, parts in sorted(halves.items()):
        target = gguf_name(module + ".weight", shape.layers)
        if target is None or not target.startswith("blk.") or set(parts) != {"lora_A", "lora_B"}:
            refuse(f"module {module!r} has no llama.cpp LoRA counterpart")
        pairs.append(LoraPair(module, target, parts["lora_A"], parts["lora_B"]))
    if not pairs:
        refuse("it holds no LoRA matrices")
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        # PEFT scales by alpha / sqrt(r); llama.cpp by alpha / r: write the alpha that gives PEFT's scale.
        alpha *= math.sqrt(pairs[0].a.shape[0])
    return config, pairs, alpha


def write_lora_gguf(adapter_dir: Path, base_dir: Path, out_file: Path, *, quant: str, name: str,
                    console=None) -> dict:
    import gguf

    from ftcli.export.gguf.writer import (
        ARCHITECTURE,
        add_tensor,
        check_quant,
        file_type,
        finish_gguf,
        llama_shape,
        permute_rows,
        rows_permutation,
    )
    from ftcli.progress import progress

    check_quant(quant)
    shape = llama_shape(base_dir)
    _, pairs, alpha = read_lora_adapter(adapter_dir, shape)
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with progress(console, f"writing the LoRA GGUF ({quant})", total=len(pairs), unit="modules") as bar:
        for pair in pairs:
            heads = rows_permutation(pair.gguf_name, shape)
            # W' = W + s * B @ A: llama.cpp permutes W's rows for q/k, so B's rows follow and A stays.
            b = permute_rows(pair.b, heads) if heads is not None else pair.b
            add_tensor(writer, pair.gguf_name + ".lora_a", pair.a, quant)
            add_tensor(writer, pair.gguf_name + ".lora_b", b, quant)
            bar.advance()
        out_file = finish_gguf(writer, out_file)
    return {"file": out_file.name, "bytes": out_file.stat().st_size, "quant": quant, "alpha": alpha,
            "rank": int(pairs[0].a.shape[0]), "modules": len(pairs)}


def read_lora_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: float32 array in numpy row-major orientation}) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    arrays = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        arrays[tensor.name] = data.reshape(tuple(int(n) for n in reversed(tensor.shape))).astype("float32")
    return metadata, arrays


def check_lora_gguf(path: Path, *, adapter_dir: Path, base_model, base_dir: Path, quant: str, batch: dict) -> dict:
    """Read the file back and apply it as llama.cpp does (base + alpha/r * unpermute(B) @ A, with the file's own
    alpha): metadata and shapes as written, each rebuilt weight equal to PEFT's own merge of the adapter into
    `base_model` (a float32 model, consumed), and the rebuilt model's next-token distributions on `batch` (the check
    conversations) within parity.BOUNDS["gguf_lora_QUANT"] of base + adapter."""
    import numpy as np
    import torch

    from ftcli.export.gguf.writer import llama_shape, rows_permutation, unpermute_rows
    from ftcli.models import parity
    from ftcli.models.run_model import with_adapter

    shape = llama_shape(base_dir)
    _, pairs, alpha = read_lora_adapter(adapter_dir, shape)
    metadata, arrays = read_lora_gguf(path)
    problems = []
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", "llama")):
        if metadata.get(key) != want:
            problems.append(f"{key} is {metadata.get(key)!r}, not {want!r}")
    written_alpha = float(metadata.get("adapter.lora.alpha", float("nan")))
    if not math.isclose(written_alpha, alpha, rel_tol=1e-6):
        problems.append(f"adapter.lora.alpha is {written_alpha}, not {alpha} (the scale PEFT trained with)")

    modules = dict(base_model.named_modules())
    base_weights = {pair.hf_module: modules[pair.hf_module].weight.detach().clone().numpy() for pair in pairs}
    adapted = with_adapter(base_model, adapter_dir)
    expected_logits = parity.logits(adapted, batch)
    merged = adapted.merge_and_unload()
    merged_modules = dict(merged.named_modules())
    worst = 0.0
    for pair in pairs:
        a, b = arrays.get(pair.gguf_name + ".lora_a"), arrays.get(pair.gguf_name + ".lora_b")
        if a is None or b is None or a.shape != pair.a.shape or b.shape != pair.b.shape:
            problems.append(f"{pair.gguf_name}: A/B missing or of the wrong shape "
                            f"({None if a is None else a.shape}, {None if b is None else b.shape})")
            continue
        heads = rows_permutation(pair.gguf_name, shape)
        if heads is not None:
            b = unpermute_rows(b, heads)
        rebuilt = base_weights[pair.hf_module] + (written_alpha / a.shape[0]) * (b @ a)
        weight = merged_modules[pair.hf_module].weight
        expected = weight.detach().numpy()
        delta = np.abs(expected - base_weights[pair.hf_module]).max()
        worst = max(worst, float(np.abs(rebuilt - expected).max() / max(delta, 1e-12)))
        with torch.no_grad():
            weight.copy_(torch.from_numpy(rebuilt))   # the model as llama.cpp will compute it
    if worst > MAX_RELATIVE_ERROR[quant]:
        problems.append(f"base + A/B differs from PEFT's merge by {worst:.3g} of the largest change "
                        f"(allowed {MAX_RELATIVE_ERROR[quant]:g} at {quant})")
    bounds = parity.BOUNDS[f"gguf_lora_{quant}"]
    check = parity.compare(expected_logits, parity.logits(merged, batch), batch["attention_mask"], bounds)
    problems += [f"with the file applied to the base: {failure}" for failure in check.failures(bounds)]
    del merged, adapted
    if problems:
        raise QualityGateError("the LoRA GGUF does not reproduce the adapter: " + "; ".join(problems)
                               + f" ({check.describe()}); nothing was left in place",
                               hint="this is a bug worth reporting")
    return {"modules": len(pairs), "alpha": alpha, "max_relative_error": float(f"{worst:.6g}"),
            "parity": check.as_dict(), "bounds": bounds.describe()}


def require_lora_capable(kind: str, run_name: str = "RUN") -> None:
    """UsageError for methods whose adapters are not plain LoRA matrices."""
    from ftcli.models.methods import METHOD_TRAITS

    if METHOD_TRAITS[kind].virtual_tokens:
        refuse(f"{kind} tuning adds virtual tokens, not weight changes",
               hint=f"export the adapter instead: ftcli export {run_name} --format adapter")
    if not METHOD_TRAITS[kind].gguf_lora:
        refuse({"dora": "DoRA's magnitude vectors have no llama.cpp equivalent",
                "ia3": "IA3 rescales activations instead of adding low-rank matrices"}.get(kind, f"{kind} is not LoRA"),
               hint=f"export the merged model instead: ftcli export {run_name} --format gguf")
