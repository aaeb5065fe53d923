"""LoftQ for QLoRA: each LoRA pair fitted, by a truncated SVD, to what the 4-bit quantization took from its weight."""

from __future__ import annotations

from pathlib import Path

from ftcli.errors import NotAvailableError

PEFT_PREFIX = "base_model.model."   # what PEFT's LoRA wrapper puts before the base model's module names


class FullPrecisionWeights:
    """The base model's original tensors, read one at a time from its safetensors files (never all in memory)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))

    def get(self, name: str):
        from safetensors import safe_open

        # A checkpoint may leave out the wrapper's own prefix (a bare LlamaModel's "layers.0..." under "model.").
        for candidate in (name, name.split(".", 1)[-1]):
            if candidate in self.files:
                with safe_open(self.files[candidate], framework="pt") as handle:
                    return handle.get_tensor(candidate)
        raise NotAvailableError(f"method.init loftq: the model's safetensors files in {self.folder} hold no tensor "
                                f"{name}, which LoftQ fits the adapter to",
                                hint="use method.init default for this model")


def fit_loftq(peft_model, weights_dir: Path, adapter: str = "default") -> dict:
    """Set the LoRA weights of every 4-bit layer so that base + adapter best approximates the full-precision weight
    at the adapter's rank (the rank-r SVD of W - dequantized(Q), divided by the LoRA scaling); the 4-bit base stays
    as loaded. Returns the relative errors |W - base - adapter| / |W| per layer, before (B = 0) and after."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora.bnb import Linear4bit

    weights = FullPrecisionWeights(weights_dir)
    layers: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, Linear4bit) or adapter not in module.lora_A:
                continue
            base_name = name.removeprefix(PEFT_PREFIX)
            packed = module.get_base_layer().weight
            quantized = bnbf.dequantize_4bit(packed.data, packed.quant_state).to(torch.float32)
            original = weights.get(f"{base_name}.weight").to(quantized.device, torch.float32)
            residual = original - quantized
            rank, scale = module.r[adapter], module.scaling[adapter]
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            kept = min(rank, s.numel())
            root = (s[:kept] / scale).sqrt()
            lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            fitted_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=quantized.device)
            fitted_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=quantized.device)
            fitted_a[:kept] = root[:, None] * vh[:kept]
            fitted_b[:, :kept] = u[:, :kept] * root
            lora_a.copy_(fitted_a.to(lora_a.dtype))
            lora_b.copy_(fitted_b.to(lora_b.dtype))
            applied = scale * (lora_b.float() @ lora_a.float())   # as the adapter holds it (dtype rounding included)
            norm = original.norm()
            layers[base_name] = {"before": round(float(residual.norm() / norm), 6),
                                 "after": round(float((residual - applied).norm() / norm), 6)}
    if not layers:
        raise NotAvailableError("method.init loftq: the model has no 4-bit LoRA layer to fit",
                                hint="LoftQ needs method.kind qlora with quantization.bits 4")
    before = sum(layer["before"] for layer in layers.values()) / len(layers)
    after = sum(layer["after"] for layer in layers.values()) / len(layers)
    return {"init": "loftq", "layers": len(layers), "mean_error_before": round(before, 6),
            "mean_error_after": round(after, 6), "errors": layers}
