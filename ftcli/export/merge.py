"""`ftcli merge`: full-precision base + adapter -> merged/, with parity checks against the adapter model.

The base is always reloaded in full precision (fp32) and the adapter merged there with PEFT's merge_and_unload;
nothing is ever merged into 4-bit weights (bitsandbytes' CPU layers give wrong results for that). Then up to three
checks, each a gate of ftcli.models.parity (KL divergence and tie-aware top-token agreement on the check conversations;
parity.BOUNDS holds every bound):

- merge: base + adapter (unmerged) against the merged model, both fp32: the merge arithmetic ("merge_float32").
- saved: the merged/ folder as written (reloaded from disk) against base + adapter, at the merge dtype's bounds
  (float16/bfloat16 round every weight).
- trained_4bit (QLoRA only): the model as it was trained (the 4-bit base, loaded exactly as in training, + adapter)
  against the merged model ("qlora_merge", gated for the dequantized base only).

QLoRA (export.qlora_merge_base, --qlora-base):
- dequantized (default): the adapter learned a correction to the 4-bit weights, not to the original ones. So each
  base weight that bitsandbytes quantized at training time is quantized again the same way (quant type, block size,
  double quantization from the recipe's effective quantization section, from the dtype training loaded) and
  dequantized to fp32 before merging. The merged model then reproduces the trained model (it differs only because
  bitsandbytes computes in bf16 on the CPU).
- original: merge into the original full-precision base. The adapter's correction then lands on weights it was
  not trained with, and the merged model drifts from the trained one (README gives the figure). The drift is
  reported, not gated; choose this only when you want the original weights' precision back and accept it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

from ftcli.atomic import atomic_write_text, check_free_space, remove_stale_staging, staged_dir
from ftcli.console import note
from ftcli.errors import UsageError
from ftcli.hashing import update_with_file
from ftcli.models.load import DTYPE_BYTES
from ftcli.runs.rundir import CHAT_TEMPLATE_FILE, MODEL_CONFIG_FILE, now_iso

MERGE_DTYPES = ("float32", "float16", "bfloat16")
QLORA_BASES = ("dequantized", "original")
MODEL_CARD_FILE = "README.md"     # the Hugging Face model card inside merged/
BUG_HINT = ("this is a bug worth reporting; merged/ was left as it was and the adapter is intact "
            "(ftcli export RUN --format adapter)")
HEADLINE_REFERENCE = {"saved": "base + adapter", "trained_4bit": "quantized base + adapter, as trained"}


def merge_run(run, *, dtype: str | None = None, qlora_base: str | None = None, force: bool = False,
              console=None) -> dict:
    """Write run/merged atomically; record parity in run.json; QualityGateError (exit 6) when parity fails."""
    with run.lock():
        return ensure_merged(run, dtype=dtype, qlora_base=qlora_base, force=force, console=console)


def ensure_merged(run, *, dtype: str | None = None, qlora_base: str | None = None, force: bool = False,
                  any_settings: bool = False, console=None) -> dict:
    """merge_run for a caller that already holds the run lock: reuse an up-to-date merged/ or merge again.

    any_settings: reuse a merged/ of this very adapter whatever dtype / QLoRA base it was merged with (exports
    take the merge the user made); otherwise the settings must match too (the recipe's when not given).
    """
    from ftcli.models.methods import METHOD_TRAITS
    from ftcli.models.run_model import check_base_fingerprint

    run.require_adapter("merge")
    remove_stale_staging(run.merged_dir)  # what a killed merge left; the caller holds the run lock
    recipe = run.load_recipe()
    kind = recipe.method.kind
    if not METHOD_TRAITS[kind].mergeable:
        raise UsageError(
            f"run {run.name!r} uses {kind} tuning, which can't be merged into the model's weights: its adapter "
            "adds virtual tokens to every input instead of changing weights",
            hint=f"export the adapter instead: ftcli export {run.name} --format adapter",
        )
    dtype = dtype or recipe.export.merge_dtype
    if dtype not in MERGE_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(MERGE_DTYPES)}")
    quantization = recipe.effective_quantization
    if quantization is None and qlora_base is not None:
        raise UsageError(f"--qlora-base applies only to qlora runs; run {run.name!r} uses {kind}")
    if quantization is not None:
        qlora_base = qlora_base or recipe.export.qlora_merge_base
        if qlora_base not in QLORA_BASES:
            raise UsageError(f"--qlora-base {qlora_base!r} is not one of {', '.join(QLORA_BASES)}")

    base_info = check_base_fingerprint(run, recipe, trust_remote_code=recipe.model.trust_remote_code)
    adapter = adapter_signature(run, base_fingerprint=base_info["fingerprint"])
    signature = merge_signature(adapter, dtype=dtype, qlora_base=qlora_base)
    recorded = run.read().get("merge") or {}
    same = recorded.get("adapter_signature") == adapter if any_settings else recorded.get("signature") == signature
    if not force and same and run.has_merged_model():
        note(console, f"merged model is up to date in {run.merged_dir} (merge again with --force)")
        return {**recorded, "reused": True}

    check_free_space(run.path, estimate_merged_bytes(Path(base_info["local_dir"]), dtype))
    started = time.perf_counter()
    record = _merge(run, recipe, dtype=dtype, qlora_base=qlora_base, console=console)
    record.update(signature=signature, adapter_signature=adapter, base_fingerprint=base_info["fingerprint"],
                  merged_at=now_iso(), seconds=round(time.perf_counter() - started, 2))
    run.update(merge=record)
    return {**record, "reused": False}


def adapter_signature(run, *, base_fingerprint: str) -> str:
    """Changes whenever the adapter would merge differently: adapter files, chat template, base model."""
    digest = hashlib.sha256(base_fingerprint.encode())
    for path in sorted(run.adapter_dir.glob("adapter_*")) + [run.chat_template_path]:
        if path.is_file():
            digest.update(path.name.encode())
            update_with_file(digest, path)
    return digest.hexdigest()[:24]


def merge_signature(adapter: str, *, dtype: str, qlora_base: str | None) -> str:
    """The adapter's signature plus the merge settings: equal signatures mean an identical merged/."""
    return hashlib.sha256(json.dumps([adapter, dtype, qlora_base]).encode()).hexdigest()[:24]


def estimate_merged_bytes(base_dir: Path, dtype: str) -> int:
    """Weights at the merge dtype (from the base's safetensors size and stored dtype) plus room for the tokenizer."""
    config = json.loads((base_dir / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    stored = DTYPE_BYTES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), 4)
    weights = sum(path.stat().st_size for path in base_dir.glob("*.safetensors"))
    return int(weights * DTYPE_BYTES[dtype] / stored * 1.05) + 64 * 2**20


# ---------------------------------------------------------------------------------------------- the merge


def _merge(run, recipe, *, dtype: str, qlora_base: str | None, console) -> dict:
    """Merge in fp32, check the merge, then write merged/ at `dtype` and check it as saved; the merge record."""
    import torch

    from ftcli.models import parity
    from ftcli.models.quiet import quiet_libraries
    from ftcli.models.run_model import load_run_tokenizer, run_chat_template
    from ftcli.progress import progress

    quiet_libraries()
    template = run_chat_template(run)
    tokenizer = load_run_tokenizer(run, recipe, trust_remote_code=recipe.model.trust_remote_code)
    batch = parity.encode(tokenizer, parity.check_texts(template, tokenizer))
    quantized_reference = recipe.effective_quantization is not None
    with progress(console, "merging", total=3 + quantized_reference, unit="steps", estimate=False) as bar:
        if quantized_reference:
            bar.describe("the model as trained, for the reference logits")
        trained_logits, quantized = _trained_reference(run, recipe, batch, console)
        if quantized_reference:
            bar.advance()
        bar.describe("merging in float32 and checking the merge")
        merged, adapter_logits, checks = _merge_float32(run, recipe, batch, quantized, trained_logits, qlora_base,
                                                        console)
        bar.advance()

        bar.describe(f"writing {run.merged_dir.name}/ as {dtype}")
        merged = merged.to(getattr(torch, dtype))
        record = {"path": str(run.merged_dir), "dtype": dtype, "method": recipe.method.kind,
                  "qlora_base": qlora_base, "check_conversations": len(parity.CHECK_CONVERSATIONS)}
        with staged_dir(run.merged_dir) as staging:
            _write_merged(staging, merged, tokenizer, template)
            del merged  # free the fp32 model before the saved one loads
            gc.collect()
            bar.advance()
            bar.describe(f"reading {run.merged_dir.name}/ back and checking it")
            checks["saved"] = _check_saved(staging, recipe, batch, adapter_logits, dtype)
            bar.advance()
            record["parity"] = {name: check.as_dict() for name, check in checks.items()}
            # The headline figures: the merged model against the model as it was trained.
            headline = "trained_4bit" if "trained_4bit" in checks else "saved"
            record.update(checks[headline].as_dict(), compared_with=HEADLINE_REFERENCE[headline])
            atomic_write_text(staging / MODEL_CARD_FILE, model_card(run, record))
    note(console, f"merged into {run.merged_dir}: {checks['saved'].describe()} against base + adapter")
    return record


def _trained_reference(run, recipe, batch, console):
    """QLoRA: (the logits of the model as trained, 4-bit base + adapter; that quantized base); else (None, None)."""
    quantization = recipe.effective_quantization
    if quantization is None:
        return None, None
    from ftcli.export.qlora_merge import trained_model_logits

    note(console, f"loading the base in {quantization.bits}-bit as in training, for the reference logits")
    return trained_model_logits(run, recipe, batch)


def _merge_float32(run, recipe, batch, quantized, trained_logits, qlora_base: str | None, console):
    """The fp32 base (dequantized like training for QLoRA's default) + adapter, merged; checked against base +
    adapter, and against the trained model when given. (merged model, base + adapter logits, checks)."""
    from ftcli.export.qlora_merge import dequantize_like_training, training_dtype
    from ftcli.models import parity
    from ftcli.models.load import load_model
    from ftcli.models.run_model import with_adapter

    quantization = recipe.effective_quantization
    note(console, f"loading {recipe.model.path} in float32 and merging the {recipe.method.kind} adapter")
    base = load_model(recipe.model, dtype="float32", trust_remote_code=recipe.model.trust_remote_code)
    if quantization is not None and qlora_base == "dequantized":
        dequantize_like_training(base, quantized, quantization, source_dtype=training_dtype(recipe))
    model = with_adapter(base, run.adapter_dir)
    adapter_logits = parity.logits(model, batch)
    merged = model.merge_and_unload()
    merged_logits = parity.logits(merged, batch)

    mask = batch["attention_mask"]
    checks = {"merge": parity.compare(adapter_logits, merged_logits, mask, parity.BOUNDS["merge_float32"])}
    parity.require(checks["merge"], parity.BOUNDS["merge_float32"], what="the merged model (fp32)", hint=BUG_HINT)
    if trained_logits is not None:
        bounds = parity.BOUNDS["qlora_merge"]
        checks["trained_4bit"] = parity.compare(trained_logits, merged_logits, mask, bounds)
        note(console, f"against the trained {quantization.bits}-bit model ({qlora_base} base): "
                      + checks["trained_4bit"].describe())
        if qlora_base == "dequantized":
            parity.require(checks["trained_4bit"], bounds,
                           what=f"the model merged into the dequantized {quantization.bits}-bit base",
                           hint=BUG_HINT + "; --qlora-base original merges into the original weights instead")
    return merged, adapter_logits, checks


def _check_saved(folder: Path, recipe, batch, adapter_logits, dtype: str):
    """Reload what was written and compare it with base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftcli.models import parity

    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=bool(recipe.model.trust_remote_code))
    saved.eval()
    bounds = parity.BOUNDS[f"merge_{dtype}"]
    check = parity.compare(adapter_logits, parity.logits(saved, batch), batch["attention_mask"], bounds)
    del saved
    parity.require(check, bounds, what=f"the {dtype} merged model as saved",
                   hint=BUG_HINT if dtype == "float32" else "merge in float32: ftcli merge RUN --dtype float32")
    return check


# ---------------------------------------------------------------------------------------------- writing


def _write_merged(folder: Path, model, tokenizer, template: str | None) -> None:
    """Weights, config, generation config that stops at the template's EOS, tokenizer and the run's template."""
    generation = model.generation_config
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        generation.eos_token_id = [s for s in stops if s is not None] + [tokenizer.eos_token_id]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if template is not None:
        atomic_write_text(folder / CHAT_TEMPLATE_FILE, template)


def model_card(run, record: dict) -> str:
    """A Hugging Face model card: what was merged, how it was checked, and the run's full recipe."""
    info = run.read()
    base = info.get("base_model") or {}
    reference = base.get("reference", "")
    front = ["---", "library_name: transformers", f"tags: [ftcli, {record['method']}, merged]"]
    if base.get("kind") == "hub":
        front.append(f"base_model: {reference}")
    front.append("---")
    lines = [
        *front, "",
        f"# {run.name} (merged)", "",
        f"The {record['method']} adapter of the ftcli run `{run.name}` merged into its base model `{reference}` "
        f"(fingerprint {base.get('fingerprint', 'unknown')}); weights stored as {record['dtype']}."
        + (f" QLoRA merge base: {record['qlora_base']}." if record.get("qlora_base") else ""), "",
        "## Parity check", "",
        f"{record['check_conversations']} fixed conversations rendered through the run's chat template; every "
        "position compared.", "",
        "| check | top-token agreement (ties respected) | mean KL | max KL | max abs logit difference | positions |",
        "|---|---|---|---|---|---|",
    ]
    for name, check in record.get("parity", {}).items():
        lines.append(f"| {name} | {100 * check['agreement']:.1f}% | {check['kl_mean']:.3g} | {check['kl_max']:.3g} "
                     f"| {check['max_abs_logit_diff']:.3g} | {check['positions']} |")
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["", "## Training metrics", "", *(f"- {key}: {value}" for key, value in metrics.items())]
    recipe_text = run.recipe_path.read_text(encoding="utf-8") if run.recipe_path.exists() else ""
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", ""]
    return "\n".join(lines)
