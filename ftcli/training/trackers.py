"""training.report_to: TensorBoard, MLflow and W&B write inside the run directory (unless the user's environment
points them elsewhere), log the resolved recipe beside Trainer's arguments, and say in run.json where they wrote."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

from ftcli.console import note
from ftcli.errors import NotAvailableError
from ftcli.recipe.schema import Recipe, flatten_keys
from ftcli.runs.rundir import RunDir

MLFLOW_EXPERIMENT = "ftcli"       # the experiment of ftcli's runs, unless MLFLOW_EXPERIMENT_NAME names another
WANDB_PROJECT = "ftcli"           # the W&B project, unless WANDB_PROJECT names another
RECIPE_PARAM_PREFIX = "recipe."   # MLflow params of the resolved recipe: recipe.method.r, recipe.training.lr, ...
MAX_PARAM_CHARS = 6000            # MLflow's longest parameter value
STATUS_OF = {"completed": ("FINISHED", 0), "interrupted": ("KILLED", 130), "failed": ("FAILED", 1)}


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """Every leaf of the resolved recipe as an MLflow parameter: `recipe.<dotted key>` -> its value as text (lists
    and mappings as JSON), cut to MLflow's longest value."""
    params = {}
    for key, value in flatten_keys(recipe.model_dump(mode="json")).items():
        text = value if isinstance(value, str) else json.dumps(value)
        params[RECIPE_PARAM_PREFIX + key] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 1] + "…"
    return params


def _record(run: RunDir, tracker: str, where: dict[str, Any]) -> None:
    """run.json's tracking.<tracker>: where the tracker wrote and how to look at it."""
    run.modify(lambda info: info.setdefault("tracking", {}).__setitem__(tracker, where))


class FtcliTensorBoard(TensorBoardCallback):
    """Transformers' TensorBoard callback, writing to tracking/tensorboard (TENSORBOARD_LOGGING_DIR wins)."""

    name = "tensorboard"

    def __init__(self, run: RunDir, recipe: Recipe):
        super().__init__()
        self.run, self.recipe = run, recipe
        self.logging_dir = self.logging_dir or str(run.tensorboard_dir)

    def where(self) -> dict[str, Any]:
        return {"logdir": self.logging_dir, "view": f"tensorboard --logdir {self.logging_dir}"}

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero and self.tb_writer is not None:
            from ftcli.recipe.loader import recipe_to_yaml

            self.tb_writer.add_text("ftcli/recipe", f"```yaml\n{recipe_to_yaml(self.recipe)}```")
            _record(self.run, self.name, self.where())

    def finish(self, status: str) -> None:
        if self.tb_writer is not None:   # reopened by the evaluation after training
            self.tb_writer.close()
            self.tb_writer = None


class FtcliMLflow(MLflowCallback):
    """Transformers' MLflow callback, logging to an MLflow store in tracking/mlflow (MLFLOW_TRACKING_URI wins) under
    the experiment `ftcli`, with the resolved recipe's fields as params; the run stays open through the evaluation
    after training and ends with the training's status."""

    name = "mlflow"

    def __init__(self, run: RunDir, recipe: Recipe):
        super().__init__()
        self.run, self.recipe = run, recipe
        self.user_uri = os.environ.get("MLFLOW_TRACKING_URI")   # read now: mlflow.set_tracking_uri sets it
        self.uri = self.user_uri or f"sqlite:///{run.mlflow_db_path}"
        self.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT

    def where(self) -> dict[str, Any]:
        where: dict[str, Any] = {"tracking_uri": self.uri, "experiment": self.experiment}
        if self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri:
            where["view"] = f"mlflow ui --backend-store-uri {self.uri}"
        return where

    def setup(self, args, state, model):
        mlflow = self._ml_flow
        if state.is_world_process_zero:
            if not self.user_uri:
                self.run.mlflow_dir.mkdir(parents=True, exist_ok=True)
                for chatty in ("alembic", "mlflow.store.db.utils"):   # the new store's table creation, at INFO
                    logging.getLogger(chatty).setLevel(logging.WARNING)
            mlflow.set_tracking_uri(self.uri)
            client = mlflow.MlflowClient(self.uri)
            if client.get_experiment_by_name(self.experiment) is None:
                # In ftcli's own store the artifacts stay in the run too (by default MLflow puts them in ./mlruns).
                client.create_experiment(self.experiment, artifact_location=None if self.user_uri
                                         else self.run.mlflow_artifacts_dir.as_uri())
            mlflow.set_experiment(self.experiment)
        super().setup(args, state, model)
        if state.is_world_process_zero:
            params = list(recipe_params(self.recipe).items())
            for start in range(0, len(params), self._MAX_PARAMS_TAGS_PER_BATCH):
                mlflow.log_params(dict(params[start:start + self._MAX_PARAMS_TAGS_PER_BATCH]))
            mlflow.set_tags({"ftcli.run": self.run.name, "ftcli.run_dir": str(self.run.path),
                             "ftcli.method": self.recipe.method.kind, "ftcli.objective": self.recipe.objective.kind})
            active = mlflow.active_run()
            _record(self.run, self.name, {**self.where(), "run_id": active.info.run_id if active else None})

    def on_train_end(self, args, state, control, **kwargs):
        pass   # finish() ends the MLflow run, after the evaluation that follows training has logged to it

    def finish(self, status: str) -> None:
        if self._initialized and self._auto_end_run and self._ml_flow.active_run() is not None:
            self._ml_flow.end_run(status=STATUS_OF[status][0])
        self._auto_end_run = False
        if not self.user_uri:   # mlflow.set_tracking_uri exported this run's store; a later run must not inherit it
            os.environ.pop("MLFLOW_TRACKING_URI", None)


