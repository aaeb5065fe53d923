"""training.report_to: TensorBoard, MLflow and W&B each receive what training logged (read back from their own
files, offline), write inside the run directory unless the environment points them elsewhere, and run.json and
`ftcli runs show` say where."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import TINY_RECIPE, losses, memorisable_chat, metrics, run_inproc, write_jsonl, write_recipe

pytestmark = pytest.mark.slow   # a training run with the three trackers, and their libraries' imports

# What could send a tracker elsewhere (or online) from the developer's own environment.
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "TENSORBOARD_LOGGING_DIR",
               "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "HF_MLFLOW_LOG_ARTIFACTS")
ALL_THREE = "training.report_to=[tensorboard, mlflow, wandb]"


def train_tracked(root: Path, name: str, model_dir: Path, mp: pytest.MonkeyPatch, *extra: str, env=None):
    """`ftcli train` of the tiny recipe (3 steps, eval data) with the working folder at `root`, offline, with only
    `env` of the trackers' environment variables set."""
    data = write_jsonl(root / "train.jsonl", memorisable_chat())
    recipe = write_recipe(root / f"{name}.yaml", TINY_RECIPE.format(model=model_dir, data=data))
    for key in TRACKER_ENV:
        mp.delenv(key, raising=False)
    mp.setenv("WANDB_MODE", "offline")   # ftcli's own default too; set so that nothing here can go online
    for key, value in (env or {}).items():
        mp.setenv(key, value)
    mp.chdir(root)                       # anything a tracker put in the working folder would show up here
    result = run_inproc("train", recipe, "--runs-dir", root / "runs", "--name", name, "--set", f"data.eval={data}",
                        "--set", "training.max_steps=3", "--set", "training.save_steps=100", *extra, "--json")
    assert result.exit_code == 0, result
    return root / "runs" / name, result


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    """One run trained with all three trackers at once: (run folder, the train command's result)."""
    with pytest.MonkeyPatch.context() as mp:
        return train_tracked(tmp_path_factory.mktemp("tracked"), "tracked", tiny_model_dir, mp, "--set", ALL_THREE)


