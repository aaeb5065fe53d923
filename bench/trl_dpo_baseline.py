"""The hand-written alternative to `ftcli train recipes/dpo.yaml`: a plain TRL DPOTrainer + LoRA script, as a
competent user writes it.

    python -m bench.trl_dpo_baseline MODEL_DIR PAIRS.jsonl [--precision fp32|bf16] [--batch 4] [--steps 10] ...

Pairs of strings ({"prompt", "chosen", "rejected"}) become conversational pairs (a user turn, an assistant turn), so
TRL renders them through the model's chat template, as ftcli does. LoRA on a fresh adapter, so the reference is the
base with the adapter disabled (TRL's default for a PEFT model); the settings ftcli resolved (--precision, no
gradient checkpointing, adamw_torch), random order. The only addition to the user's script is the timing log
(--log: one JSON line per step with time and num_tokens, TRL's count of non-padding tokens, after a first line with
the settings the trainer resolved), which bench/run.py reads.
"""

import argparse

p = argparse.ArgumentParser()
p.add_argument("model"), p.add_argument("train"), p.add_argument("--out", default="out")
p.add_argument("--max-length", type=int, default=256), p.add_argument("--batch", type=int, default=4)
p.add_argument("--lr", type=float, default=5e-5), p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=float, default=2), p.add_argument("--scheduler", default="cosine")
p.add_argument("--beta", type=float, default=0.1)
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
from trl import DPOConfig, DPOTrainer  # noqa: E402

from bench.step_log import StepLog  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(args.model)


def to_conversation(example):
    return {"prompt": [{"role": "user", "content": example["prompt"]}],
            "chosen": [{"role": "assistant", "content": example["chosen"]}],
            "rejected": [{"role": "assistant", "content": example["rejected"]}]}


data = load_dataset("json", data_files={"train": args.train})["train"].map(to_conversation)
config = DPOConfig(
    output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
    lr_scheduler_type=args.scheduler, warmup_steps=args.warmup, max_length=args.max_length, beta=args.beta,
    logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
    bf16=args.precision == "bf16", gradient_checkpointing=False, optim="adamw_torch")
targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                  task_type="CAUSAL_LM")


trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                     callbacks=[StepLog(args.log)])
trainer.train()
trainer.save_model(args.out)
