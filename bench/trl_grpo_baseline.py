"""The hand-written alternative to `ftcli train recipes/grpo.yaml`: a plain TRL GRPOTrainer + LoRA script with its
reward functions written in Python, as a competent user writes them.

    python -m bench.trl_grpo_baseline MODEL_DIR TRAIN.jsonl [--precision fp32|bf16] [--steps 8] ...

Chat data ({"messages": [...]}) becomes conversational prompts (the turns before the last answer) and a reference
column (the last answer), so TRL renders the prompts through the model's chat template, as ftcli does. The rewards
are those of recipes/grpo.yaml: normalised exact match, token F1 (weight 0.5) and a one-line format (weight 0.25). A
fresh LoRA adapter, the settings ftcli resolved (--precision, no gradient checkpointing, adamw_torch). The only
addition to the user's script is the timing log (--log, as bench/trl_baseline.py's), which bench/run.py reads.
"""

import argparse
import re
import string
from collections import Counter

p = argparse.ArgumentParser()
p.add_argument("model"), p.add_argument("train"), p.add_argument("--out", default="out")
p.add_argument("--max-length", type=int, default=256), p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-4), p.add_argument("--steps", type=int, default=8)
p.add_argument("--warmup", type=float, default=0), p.add_argument("--scheduler", default="constant")
p.add_argument("--num-generations", type=int, default=4), p.add_argument("--max-completion-length", type=int,
                                                                         default=32)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--r", type=int, default=16), p.add_argument("--alpha", type=float, default=32)
p.add_argument("--dropout", type=float, default=0.05), p.add_argument("--targets",
                                                                      default="q_proj,k_proj,v_proj,o_proj")
p.add_argument("--seed", type=int, default=42), p.add_argument("--log", default="steps.jsonl")
p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
args = p.parse_args()

# The libraries after argparse, so --help is instant.
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from bench.step_log import StepLog  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(args.model)


def to_prompt(example):
    return {"prompt": example["messages"][:-1], "reference": example["messages"][-1]["content"]}


data = load_dataset("json", data_files={"train": args.train})["train"].map(to_prompt, remove_columns=["messages"])


def normalize(text):
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(text.split())


def answer(completion):
    return completion[0]["content"]


def exact_match_norm(completions, reference, **kwargs):
    return [float(normalize(answer(c)) == normalize(r)) for c, r in zip(completions, reference)]


def f1(completions, reference, **kwargs):
    scores = []
    for c, r in zip(completions, reference):
        got, wanted = normalize(answer(c)).split(), normalize(r).split()
        common = sum((Counter(got) & Counter(wanted)).values())
        scores.append(0.0 if not common else 2 * common / (len(got) + len(wanted)))
    return scores


def one_line(completions, **kwargs):
    return [float(re.fullmatch(r"[^\n]{1,80}", answer(c).strip(), flags=re.DOTALL) is not None) for c in completions]


config = GRPOConfig(
    output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
    lr_scheduler_type=args.scheduler, warmup_steps=args.warmup, num_generations=args.num_generations,
    max_completion_length=args.max_completion_length, temperature=args.temperature, reward_weights=[1.0, 0.5, 0.25],
    logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
    bf16=args.precision == "bf16", gradient_checkpointing=False, optim="adamw_torch")
targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                  task_type="CAUSAL_LM")


trainer = GRPOTrainer(model=model, reward_funcs=[exact_match_norm, f1, one_line], args=config, train_dataset=data,
                      processing_class=tokenizer, peft_config=lora, callbacks=[StepLog(args.log)])
trainer.train()
trainer.save_model(args.out)
