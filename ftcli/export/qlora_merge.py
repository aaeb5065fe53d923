"""QLoRA merges: the model as trained (4-bit base + adapter) and the dequantized 4-bit weights it was trained on."""

from __future__ import annotations

import gc

from ftcli.errors import NotAvailableError


def trained_model_logits(run, recipe, batch):
    """Logits of the model as trained (quantized base + adapter) and {module name: 4-bit block size} of the
    quantized layers, read before any forward pass (the CPU backend repacks 4-bit weights in place on the first)."""
    import bitsandbytes as bnb

    from ftcli.models import parity
    from ftcli.models.load import load_model
    from ftcli.models.run_model import with_adapter

    base = load_model(recipe.model, quantization=recipe.effective_quantization,
                      trust_remote_code=recipe.model.trust_remote_code)
    quantized = {
        name: getattr(getattr(module.weight, "quant_state", None), "blocksize", None)
        for name, module in base.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }
    model = with_adapter(base, run.adapter_dir)
    logits = parity.logits(model, batch)
    del model, base
    gc.collect()
    return logits, quantized


def training_dtype(recipe) -> str:
    from ftcli.models.load import resolve_device, resolve_dtype

    return resolve_dtype(recipe.model.dtype, resolve_device(recipe.model.device))


def dequantize_like_training(model, quantized: dict[str, int | None], quantization, *, source_dtype: str) -> None:
    """Replace each weight bitsandbytes quantized at training time by its quantized-then-dequantized value,
    quantized the way training did (same dtype in, quant type, block size, double quantization)."""
    import bitsandbytes.functional as bnbf
    import torch

    modules = dict(model.named_modules())
    missing = sorted(set(quantized) - set(modules))
    if missing:
        raise NotAvailableError(f"the full-precision base has no module {missing[0]} that was quantized in training")
    with torch.no_grad():
        for name, blocksize in quantized.items():
            weight = modules[name].weight
            source = weight.data.to(getattr(torch, source_dtype))
            if quantization.bits == 4:
                packed, state = bnbf.quantize_4bit(source, blocksize=blocksize, quant_type=quantization.quant_type,
                                                   compress_statistics=quantization.double_quant)
                restored = bnbf.dequantize_4bit(packed, state)
            else:  # LLM.int8: row-wise absmax of the fp16 weight
                codes, scales, _ = bnbf.int8_vectorwise_quant(source.to(torch.float16))
                restored = bnbf.int8_vectorwise_dequant(codes, scales)
            weight.data = restored.to(weight.dtype).reshape(weight.shape)
