"""Packing benchmark: real tokens per second of a training step, padded vs ftcli packing vs TRL-style padding-free.

    python bench/packing.py [--layers 4] [--batch 8] [--max-length 256] [--steps 2] [--rounds 3] [--json OUT]

A randomly initialised Llama with SmolLM2-135M's width (hidden 576, 9 heads, 3 KV heads, vocab 49,152) and
--layers layers; LoRA r 16 on q,k,v,o (only speed is measured, so no weights are needed). The data are chat-like
sequences of varied length (24..max_length tokens, skewed short). Each round runs every mode once, interleaved, so
noise from other processes hits all modes alike; the median over rounds is reported with peak-RSS growth per mode.

Modes, each on the same examples:
- padded:       rows padded to the longest in the batch (random order), attention_mask
- packed:       ftcli: best-fit rows of up to max_length, rows kept separate, position_ids restarting per example
- padding_free: TRL 1.16 packing: the batch flattened into ONE row of B*max_length tokens with restarting positions
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_examples(count: int, max_length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(min(max_length, int(24 + rng.expovariate(1 / 90))))]
            for _ in range(count)]


def batches(mode: str, examples: list[list[int]], batch: int, max_length: int):
    from ftcli.data.packing import PackedCollator, PaddingCollator, pack_examples

    if mode == "padded":
        collate = PaddingCollator(pad_token_id=2)
        for i in range(0, len(examples) - batch + 1, batch):
            yield collate([{"input_ids": e, "labels": e} for e in examples[i:i + batch]])
        return
    rows = pack_examples([(e, e) for e in examples], max_length)
    random.Random(1).shuffle(rows)
    collate = PackedCollator(pad_token_id=2)
    for i in range(0, len(rows) - batch + 1, batch):
        features = [{"input_ids": r.input_ids, "labels": r.labels, "seq_lengths": r.seq_lengths}
                    for r in rows[i:i + batch]]
        out = collate(features)
        if mode == "padding_free":   # what TRL's padding_free collator hands the model: one flattened row
            real = [len(f["input_ids"]) for f in features]
            keep = [(row, n) for row, n in enumerate(real)]
            for key in ("input_ids", "labels", "position_ids"):
                out[key] = __import__("torch").cat([out[key][row, :n] for row, n in keep]).unsqueeze(0)
        yield out


def real_tokens(batch) -> int:
    return int((batch["input_ids"] != 2).sum())   # the synthetic token ids are all >= 100; 2 is the padding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", choices=["padded", "packed", "padding_free"], default=None,
                        help="run one mode (used to measure each mode's peak memory in its own process)")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    needed = args.batch * (args.steps + 1) * 2
    examples = make_examples(needed * 3, args.max_length)
    modes = [args.only] if args.only else ["padded", "packed", "padding_free"]
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            source = batches(mode, examples, args.batch, args.max_length)
            tokens, elapsed = 0, 0.0
            for step, batch in zip(range(args.steps + 1), source):
                start = time.perf_counter()
                out = model(**batch, use_cache=False)
                out.loss.backward()
                model.zero_grad(set_to_none=True)
                if step:   # the first step warms up
                    elapsed += time.perf_counter() - start
                    tokens += real_tokens(batch)
            speeds[mode].append(tokens / elapsed)
    result = {
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
        "tokens_per_s_median": {m: round(statistics.median(v), 1) for m, v in speeds.items()},
        "tokens_per_s_rounds": {m: [round(x, 1) for x in v] for m, v in speeds.items()},
        "torch_threads": torch.get_num_threads(),
    }
    if args.only:
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    else:
        result["peak_rss_mib"] = {mode: _peak_rss(mode, args) for mode in modes}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _peak_rss(mode: str, args) -> float:
    """Peak RSS of one step-set of `mode` in a fresh process (RSS peaks never go down within one process)."""
    import subprocess

    command = [sys.executable, __file__, "--only", mode, "--rounds", "1", "--steps", "1", "--layers",
               str(args.layers), "--batch", str(args.batch), "--max-length", str(args.max_length)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output)["peak_rss_mib"]


if __name__ == "__main__":
    main()
