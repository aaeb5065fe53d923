"""`ftcli train`: from a validated recipe to a completed run directory, through TRL's SFTTrainer."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ftcli.atomic import raise_if_disk_full
from ftcli.console import note
from ftcli.errors import DataError, FtcliError, Interrupted, NotAvailableError, RunStateError, UsageError
from ftcli.paths import runs_root
from ftcli.recipe.loader import LoadedRecipe
from ftcli.recipe.schema import Recipe
from ftcli.runs.rundir import RunDir, now_iso
from ftcli.training.distributed import is_main_process, world_size


def _recipe_yaml(recipe: Recipe) -> str:
    from ftcli.recipe.loader import recipe_to_yaml

    return recipe_to_yaml(recipe, header="# The resolved recipe of this run (extends merged, overrides applied, "
                                         "defaults filled in).\n")


def _speed_up_allocator() -> None:
    """glibc's default malloc thresholds cost ~600k page faults per step on the CPU: raise them."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 16 * 2**30)
        libc.mallopt(m_top_pad, 256 * 2**20)


def start_training(loaded: LoadedRecipe, runs_dir: str | Path | None, *, resume: bool, overwrite: bool,
                   trust_remote_code: bool, console, allow_code: bool = False) -> dict[str, Any]:
    """Check the run slot, prepare model and data (no run is created if that fails), then train."""
    recipe = loaded.recipe
    if not is_main_process():
        # Workers of a multi-process run: the main process owns the run directory (checks, lock, run.json).
        run = RunDir(runs_root(runs_dir), recipe.name)
        session = TrainingSession(recipe, run, trust_remote_code=trust_remote_code, console=console,
                                  allow_code=allow_code, recipe_dir=loaded.source.parent)
        session.prepare()
        return session.train(resume=resume)
    run = RunDir.prepare(runs_root(runs_dir), recipe.name, resume=resume, overwrite=overwrite)
    created_folder = not run.path.exists()
    with run.lock():
        try:
            if resume:
                from ftcli.recipe.resume import resume_conflicts

                conflicts = resume_conflicts(run.load_recipe(), recipe)
                if conflicts:
                    raise RunStateError(
                        f"run {run.name!r} can't resume: the recipe changed in ways that break resuming:\n  "
                        + "\n  ".join(conflicts),
                        hint="undo those changes, or start over with --overwrite (or another --name)",
                    )
            session = TrainingSession(recipe, run, trust_remote_code=trust_remote_code, console=console,
                                      allow_code=allow_code, recipe_dir=loaded.source.parent)
            session.prepare()
        except BaseException:
            if created_folder:
                shutil.rmtree(run.path, ignore_errors=True)
            raise
        if not resume:
            run.initialise(_recipe_yaml(recipe), loaded.source, overwrite=overwrite)
        elif run.read().get("data", {}).get("fingerprints") not in (None, session.data_fingerprints):
            raise RunStateError(f"run {run.name!r} can't resume: its data files changed since it started",
                                hint="restore the original data, or start over with --overwrite")
        return session.train(resume=resume)


