"""The hand-written TRL scripts' timing log (bench/trl_*baseline.py), the counterpart of ftcli's metrics.jsonl: the
trainer's settings, then one JSON line per logged step; optionally a stop after a time budget."""

from __future__ import annotations

import json
import time

from transformers import TrainerCallback


class StepLog(TrainerCallback):
    def __init__(self, path: str, *, max_seconds: float | None = None, min_steps: int = 0):
        self.path = path
        self.max_seconds = max_seconds   # stop at the end of the first step past this many seconds of training ...
        self.min_steps = min_steps       # ... once this many steps ran
        self.began = 0.0

    def on_train_begin(self, train_args, state, control, **kwargs):
        self.began = time.time()
        precision = "bf16" if train_args.bf16 else "fp16" if train_args.fp16 else "fp32"
        settings = {"precision": precision, "gradient_checkpointing": bool(train_args.gradient_checkpointing),
                    "optim": str(getattr(train_args.optim, "value", train_args.optim)),
                    "max_steps": train_args.max_steps, "max_seconds": self.max_seconds}
        self._write({"event": "train_begin", "time": self.began, "settings": settings})

    def on_step_end(self, _args, state, control, **kwargs):
        if (self.max_seconds is not None and state.global_step >= self.min_steps
                and time.time() - self.began >= self.max_seconds):
            control.should_training_stop = True   # this step is still logged; then the trainer stops and saves

    def on_log(self, _args, state, control, logs=None, **kwargs):
        self._write({"step": state.global_step, "time": time.time(), **(logs or {})})

    def _write(self, record):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
