"""Trainer callbacks: metrics.jsonl, the progress display, signal-safe stopping, checkpoint completion marks and
the learning rate of a resumed run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from ftcli.console import note
from ftcli.runs.checkpoints import mark_complete
from ftcli.runs.rundir import RunDir


class MetricsCallback(TrainerCallback):
    """Append every logged step to metrics.jsonl, with real-token throughput."""

    def __init__(self, run: RunDir, real_tokens):
        self.run = run
        self.real_tokens = real_tokens  # ftcli.training.trainer.RealTokenCount
        self._last_time: float | None = None
        self._last_tokens: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "time": round(time.time(), 3), **logs}
        now = time.perf_counter()
        if "loss" in logs:
            tokens = record["num_tokens"] = self.real_tokens.total  # TRL's count is wrong for packed rows
            if self._last_tokens is not None and now > self._last_time:
                record["tokens_per_second"] = round((tokens - self._last_tokens) / (now - self._last_time), 2)
            self._last_tokens, self._last_time = tokens, now
        self.run.append_metrics(record)
        state.ftcli_last = record  # read by the progress display


class ProgressCallback(TrainerCallback):
    """A rich progress bar on a terminal, plain log lines otherwise (never stdout: it may carry --json)."""

    def __init__(self, console):
        self.console = console
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def _info(self, state) -> str:
        last = getattr(state, "ftcli_last", {}) or {}
        parts = []
        if "loss" in last:
            parts.append(f"loss {last['loss']:.4f}")
        if "learning_rate" in last:
            parts.append(f"lr {last['learning_rate']:.2e}")
        if "rewards/margins" in last:
            parts.append(f"margin {last['rewards/margins']:+.3f}")
        if "reward" in last:
            parts.append(f"reward {last['reward']:.3f}")
        if "tokens_per_second" in last:
            parts.append(f"{last['tokens_per_second']:.0f} tok/s")
        if "eval_loss" in last:
            parts.append(f"eval_loss {last['eval_loss']:.4f}")
        return "  ".join(parts)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info(state))
        elif logs and any(key in logs for key in ("loss", "eval_loss")):
            note(self.console, f"step {state.global_step}/{state.max_steps}  {self._info(state)}")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class ResumedLearningRate(TrainerCallback):
    """Start a resumed run at its own schedule's learning rate.

    The optimizer's saved state carries the lr of the checkpoint's last step under the old schedule; when
    training.max_steps or epochs grew, the restored scheduler follows the new schedule from the next step on, but
    the first resumed step would train at the stale lr (0 at the end of a cosine or linear decay)."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if state.global_step == 0 or optimizer is None or lambdas is None:
            return
        rates = [base * rate(lr_scheduler.last_epoch) for base, rate in zip(lr_scheduler.base_lrs, lambdas)]
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        lr_scheduler._last_lr = rates  # what get_last_lr() and the logs report


class CheckpointMarkCallback(TrainerCallback):
    """Mark each checkpoint complete once the Trainer has written all of it (trainer_state.json is written last)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                mark_complete(path)


class GracefulStop(TrainerCallback):
    """First SIGINT/SIGTERM: checkpoint at the next step boundary and stop. Second: leave at once (exit 130)."""

    def __init__(self, on_second_signal):
        self.requested: str | None = None
        self._on_second_signal = on_second_signal
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            self._on_second_signal(name)
            os._exit(130)
        self.requested = name
        os.write(2, f"\n{name} received: saving a checkpoint at the end of this step (again to quit now)\n".encode())

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