class TrainingSession:
    """One training of one run: prepare() loads everything that can fail cheaply, train() does the work."""

    def __init__(self, recipe: Recipe, run: RunDir, *, trust_remote_code: bool, console, allow_code: bool = False,
                 recipe_dir: Path | None = None):
        self.recipe = recipe
        self.run = run
        self.trust_remote_code = trust_remote_code
        self.allow_code = allow_code          # the recipe's Python rewards may run (ftcli train --allow-code)
        self.recipe_dir = recipe_dir          # where a Python reward's module is looked for first
        self.console = console
        self.timings: dict[str, float] = {}
        self.cpu_threads: dict | None = None   # set on the CPU: the compute threads chosen and why
        self.cpu_dropout: str | None = None    # set on the CPU when the model's dropout masks are ftcli's
        self.cpu_attention: str | None = None  # set on the CPU when bf16 training computes attention in fp32

    def _log(self, text: str) -> None:
        note(self.console if is_main_process() else None, text)

    def prepare(self) -> None:
        from ftcli.data import pipeline as data
        from ftcli.models import load as models
        from ftcli.models import methods
        from ftcli.models.quiet import quiet_libraries
        from ftcli.training.distributed import resolve_strategy, strategy_arguments

        quiet_libraries()
        recipe, t = self.recipe, self.recipe.training
        # Cheap checks first: a recipe that can't run must fail before anything is loaded.
        self.device = models.resolve_device(recipe.model.device)
        if self.device == "cpu":
            # Before the data and the model are allocated, as the MALLOC_* environment variables would from the
            # process start (the bench's hand-written script gets those).
            _speed_up_allocator()
            from ftcli.training.threads import set_training_threads

            self.cpu_threads = set_training_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        # The automatic settings, resolved once for this device: the trainer uses them and run.json records them.
        self.precision = models.resolve_precision(t.precision, self.device)
        self.gradient_checkpointing = methods.gradient_checkpointing_enabled(t.gradient_checkpointing, self.device)
        self.strategy_arguments = strategy_arguments(resolve_strategy(t.distributed, world_size()), self.device)
        self._check_trackers()
        self._check_generation()
        if t.early_stopping_patience is not None and t.save_steps % t.eval_steps:
            raise UsageError("training.early_stopping_patience needs training.save_steps to be a multiple of "
                             f"training.eval_steps (got {t.save_steps} and {t.eval_steps})")

        started = time.perf_counter()
        self.resolved = models.resolve_model(recipe.model, trust_remote_code=self.trust_remote_code)
        self.starting_adapter = None
        if recipe.model.adapter is not None:
            from ftcli.models.adapters import check_adapter_fits, resolve_adapter

            self.starting_adapter = resolve_adapter(recipe.model.adapter, self.run.path.parent)
            check_adapter_fits(self.starting_adapter, recipe.method, self.resolved.fingerprint)
        self.tokenizer = models.load_tokenizer(recipe.model, trust_remote_code=self.trust_remote_code)
        self.prepared = data.prepare_data(recipe, self.tokenizer, console=self.console if is_main_process() else None)
        # A streaming run may resume after its bad record was fixed: its data is not pinned by content.
        self.data_fingerprints = None if recipe.data.streaming else self.prepared.train_report.fingerprints
        self.timings["data_s"] = round(time.perf_counter() - started, 2)

        started = time.perf_counter()
        from transformers import set_seed

        set_seed(t.seed)
        base = models.load_model(recipe.model, quantization=recipe.effective_quantization,
                                 trust_remote_code=self.trust_remote_code)
        self.init_facts: dict[str, Any] = {}
        self.model, self.parameter_counts = methods.apply_method(
            base, recipe, self.tokenizer,
            starting_adapter=self.starting_adapter.path if self.starting_adapter else None,
            weights_dir=self.resolved.local_dir, init_facts=self.init_facts)
        if t.lr_multipliers:
            from ftcli.training.optimizer import check_multipliers_apply

            check_multipliers_apply(self.model, t.lr_multipliers, recipe.method.kind)
        if self.init_facts:
            self._log(f"method.init loftq: {self.init_facts['layers']} layers fitted; relative error to the "
                      f"full-precision weights {self.init_facts['mean_error_before']:.4f} (4-bit base alone) -> "
                      f"{self.init_facts['mean_error_after']:.4f} (with the adapter), mean over layers")
        if self.device == "cpu":
            from ftcli.models.cpu_dropout import use_cpu_mask_dropout

            # torch's CPU dropout draws its mask one element at a time: a large part of a LoRA step (README)
            self.cpu_dropout = "16-bit random masks" if use_cpu_mask_dropout(self.model) else None
            if self.precision == "bf16" and recipe.model.attn_implementation == "auto":   # not a recipe's choice
                from ftcli.models.cpu_attention import use_fp32_cpu_attention

                # torch's CPU attention is about 3x slower in bf16 than in fp32 at these shapes (README)
                self.cpu_attention = "sdpa in fp32" if use_fp32_cpu_attention(self.model) else None
        self.timings["model_s"] = round(time.perf_counter() - started, 2)
        counts = self.parameter_counts
        self._log(f"model {recipe.model.path} ({self.resolved.kind}), method {recipe.method.kind}: "
                  f"{counts['trainable']:,} trainable of {counts['total']:,} parameters "
                  f"({100 * counts['trainable'] / max(counts['total'], 1):.3f}%)")
        report = self.prepared.train_report
        if recipe.data.streaming:
            self._log("data: streaming the training data (validated and tokenized as training reaches it)")
        else:
            self._log(f"data: {report.examples} training examples, {report.truncated} truncated, "
                      f"{report.dropped} dropped (no trainable token left), prepared by {report.processes} "
                      f"process{'es' if report.processes > 1 else ''}")
            from ftcli.training.preflight import kto_balance_warning

            balance = kto_balance_warning(recipe, self.prepared.train)
            if balance:
                self._log(f"warning: {balance}")

    def training_arguments(self):
        """The TRL config of the recipe's objective: the same training settings, and the objective's own."""
        from trl import DPOConfig, KTOConfig, SFTConfig

        recipe, objective = self.recipe, self.recipe.objective
        common = self._common_arguments()
        if objective.kind == "dpo":
            return DPOConfig(
                **common,
                beta=objective.beta,
                loss_type=[objective.loss_type],
                label_smoothing=objective.label_smoothing,
                max_length=None,   # the data pipeline truncated prompts and answers (data.max_prompt_length)
                precompute_ref_log_probs=False,
            )
        if objective.kind == "kto":
            return KTOConfig(
                **common,
                beta=objective.beta,
                loss_type=objective.loss_type,
                desirable_weight=objective.desirable_weight,
                undesirable_weight=objective.undesirable_weight,
                max_length=None,
                precompute_ref_log_probs=False,
            )
        if objective.kind == "grpo":
            from trl import GRPOConfig

            return GRPOConfig(
                **common,
                num_generations=objective.num_generations,
                max_completion_length=objective.max_completion_length,
                temperature=objective.temperature,
                top_p=objective.top_p,
                beta=objective.beta,
                loss_type=objective.loss_type,
                epsilon=objective.epsilon,
                epsilon_high=objective.epsilon_high,
                scale_rewards=objective.scale_rewards,
                num_iterations=objective.num_iterations,
                mask_truncated_completions=objective.mask_truncated_completions,
                reward_weights=[reward.weight for reward in objective.rewards],
                use_vllm=recipe.training.generation == "vllm",
                vllm_mode="colocate",
                log_completions=False,
            )
        if objective.kind == "orpo":
            from trl.experimental.orpo import ORPOConfig

            return ORPOConfig(**common, beta=objective.beta, max_length=recipe.data.max_length)
        if objective.kind == "simpo":
            from trl.experimental.cpo import CPOConfig

            return CPOConfig(**common, loss_type="simpo", beta=objective.beta, simpo_gamma=objective.gamma,
                             cpo_alpha=objective.nll_weight, max_length=recipe.data.max_length)
        return SFTConfig(
            **common,
            max_length=recipe.data.max_length,
            packing=False,  # ftcli packs in its data pipeline (see ftcli/data/pipeline.py)
            dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, masked and truncated already
        )

    def _common_arguments(self) -> dict[str, Any]:
        """Transformers' TrainingArguments from the recipe's training section, for every objective's TRL config."""
        t = self.recipe.training
        has_eval = self.prepared.eval is not None
        warmup = t.warmup_steps if t.warmup_steps else t.warmup_ratio  # below 1 is read as a ratio
        return dict(
            **self.strategy_arguments,
            output_dir=str(self.run.checkpoints_dir),
            max_steps=t.max_steps if t.max_steps else -1,
            num_train_epochs=t.epochs if t.epochs else 1.0,
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.lr,
            lr_scheduler_type=t.scheduler,
            warmup_steps=warmup,
            weight_decay=t.weight_decay,
            neftune_noise_alpha=t.neftune_noise_alpha,   # transformers: noise only while the embeddings train
            max_grad_norm=t.max_grad_norm,
            optim=t.optimizer,
            seed=t.seed,
            data_seed=t.seed,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            activation_checkpointing=self.gradient_checkpointing,   # transformers 5 name (the old one goes in v6)
            torch_compile=t.torch_compile,
            use_cpu=self.device == "cpu",
            logging_steps=t.logging_steps,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=t.save_total_limit,
            eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
            eval_steps=t.eval_steps,
            load_best_model_at_end=t.early_stopping_patience is not None,
            metric_for_best_model="eval_loss" if t.early_stopping_patience is not None else None,
            greater_is_better=False if t.early_stopping_patience is not None else None,
            report_to=list(t.report_to) or "none",   # ftcli's own tracker callbacks replace transformers' ones
            run_name=self.run.name,                    # the trackers' name of the run
            disable_tqdm=True,
            train_sampling_strategy="random",  # group_by_length is ftcli's own sampler (ftcli/training/samplers.py)
            remove_unused_columns=False,
            dataloader_num_workers=0,
            save_only_model=False,
        )

    def make_trainer(self, real_tokens, callbacks: list):
        """The objective's TRL trainer (ftcli's subclass) over the prepared model and data, reporting through
        `callbacks` only."""
        from transformers.trainer_callback import PrinterCallback
        from transformers.trainer_callback import ProgressCallback as HFProgress

        from ftcli.data import pipeline as data
        from ftcli.training.trainer import (
            FtcliDPOTrainer,
            FtcliGRPOTrainer,
            FtcliKTOTrainer,
            FtcliSFTTrainer,
            make_pair_trainer,
        )

        recipe = self.recipe
        kind = recipe.objective.kind
        shared = dict(model=self.model, args=self.training_arguments(), train_dataset=self.prepared.train,
                      eval_dataset=self.prepared.eval, processing_class=self.tokenizer, callbacks=callbacks)
        if kind == "dpo":   # TRL's preference collator: chosen and rejected rows of each pair
            trainer = FtcliDPOTrainer(real_tokens=real_tokens, **shared)
        elif kind == "kto":
            trainer = FtcliKTOTrainer(real_tokens=real_tokens, **shared)
        elif kind == "grpo":
            from ftcli.data.prompts import prompt_limit
            from ftcli.training.rewards import reward_functions

            rewards = reward_functions(recipe.objective.rewards, allow_code=self.allow_code,
                                       recipe_dir=self.recipe_dir)
            trainer = FtcliGRPOTrainer(real_tokens=real_tokens, reward_funcs=rewards,
                                       prompt_limit=prompt_limit(recipe), **shared)
        elif kind in ("orpo", "simpo"):
            trainer = make_pair_trainer(kind, real_tokens=real_tokens,
                                        answers_only=recipe.data.train_on == "completion", **shared)
        else:
            trainer = FtcliSFTTrainer(real_tokens=real_tokens,
                                      group_by_length=recipe.training.group_by_length and not recipe.data.packing,
                                      data_collator=data.make_collator(recipe, self.tokenizer), **shared)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(HFProgress)
        from ftcli.training.optimizer import GroupPlan

        trainer.group_plan = GroupPlan.from_recipe(recipe)   # LoRA+ and lr_multipliers (ftcli/training/optimizer.py)
        from ftcli.training.trackers import install_trackers

        self.trackers = install_trackers(trainer, recipe, self.run, self.console if is_main_process() else None)
        return trainer

    def _check_generation(self) -> None:
        import importlib.util

        if self.recipe.training.generation != "vllm":
            return
        if not self.device.startswith("cuda"):
            raise UsageError(f"training.generation: vllm samples on GPUs; this run's device is {self.device}",
                             hint="set training.generation: transformers (any device)")
        if importlib.util.find_spec("vllm") is None:
            raise NotAvailableError("training.generation is vllm, which is not installed",
                                    hint="pip install vllm (a build for this machine's CUDA), or set "
                                         "training.generation: transformers")

    def _check_trackers(self) -> None:
        import importlib.util

        for tracker in self.recipe.training.report_to:
            if importlib.util.find_spec(tracker) is None:
                raise NotAvailableError(f"training.report_to lists {tracker}, which is not installed",
                                        hint=f"pip install {tracker} (all three trackers: pip install "
                                             "'ftcli[trackers]'), or remove it from training.report_to")

    def train(self, *, resume: bool) -> dict[str, Any]:
        from ftcli.training.callbacks import GracefulStop
        from ftcli.training.knobs import run_knobs
        from ftcli.training.trainer import RealTokenCount

        run = self.run
        resume_from = self._resume_point() if resume else None
        stopper = GracefulStop(on_second_signal=self._stop_now)
        real_tokens = RealTokenCount()
        trainer = self.make_trainer(real_tokens, self._callbacks(real_tokens, stopper))
        self._mark("running", started_at=now_iso(), **self._run_facts(world_size()),
                   knobs=run_knobs(self.recipe, trainer, self.init_facts))
        metrics = self._run_trainer(trainer, stopper, resume_from)
        summary = self._mark("completed", finished_at=now_iso(), metrics=metrics, timings=self.timings,
                             step=trainer.state.global_step)
        return {"name": run.name, "status": "completed", "path": str(run.path), "metrics": metrics,
                "step": summary.get("step")}

    def _resume_point(self) -> Path | None:
        """The newest complete checkpoint (None: start over); the main process sets the unusable ones aside."""
        from ftcli.runs import checkpoints

        run = self.run
        scan = checkpoints.scan_checkpoints(run.checkpoints_dir)
        for path, why in scan.skipped if is_main_process() else []:
            # Out of the way (Trainer would save into that name again), never deleted: a judgement can be wrong.
            moved_to = checkpoints.set_aside(path)
            renamed = f" as {moved_to.name}" if moved_to.name != path.name else ""
            self._log(f"warning: skipping checkpoint {path.name}: set aside {path.name} in "
                      f"{moved_to.parent.relative_to(run.path)}/{renamed}: {why}")
            record = {"checkpoint": path.name, "reason": why, "moved_to": str(moved_to.relative_to(run.path)),
                      "at": now_iso()}
            run.modify(lambda info, record=record: info.setdefault("rejected_checkpoints", []).append(record))
        resume_from = scan.newest_complete
        self._log(f"resuming from {resume_from.name}" if resume_from else "no complete checkpoint: starting over")
        return resume_from

    def _stop_now(self, signal_name: str) -> None:
        """A second SIGINT / SIGTERM: set the unfinished checkpoint aside and record the interruption."""
        from ftcli.runs import checkpoints

        if is_main_process():
            checkpoints.set_aside_unfinished(self.run.path, self.run.checkpoints_dir)
        self._mark_quietly("interrupted", error=f"{signal_name} twice: stopped at once; resume continues from "
                                                "the last complete checkpoint")

    def _callbacks(self, real_tokens, stopper) -> list:
        from transformers import EarlyStoppingCallback

        from ftcli.training.callbacks import (
            CheckpointMarkCallback,
            MetricsCallback,
            ProgressCallback,
            ResumedLearningRate,
        )

        callbacks = [MetricsCallback(self.run, real_tokens), ProgressCallback(self.console), CheckpointMarkCallback(),
                     ResumedLearningRate(), stopper]
        patience = self.recipe.training.early_stopping_patience
        if patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=patience))
        return callbacks

    def _run_trainer(self, trainer, stopper, resume_from: Path | None) -> dict[str, Any]:
        """trainer.train() under the signal handler; the final metrics, or run.json marked interrupted or failed
        and the error raised."""
        run = self.run
        started = time.perf_counter()
        stopper.install()
        finished = False
        try:
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            self.timings["train_s"] = round(time.perf_counter() - started, 2)
            if stopper.requested is not None:
                step = trainer.state.global_step
                self._mark("interrupted", error=f"{stopper.requested}: stopped after a checkpoint at step {step}",
                           step=step)
                raise Interrupted(f"run {run.name!r} interrupted at step {step}; a checkpoint was saved",
                                  hint="continue with: ftcli train RECIPE --resume")
            metrics = self._final_metrics(trainer, output)
            if is_main_process():
                self._save_outputs()
            finished = True
            return metrics
        except Interrupted:
            raise
        except DataError as exc:
            # A bad record reached while streaming: keep what was trained, so that the run resumes once it is fixed.
            step = trainer.state.global_step
            if step > 0:
                trainer._save_checkpoint(trainer.model, trial=None)   # what the loop does at a save step
                trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
            self._mark_quietly("failed", error=str(exc), step=step)
            where = f"; a checkpoint at step {step} was saved" if step > 0 else ""
            raise DataError(exc.message + where, hint=exc.hint) from None
        except KeyboardInterrupt:
            self._mark_quietly("interrupted", error="interrupted before a checkpoint could be saved")
            raise Interrupted(f"run {run.name!r} interrupted", hint="continue with --resume") from None
        except BaseException as exc:
            self._mark_quietly("failed", error=str(exc) if isinstance(exc, FtcliError)
                               else f"{type(exc).__name__}: {exc}")
            raise_if_disk_full(exc, run.path)
            raise
        finally:
            stopper.uninstall()
            from ftcli.training.trackers import finish_trackers

            finish_trackers(getattr(self, "trackers", []), "completed" if finished
                            else "interrupted" if stopper.requested is not None else "failed")

    def _mark_quietly(self, status: str, **fields) -> None:
        """Record a failure without hiding it: when even run.json can't be written (disk full), say so and go on."""
        try:
            self._mark(status, **fields)
        except Exception as exc:  # the original error matters more
            self._log(f"warning: could not record status {status} in run.json: {exc}")

    def _run_facts(self, world_size: int) -> dict[str, Any]:
        from ftcli.models import load as models
        from ftcli.training.distributed import resolve_strategy

        t = self.recipe.training
        report = self.prepared.train_report
        eval_report = self.prepared.eval_report
        return {
            "objective": self.recipe.objective.kind,
            "parent": self.starting_adapter.lineage() if self.starting_adapter else None,
            "base_model": {"reference": self.resolved.reference, "kind": self.resolved.kind,
                           "local_dir": str(self.resolved.local_dir), "fingerprint": self.resolved.fingerprint},
            "method": self.recipe.method.kind,
            "parameters": self.parameter_counts,
            "device": self.device,
            # What the automatic settings resolved to on this device, so two runs of one recipe can be compared.
            "precision": self.precision,
            "gradient_checkpointing": self.gradient_checkpointing,
            "cpu_bf16": models.cpu_bf16_facts() if self.device == "cpu" else None,
            "cpu_threads": self.cpu_threads,
            "cpu_dropout": self.cpu_dropout,
            "cpu_attention": self.cpu_attention,
            "distributed": {"world_size": world_size, "strategy": resolve_strategy(t.distributed, world_size),
                            "global_batch_size": t.batch_size * t.grad_accum * world_size},
            "data": {"fingerprints": self.data_fingerprints, "streaming": self.recipe.data.streaming,
                     "train": None if self.recipe.data.streaming else _report_dict(report),
                     "eval": _report_dict(eval_report) if eval_report else None},
        }

    def _final_metrics(self, trainer, output) -> dict[str, Any]:
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        metrics: dict[str, Any] = {"train_loss": losses[-1] if losses else None,
                                   "train_loss_first": losses[0] if losses else None,
                                   "train_loss_mean": output.training_loss}
        if self.prepared.eval is not None:
            # trainer.evaluate() logs through MetricsCallback, which writes the record to metrics.jsonl.
            metrics["eval_loss"] = trainer.evaluate().get("eval_loss")
        return metrics

    def _save_outputs(self) -> None:
        from ftcli.atomic import atomic_write_text, staged_dir
        from ftcli.runs.loss_plot import write_loss_plot
        from ftcli.runs.rundir import CHAT_TEMPLATE_FILE

        run = self.run
        template = self.prepared.chat_template
        if template is not None:
            self.tokenizer.chat_template = template
        with staged_dir(run.adapter_dir) as staging:
            # Only the trained adapter: DPO and KTO add a frozen copy named "ref" as their reference model.
            self.model.save_pretrained(staging, selected_adapters=["default"])
            self.tokenizer.save_pretrained(staging)
            if template is not None:
                atomic_write_text(staging / CHAT_TEMPLATE_FILE, template)
            else:  # format: text trains without a template; the tokenizer's own one was never used
                (staging / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        write_loss_plot(run.read_metrics(), run.loss_plot_path, f"{run.name}: {self.recipe.method.kind}")

    def _mark(self, status: str, **fields) -> dict[str, Any]:
        if not is_main_process():
            return {}
        return self.run.set_status(status, **fields)


def _report_dict(report) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: v for k, v in asdict(report).items() if k != "fingerprints"}
