"""How far each GGUF quant of the embedded model sits from it under ftcli's parity measure, and how far a real
defect sits: the figures the bounds in ftcli/models/parity.py are set against. Writes bench/PARITY.md and
bench/parity-result.json.

    python -m bench.parity          # about 8 minutes on 2 CPU cores

The embedded SmolLM2-135M-Instruct (converted once into a cache folder) stands in for a merged model: each quant
is written by ftcli's GGUF writer, read back by transformers and compared on the check conversations, exactly as
`ftcli export --format gguf` checks its file. "no q/k permutation" is the same f16 file written without llama.cpp's
row order of the attention q/k weights (a real defect of hand-written converters).
"""

from __future__ import annotations

import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CASES = (("f32", "f32", True), ("f16", "f16", True), ("bf16", "bf16", True), ("q8_0", "q8_0", True),
         ("no q/k permutation (f16)", "f16", False))
FIGURES = ("agreement", "top_token_agreement", "kl_mean", "kl_p99", "kl_max", "max_abs_logit_diff")


def measure(work: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcli.export.gguf.check import _dense_weights
    from ftcli.export.gguf.writer import write_model_gguf
    from ftcli.models import parity
    from ftcli.models.gguf_import import ensure_converted
    from ftcli.models.sources import builtin_gguf_path

    source = ensure_converted(builtin_gguf_path("smollm2-135m-instruct"), work / "cache")
    tokenizer = AutoTokenizer.from_pretrained(source)
    template = tokenizer.chat_template
    batch = parity.encode(tokenizer, parity.check_texts(template, tokenizer))
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True).eval()
    expected = parity.logits(reference, batch)
    del reference
    rows = []
    for label, quant, permute in CASES:
        started = time.perf_counter()
        path = work / f"model-{quant}-{permute}.gguf"
        write_model_gguf(source, path, quant=quant, chat_template=template, name="parity", _permute_qk=permute)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                      **_dense_weights()).eval()
        bounds = parity.BOUNDS[f"gguf_{quant}"]
        check = parity.compare(expected, parity.logits(loaded, batch), batch["attention_mask"], bounds)
        del loaded
        path.unlink()
        rows.append({"case": label, "quant": quant, **check.as_dict(), "bounds": bounds.describe(),
                     "passes": not check.failures(bounds), "seconds": round(time.perf_counter() - started, 1)})
        print(f"{label}: {check.describe()} -> {'pass' if rows[-1]['passes'] else 'FAIL'}", flush=True)
    return rows


def render(rows: list[dict], stamp: str) -> str:
    lines = [
        "# Parity of GGUF exports of the embedded model",
        "",
        f"`python -m bench.parity`, {stamp}, {cpu_name()}. SmolLM2-135M-Instruct "
        f"against each GGUF of it read back by transformers, on the {rows[0]['positions']} positions of ftcli's check "
        "conversations (ftcli/models/parity.py; README, \"Parity gates\").",
        "",
        "| case | tie-aware agreement | argmax agreement | mean KL | p99 KL | max KL | max abs logit diff | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['case']} | {row['agreement']:.1%} | {row['top_token_agreement']:.1%} "
                     f"| {row['kl_mean']:.3g} | {row['kl_p99']:.3g} | {row['kl_max']:.3g} "
                     f"| {row['max_abs_logit_diff']:.3g} "
                     f"| {'pass' if row['passes'] else 'refused'} ({row['bounds'].replace('|', chr(92) + '|')}) |")
    lines += ["", "Many positions repeat across the conversations (the template's default system prompt), so the 99th "
              "percentile often equals the max.", ""]
    return "\n".join(lines)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="ftcli-parity-") as work:
        rows = measure(Path(work))
    (HERE / "parity-result.json").write_text(json.dumps({"when": stamp, "rows": rows}, indent=2) + "\n")
    (HERE / "PARITY.md").write_text(render(rows, stamp))


if __name__ == "__main__":
    main()
