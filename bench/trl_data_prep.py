"""The hand-written TRL user's data preparation, timed: load a chat JSONL file with datasets, then SFTTrainer's own.

    python -m bench.trl_data_prep TRAIN.jsonl [--max-length 256] [--model MODEL_DIR]

What is timed (one wall-clock figure, `prep_s`, and its two parts): `datasets.load_dataset("json", data_files=FILE,
split="train")` into the datasets cache (HF_DATASETS_CACHE: bench/run.py gives every run a fresh, empty one, so
nothing is reused), the user's conversion of {"messages": [...]} into conversational prompt-completion pairs (as
bench/trl_baseline.py does: TRL then masks the prompt, loss on the final assistant turn and its <|im_end|>, as ftcli's
`train_on: completion` does for single-turn chats; TRL's `assistant_only_loss` refuses SmolLM2's chat template, which
has no `{% generation %}` markers and no training variant in TRL), and SFTTrainer's `_prepare_dataset` as its
constructor calls it for this data: chat template, tokenization, labels, truncation to max_length, dropping fully
masked rows; single process (SFTConfig's dataset_num_proc=None), no packing, no shuffle (SFTConfig's defaults).
Not timed: the imports, the tokenizer load and SFTConfig. The trainer is not constructed: no model is loaded
(ftcli's dry run loads no weights either), and `_prepare_dataset` runs on a bare SFTTrainer given the three
attributes the constructor would set for this data (tokenizer, completion-only loss, no training chat template).
Prints one JSON line: prep_s, load_s, tokenize_s, rows (after preparation), examples (loaded), columns.
"""

from __future__ import annotations

import argparse
import json
import time


def model_dir() -> str:
    """The converted folder of the embedded SmolLM2, as ftcli resolves (and, the first time, converts) it."""
    from ftcli.models.load import resolve_model
    from ftcli.recipe.schema import ModelConfig

    return str(resolve_model(ModelConfig(path="builtin:smollm2-135m-instruct")).local_dir)


def to_prompt_completion(example):
    return {"prompt": example["messages"][:-1], "completion": example["messages"][-1:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train", help="chat JSONL file")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default=None, help="model folder (tokenizer); default: the embedded SmolLM2")
    args = parser.parse_args(argv)

    # The libraries after argparse, so --help is instant.
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model or model_dir())
    config = SFTConfig(output_dir="unused", max_length=args.max_length, dataset_num_proc=None, report_to="none",
                       use_cpu=True)
    trainer = SFTTrainer.__new__(SFTTrainer)   # what __init__ sets before it prepares this (conversational,
    trainer._tokenizer = tokenizer             # prompt-completion) data
    trainer.completion_only_loss = True        # SFTConfig's None: on for prompt-completion data
    trainer.chat_template = None               # only assistant_only_loss swaps in a training template

    started = time.perf_counter()
    data = load_dataset("json", data_files=args.train, split="train")
    data = data.map(to_prompt_completion, remove_columns=["messages"])
    loaded = time.perf_counter()
    prepared = trainer._prepare_dataset(data, tokenizer, config, False, None, "train")
    done = time.perf_counter()
    print(json.dumps({"prep_s": round(done - started, 3), "load_s": round(loaded - started, 3),
                      "tokenize_s": round(done - loaded, 3), "rows": len(prepared), "examples": len(data),
                      "columns": sorted(prepared.column_names)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
