"""The hand-written alternative to `ftcli train`: a plain TRL SFTTrainer + LoRA script, as a competent user writes it.

    python -m bench.trl_baseline MODEL_DIR TRAIN.jsonl [--eval VAL.jsonl] [--method lora|qlora] [--trl-defaults]
        [--precision fp32|bf16] ...

Chat data ({"messages": [...]}) becomes prompt-completion pairs, so TRL computes the loss on the completions only.
--trl-defaults keeps SFTConfig's own precision, checkpointing and optimizer defaults (bf16, gradient checkpointing,
fused AdamW); without it they match what ftcli resolved (--precision, no checkpointing, adamw_torch). Both sample in
random order, as ftcli's default does. The only additions
to the user's script are the timing log (--log: one JSON line per step with time and num_tokens, as ftcli's
metrics.jsonl, after a first line with the settings the trainer resolved: precision, gradient checkpointing,
optimizer), which bench/run.py reads, and --max-seconds: stop at the end of the first step after that many seconds
of training, once --min-steps steps ran (`python -m bench.run --quick` caps the TRL-defaults arm with it, which on a CPU
without native bf16 runs bf16 emulated, ~100 s a step).
"""

import argparse

p = argparse.ArgumentParser()
p.add_argument("model"), p.add_argument("train"), p.add_argument("--eval"), p.add_argument("--out", default="out")
p.add_argument("--method", default="lora", choices=["lora", "qlora"]), p.add_argument("--trl-defaults",
                                                                                   action="store_true")
p.add_argument("--max-length", type=int, default=256), p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-3), p.add_argument("--steps", type=int, default=60)
p.add_argument("--warmup", type=float, default=3), p.add_argument("--scheduler", default="cosine")
p.add_argument("--r", type=int, default=16), p.add_argument("--alpha", type=float, default=32)
p.add_argument("--dropout", type=float, default=0.05), p.add_argument("--targets",
                                                                      default="q_proj,k_proj,v_proj,o_proj")
p.add_argument("--seed", type=int, default=42), p.add_argument("--log", default="steps.jsonl")
p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
p.add_argument("--max-seconds", type=float, default=None, help="stop after this many seconds of training")
p.add_argument("--min-steps", type=int, default=2, help="steps run before --max-seconds can stop")
args = p.parse_args()

# The libraries after argparse, so --help is instant.
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from trl import SFTConfig, SFTTrainer  # noqa: E402

from bench.step_log import StepLog  # noqa: E402

quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32) if args.method == "qlora" else None
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=quantization)
tokenizer = AutoTokenizer.from_pretrained(args.model)


def to_prompt_completion(example):
    return {"prompt": example["messages"][:-1], "completion": example["messages"][-1:]}


files = {"train": args.train} | ({"eval": args.eval} if args.eval else {})
data = load_dataset("json", data_files=files).map(to_prompt_completion, remove_columns=["messages"])
same_as_ftcli = {} if args.trl_defaults else {
    "bf16": args.precision == "bf16", "gradient_checkpointing": False, "optim": "adamw_torch"}
config = SFTConfig(
    output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
    per_device_eval_batch_size=args.batch,
    learning_rate=args.lr, lr_scheduler_type=args.scheduler, warmup_steps=args.warmup, max_length=args.max_length,
    logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, use_cpu=not torch.cuda.is_available(),
    **same_as_ftcli)
targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                  task_type="CAUSAL_LM")


trainer = SFTTrainer(model=model, args=config, train_dataset=data["train"], eval_dataset=data.get("eval"),
                     processing_class=tokenizer, peft_config=lora,
                     callbacks=[StepLog(args.log, max_seconds=args.max_seconds, min_steps=args.min_steps)])
trainer.train()
if args.eval:
    trainer.evaluate()  # logged through StepLog as eval_loss
trainer.save_model(args.out)