def run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def test_tensorboard_holds_the_loss_and_learning_rate_of_every_step(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked
    logdir = run / "tracking" / "tensorboard"
    events = EventAccumulator(str(logdir))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected_loss = losses(run)
    assert set(scalars["train/loss"]) == set(expected_loss) == {1, 2, 3}
    for step, loss in expected_loss.items():   # TensorBoard stores float32
        assert scalars["train/loss"][step] == pytest.approx(loss, rel=1e-6)
    rates = {m["step"]: m["learning_rate"] for m in metrics(run) if "learning_rate" in m}
    assert scalars["train/learning_rate"] == pytest.approx(rates, rel=1e-6)
    # The evaluation after training logs too, and the resolved recipe is there as text.
    assert scalars["eval/loss"][3] == pytest.approx(run_json(run)["metrics"]["eval_loss"], rel=1e-6)
    assert "ftcli/recipe/text_summary" in events.Tags()["tensors"]


def test_mlflow_holds_the_recipe_params_and_the_metrics(tracked):
    from mlflow import MlflowClient

    run, _ = tracked
    where = run_json(run)["tracking"]["mlflow"]
    assert where["tracking_uri"] == f"sqlite:///{run}/tracking/mlflow/mlflow.db"
    client = MlflowClient(where["tracking_uri"])
    experiment = client.get_experiment_by_name("ftcli")
    assert experiment.artifact_location == (run / "tracking" / "mlflow" / "artifacts").as_uri()
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_id == where["run_id"] and logged.info.status == "FINISHED"
    assert logged.info.run_name == "tracked" and logged.data.tags["ftcli.run"] == "tracked"
    params = logged.data.params
    # ftcli's resolved recipe, beside transformers' own TrainingArguments dump
    assert params["recipe.method.kind"] == "lora" and params["recipe.method.r"] == "8"
    assert float(params["recipe.training.lr"]) == 5e-3 and params["recipe.training.max_steps"] == "3"
    assert json.loads(params["recipe.method.target_modules"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert json.loads(params["recipe.training.report_to"]) == ["tensorboard", "mlflow", "wandb"]
    assert float(params["learning_rate"]) == 5e-3
    history = {m.step: m.value for m in client.get_metric_history(where["run_id"], "loss")}
    assert history == pytest.approx(losses(run), rel=1e-9)
    [eval_loss] = client.get_metric_history(where["run_id"], "eval_loss")
    assert eval_loss.value == pytest.approx(run_json(run)["metrics"]["eval_loss"], rel=1e-9)


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte ':W&B' header, then LevelDB-log chunks (4-byte checksum,
    2-byte little-endian length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:          # a block's tail too short for a chunk header is padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_writes_an_offline_run_with_the_losses_and_the_recipe(tracked):
    run, _ = tracked
    where = run_json(run)["tracking"]["wandb"]
    run_dir = Path(where["run_dir"])
    assert run_dir.parent == run / "tracking" / "wandb" and run_dir.name.startswith("offline-run-")
    assert where["mode"] == "offline" and where["view"] == f"wandb sync {run_dir}"
    records = list(wandb_records(run_dir / f"run-{where['run_id']}.wandb"))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds                           # finished, not left open
    [started] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "tracked" and started.project == "ftcli"
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = {row["train/global_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert logged == pytest.approx(losses(run), rel=1e-9)
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["recipe"]["method"]["r"] == 8 and config["recipe"]["training"]["report_to"][2] == "wandb"


def test_trackers_write_inside_the_run_and_runs_show_says_where(tracked):
    run, result = tracked
    root = run.parent.parent
    assert sorted(p.name for p in root.iterdir()) == ["runs", "tracked.yaml", "train.jsonl"]   # nothing in the cwd
    assert json.loads(result.stdout)["status"] == "completed"                 # --json stayed one document
    tracking = run_json(run)["tracking"]
    assert tracking["tensorboard"]["logdir"] == str(run / "tracking" / "tensorboard")
    assert set(tracking) == {"tensorboard", "mlflow", "wandb"}
    shown = run_inproc("runs", "show", "tracked", "--runs-dir", run.parent)
    assert shown.exit_code == 0, shown
    text = re.sub(r"[\s│]", "", shown.stdout)   # the table folds long values over several lines
    for expected in ("tracking tensorboard", f"view tensorboard tensorboard --logdir {run}/tracking/tensorboard",
                     f"view mlflow mlflow ui --backend-store-uri sqlite:///{run}/tracking/mlflow/mlflow.db",
                     f"view wandb wandb sync {tracking['wandb']['run_dir']}", tracking["mlflow"]["run_id"]):
        assert re.sub(r"\s", "", expected) in text, expected
    as_json = run_inproc("runs", "show", "tracked", "--runs-dir", run.parent, "--json").json()
    assert as_json["tracking"] == tracking


def test_the_environment_sends_the_trackers_elsewhere(tracked, tmp_path, tiny_model_dir, monkeypatch):
    from mlflow import MlflowClient

    # An MLflow store outside this run: the tracked run's (already created, which keeps this test quick).
    uri = run_json(tracked[0])["tracking"]["mlflow"]["tracking_uri"]
    elsewhere = tmp_path / "elsewhere"
    env = {"TENSORBOARD_LOGGING_DIR": str(elsewhere / "tb"), "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_EXPERIMENT_NAME": "mine", "WANDB_DIR": str(elsewhere), "WANDB_PROJECT": "theirs"}
    run, _ = train_tracked(tmp_path, "moved", tiny_model_dir, monkeypatch, "--set", ALL_THREE, env=env)
    assert not (run / "tracking").exists()
    tracking = run_json(run)["tracking"]
    assert tracking["tensorboard"]["logdir"] == str(elsewhere / "tb")
    assert any(p.name.startswith("events.out.tfevents") for p in (elsewhere / "tb").iterdir())
    assert tracking["mlflow"]["tracking_uri"] == uri and tracking["mlflow"]["experiment"] == "mine"
    client = MlflowClient(uri)
    [logged] = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert logged.info.run_id == tracking["mlflow"]["run_id"]
    assert {m.step: m.value for m in client.get_metric_history(logged.info.run_id, "loss")} == \
        pytest.approx(losses(run), rel=1e-9)
    assert Path(tracking["wandb"]["run_dir"]).parent == elsewhere / "wandb" and tracking["wandb"]["project"] == "theirs"
    assert (Path(tracking["wandb"]["run_dir"]) / f"run-{tracking['wandb']['run_id']}.wandb").is_file()


def test_a_missing_tracker_package_exits_4_with_the_pip_command(tiny_recipe, runs_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    result = run_inproc("train", tiny_recipe, "--set", "training.report_to=[tensorboard, mlflow]", "--json")
    assert result.exit_code == 4, result
    assert "training.report_to lists mlflow, which is not installed" in result.stderr
    assert "pip install mlflow" in result.stderr and "pip install 'ftcli[trackers]'" in result.stderr
    assert result.json()["exit_code"] == 4 and not (runs_dir / "tiny").exists()


def test_recipe_params_and_the_offline_default(tiny_recipe, monkeypatch, tmp_path):
    from ftcli.recipe.loader import load_recipe
    from ftcli.runs.rundir import RunDir
    from ftcli.training.trackers import FtcliWandb, recipe_params

    recipe = load_recipe(tiny_recipe, ["data.chat_template=" + "x" * 7000]).recipe
    params = recipe_params(recipe)
    assert params["recipe.method.r"] == "8" and params["recipe.data.max_length"] == "64"
    assert params["recipe.method.dropout"] == "0.0" and params["recipe.quantization"] == "null"
    assert len(params["recipe.data.chat_template"]) == 6000 and params["recipe.data.chat_template"].endswith("…")
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    run = RunDir(tmp_path, "r")
    callback = FtcliWandb(run, recipe)
    assert (callback.mode, callback.project, callback.where()["dir"]) == ("offline", "ftcli", str(run.wandb_dir))
