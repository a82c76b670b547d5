"""MLflow at the edges: one run per flow run, opened and closed by the flow.

Nothing here connects to a server at import time. Every function takes the run id explicitly
instead of relying on MLflow's thread-local "active run", because Prefect may run tasks on other
threads than the flow.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from transformers import TrainerCallback

from tasks.config import RunConfig

# MLflow caps a param value at 6000 characters and a batch at 100 params.
MAX_PARAM_CHARS = 6000
PARAM_BATCH = 100


def configure(cfg: RunConfig) -> str:
    """Point MLflow at the configured store and return its URI."""
    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        create_sqlite_store(uri)
    user_value = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # mlflow exports the URI to the environment for subprocesses. Put the user's own value back,
    # or the next run in this process (a served deployment, a test) would take this run's store
    # for the user's choice.
    if user_value is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_value
    return uri


def create_sqlite_store(uri: str) -> None:
    """Create a local SQLite store once, under a file lock.

    MLflow creates its tables on first use; two processes doing that at once (two runs started
    together on a new store) race on the schema. The lock makes the first one create it.
    """
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / f".{path.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri, registry_uri=uri).search_experiments(max_results=1)
        MlflowClient(uri, registry_uri=uri).search_registered_models(max_results=1)


def start_run(cfg: RunConfig, tags: dict[str, str], run_name: str | None = None) -> str:
    """Create the run for one flow run, log the flattened config as params, return its id."""
    configure(cfg)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        local = (
            cfg.tracking_uri().startswith(("sqlite:", "file:")) or "://" not in cfg.tracking_uri()
        )
        experiment_id = client.create_experiment(
            cfg.registry.experiment, artifact_location=cfg.artifact_location() if local else None
        )
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in cfg.flat().items()]
    for i in range(0, len(params), PARAM_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAM_BATCH])
    client.log_dict(run_id, cfg.model_dump(mode="json"), "config/config.json")
    return run_id


def find_unfinished_runs(cfg: RunConfig, resume_key: str) -> list[str]:
    """Runs of this config and data that did not finish (killed, failed, or still going)."""
    configure(cfg)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`fulltune.resume_key` = '{resume_key}' and "
        "attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    return [run.info.run_id for run in runs]


def reattach_run(run_id: str, tags: dict[str, str]) -> None:
    """Mark an interrupted run RUNNING again, under this flow run."""
    client = MlflowClient()
    client.update_run(run_id, status="RUNNING")
    set_tags(run_id, tags)


def last_logged_step(run_id: str, key: str = "train/loss") -> int:
    history = MlflowClient().get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def end_run(run_id: str, status: str) -> None:
    MlflowClient().set_terminated(run_id, status=status)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log finite metrics in one call (MLflow rejects NaN in some stores)."""
    now = int(time.time() * 1000)
    batch = [
        Metric(_metric_key(k), float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(v)
    ]
    MlflowClient().log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(run_id: str, path: str | Path, folder: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), folder)


def log_json(run_id: str, payload: Any, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, json.dumps(payload, indent=2, default=str), artifact_file)


def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Rows as an MLflow table (shown in the run's Evaluation/Artifacts views)."""
    import pandas as pd

    MlflowClient().log_table(run_id, pd.DataFrame(rows), artifact_file)


def _metric_key(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . space : and /.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


class MlflowMetricsCallback(TrainerCallback):
    """Send the Trainer's logs (loss, learning rate, grad norm, eval metrics) to one MLflow run.

    One batched call per logging step: no per-step round trips beyond what the user asked for
    with ``logging_steps``.
    """

    def __init__(self, run_id: str, after_step: int = -1):
        self.run_id = run_id
        # A resumed run replays the steps between its checkpoint and the crash: those metric
        # steps are in MLflow already, and are not logged twice.
        self.after_step = after_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or state.global_step <= self.after_step:
            return
        renamed = {
            (f"val/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"): v
            for key, v in logs.items()
        }
        log_metrics(self.run_id, renamed, step=state.global_step)