class FtcliWandb(WandbCallback):
    """Transformers' W&B callback: an offline run in tracking/wandb unless WANDB_MODE / WANDB_DIR say otherwise
    (never a prompt, nothing sent unless asked), in project `ftcli`, named after the run, the recipe in its config."""

    name = "wandb"

    def __init__(self, run: RunDir, recipe: Recipe):
        super().__init__()
        self.run, self.recipe = run, recipe
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        self.dir = os.environ.get("WANDB_DIR") or str(run.tracking_dir)
        self.project = os.environ.get("WANDB_PROJECT") or WANDB_PROJECT

    def where(self) -> dict[str, Any]:
        return {"dir": str(Path(self.dir) / "wandb"), "mode": self.mode, "project": self.project}

    def setup(self, args, state, model, **kwargs):
        wandb = self._wandb
        if state.is_world_process_zero and wandb.run is None:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            try:
                # console "off": W&B would otherwise wrap stdout and stderr, which carry ftcli's output (--json)
                wandb.init(project=self.project, name=self.run.name, dir=self.dir, mode=self.mode,
                           settings=wandb.Settings(console="off"))
            except Exception as exc:   # no API key for mode online, an unreachable server, a bad setting
                raise NotAvailableError(f"W&B could not start a {self.mode} run: {exc}",
                                        hint="unset WANDB_MODE to write an offline run in the run directory, "
                                             "or log in with: wandb login") from None
        super().setup(args, state, model, **kwargs)
        if state.is_world_process_zero and wandb.run is not None:
            wandb.config.update({"recipe": self.recipe.model_dump(mode="json")}, allow_val_change=True)
            where = {**self.where(), "run_id": wandb.run.id, "run_dir": str(Path(wandb.run.dir).parent)}
            if self.mode == "offline":
                where["view"] = f"wandb sync {where['run_dir']}"
            _record(self.run, self.name, where)

    def finish(self, status: str) -> None:
        if self._initialized and self._wandb.run is not None:
            self._wandb.finish(exit_code=STATUS_OF[status][1])
        self._initialized = False


TRACKERS = {"tensorboard": (TensorBoardCallback, FtcliTensorBoard), "mlflow": (MLflowCallback, FtcliMLflow),
            "wandb": (WandbCallback, FtcliWandb)}


def install_trackers(trainer, recipe: Recipe, run: RunDir, console=None) -> list:
    """Replace the trainer's callbacks for training.report_to (transformers adds them from args.report_to) with
    ftcli's, and say where each one writes; returns them, for finish_trackers."""
    installed = []
    for tracker in recipe.training.report_to:
        stock, ours = TRACKERS[tracker]
        trainer.pop_callback(stock)
        callback = ours(run, recipe)
        trainer.add_callback(callback)
        installed.append(callback)
        where = callback.where()
        target = where.get("logdir") or where.get("tracking_uri") or where.get("dir")
        extra = f" ({where['mode']})" if "mode" in where else ""
        note(console, f"{tracker}: writing to {target}{extra}" + (f"; view: {where['view']}" if "view" in where
                                                                      else ""))
    return installed


def finish_trackers(trackers: list, status: str) -> None:
    """End each tracker's run with the training's status (completed, interrupted or failed); never raises, since a
    tracker failing to close must not hide the training's own outcome."""
    for tracker in trackers:
        try:
            tracker.finish(status)
        except Exception as exc:   # noqa: BLE001 - reported, not raised
            logging.getLogger(__name__).warning("could not close %s: %s", tracker.name, exc)
