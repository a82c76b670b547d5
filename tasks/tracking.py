"""MLflow at the edges: one run per flow run, opened and closed by the flow.

Nothing here connects to a server at import time. Every function takes the run id explicitly
instead of relying on MLflow's thread-local "active run", because Prefect may run tasks on other
threads than the flow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import psutil
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from tasks.config import RunConfig, redact_uri
from tasks.environment import restored_environment

# MLflow caps a param value at 6000 characters and a batch at 100 params.
log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000
PARAM_BATCH = 100


def configure(cfg: RunConfig) -> str:
    """Point MLflow at the configured store and return its URI."""
    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        create_sqlite_store(uri)
    point_at(uri)
    return uri


def point_at(uri: str) -> None:
    """MLflow's tracking and registry on ``uri``. mlflow also exports it to the environment for
    subprocesses; the user's own value (or none) is put back."""
    with restored_environment("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)


def create_sqlite_store(uri: str) -> None:
    """Create a local SQLite store once, under a file lock.

    MLflow creates its tables on first use; two processes doing that at once (two runs started
    together on a new store) race on the schema. The lock makes the first one create it.
    """
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.parent / f".{path.name}.lock"):
        MlflowClient(uri, registry_uri=uri).search_experiments(max_results=1)
        MlflowClient(uri, registry_uri=uri).search_registered_models(max_results=1)


def experiment_id(
    client: MlflowClient, cfg: RunConfig, headline: tuple[str, bool] | None = None
) -> str:
    """The configured experiment's id, created if missing; safe when runs race to create it.
    With ``headline`` (the kind's test metric and whether higher is better), the runs table's
    default view leads with it, unless the experiment has a view already.

    Two first runs on a new store both find no experiment and both create it: the loser gets
    RESOURCE_ALREADY_EXISTS (the store's unique constraint) and takes the winner's.
    """
    name = cfg.registry.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        uri = cfg.tracking_uri()
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        try:
            client.create_experiment(
                name,
                artifact_location=cfg.artifact_location() if local else None,
                tags=EXPERIMENT_TAGS,
            )
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None, f"experiment {name!r} exists but cannot be read"
    views = dict([runs_view_tag(*headline)]) if headline else {}
    for key, value in (EXPERIMENT_TAGS | views).items():
        if experiment.tags.get(key) is None:  # also for experiments made before fulltune set them
            try:
                client.set_experiment_tag(experiment.experiment_id, key, value)
            except MlflowException:
                # A run starting at the same time set it first (a UNIQUE constraint on the SQL
                # store): what matters is that the tag is there.
                again = client.get_experiment(experiment.experiment_id)
                if again.tags.get(key) is None:
                    raise
    return str(experiment.experiment_id)


# The MLflow UI (3.x) opens an experiment in GenAI mode (traces) unless its kind says model
# training; the value is the UI's own for "Model training".
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "Full-parameter fine-tuning runs by fulltune: one run per flow run, "
    "each with its data, config, training curves, test metrics against yardsticks, and the "
    "registered model version it produced.",
}


# A saved view of the runs table (the UI's *Views*), stored the way the UI stores one. It leads with
# what decides (the task's test metric, its classical yardstick, the gate's decision and the alias
# the version holds) and sorts by the test metric. The UI draws its fixed attribute columns first
# (Run Name, Created, Duration), then the metrics by name, then the tags, so the view names no
# other attribute column and the yardsticks' keys sort after the model's own (``yardstick/...``):
# at 1600 px the deciding columns are on the first screen. Open it with
# ``?viewStateShareKey=fulltune``.
VIEW_KEY = "fulltune"
YARDSTICKS = "yardstick"  # the metric prefix of the yardsticks: yardstick/baseline/…, …/classical/…


def view_columns(headline: str) -> tuple[str, ...]:
    """The saved view's columns for a kind whose test metric is ``headline``."""
    return (
        f"metrics.`test/{headline}`",
        f"metrics.`{YARDSTICKS}/classical/{headline}`",
        "tags.`fulltune.decision`",
        "tags.`fulltune.alias`",
    )


def runs_view_tag(headline: str, greater_is_better: bool) -> tuple[str, str]:
    """(tag key, value) of the saved runs-table view, sorted best first by ``test/{headline}``."""
    import base64
    import zlib

    state = {
        "searchFilter": "",
        "orderByKey": f"metrics.`test/{headline}`",
        "orderByAsc": not greater_is_better,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": list(view_columns(headline)),
        # The UI applies a width only to a column the order names (Run Name and Created are pinned).
        "columnOrder": ["duration", *view_columns(headline)],
        "columnWidths": {f"metrics.`{YARDSTICKS}/classical/{headline}`": 140},
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0},
    }
    packed = base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    now = int(time.time() * 1000)
    value = {"name": f"fulltune: best test/{headline}", "createdAt": now, "updatedAt": now}
    return f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(value | {"state": f"deflate;{packed}"})


def shown(value: float) -> float:
    """A test metric as the UIs show it: four significant digits below 1, four decimals above
    (the exact values stay in ``evaluation/test_metrics.json``)."""
    return float(f"{value:.4g}") if abs(value) < 1 else round(value, 4)


def ui_url(server: str, experiment_id: str) -> str:
    """The experiment's runs table in model-training mode, with fulltune's metric columns."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def ui_base(tracking_uri: str) -> tuple[str, bool]:
    """(the MLflow UI's address for a tracking URI, whether it is served now).

    A server URI is its own UI; a local store is served by ``make ui`` on port 5000."""
    if tracking_uri.startswith(("http://", "https://")):
        return redact_uri(tracking_uri).rstrip("/"), True
    return f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}", False


def run_page(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, opened in model-training mode (not GenAI)."""
    base, _ = ui_base(tracking_uri)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def version_page(tracking_uri: str, name: str, version: str) -> str:
    """A registered model version's page (its model card) in the MLflow UI."""
    base, _ = ui_base(tracking_uri)
    return f"{base}/#/models/{quote(name, safe='')}/versions/{version}"


def link_in_prefect(key: str, link: str, text: str, tracking_uri: str) -> None:
    """A Prefect link artifact to an MLflow page, under the current flow or task run."""
    from prefect.artifacts import create_link_artifact

    _, served = ui_base(tracking_uri)
    note = "" if served else " (served by `make ui`: a local store has no UI of its own)"
    create_link_artifact(link=link, link_text=text, key=key, description=f"{text}{note}")


def context_tags() -> dict[str, str]:
    """MLflow's own context tags: the user, the source (entry point) and its git commit."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: str(v) for k, v in resolve_tags({}).items()}


def process_tags() -> dict[str, str]:
    """Which process writes a run: a RUNNING run whose process is gone was killed."""
    me = psutil.Process()
    return {
        "fulltune.host": socket.gethostname(),
        "fulltune.pid": str(me.pid),
        "fulltune.process_started": f"{me.create_time():.2f}",
    }


def process_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process a run's tags name still runs (the same process, not a reused pid)."""
    try:
        process = psutil.Process(int(tags["fulltune.pid"]))
        return abs(process.create_time() - float(tags["fulltune.process_started"])) < 1
    except (KeyError, ValueError, psutil.Error):
        return False


def mark_killed_runs(client: MlflowClient, experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone; their ids.

    A killed run keeps its checkpoints: ``claim_run`` still resumes it (it looks for any run
    that did not finish).
    """
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment],
        filter_string=f"attributes.status = 'RUNNING' and tags.`fulltune.host` = '{host}'",
        max_results=200,
    )
    killed = [run.info.run_id for run in runs if not process_alive(run.data.tags)]
    for run_id in killed:
        client.set_terminated(run_id, status="KILLED")
        client.set_tag(run_id, "fulltune.killed_note", "its process ended without finishing")
    return killed


def start_run(
    cfg: RunConfig,
    tags: dict[str, str],
    run_name: str | None = None,
    headline: tuple[str, bool] | None = None,
) -> str:
    """Create the run for one flow run, log the flattened config as params, return its id
    (``headline``: see :func:`experiment_id`)."""
    configure(cfg)
    client = MlflowClient()
    experiment = experiment_id(client, cfg, headline)
    mark_killed_runs(client, experiment)
    run = client.create_run(
        experiment, run_name=run_name, tags=context_tags() | tags | process_tags()
    )
    run_id = run.info.run_id
    params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in cfg.flat().items()]
    for i in range(0, len(params), PARAM_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAM_BATCH])
    client.log_dict(run_id, cfg.redacted().model_dump(mode="json"), "config/config.json")
    return run_id


def find_unfinished_runs(cfg: RunConfig, resume_key: str) -> list[str]:
    """Runs of this config and data that did not finish (killed, failed, or still going).

    Runs left RUNNING by a process that is gone are marked KILLED first, on every run.
    """
    configure(cfg)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        return []
    mark_killed_runs(client, experiment.experiment_id)
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
    set_tags(run_id, tags | process_tags())


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


def process_started() -> float:
    """When this process started, in epoch seconds, to the kernel's clock tick (10 ms).

    psutil's ``create_time`` adds the start offset to the boot time of ``/proc/stat``, which the
    kernel gives in whole seconds: it reads up to a second early (0.6 s on the machine the cold
    start was measured on). On Linux the offset is read against the boot-time clock instead.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return psutil.Process().create_time()


FIRST_STAGE_TAG = "fulltune.first_stage_at"  # epoch seconds when the data contract started


def log_process_times(run_id: str) -> dict[str, float]:
    """The command's own times, logged to its run once the flow is done: ``time/cold_start_s``
    (process start to the start of the run's first stage, the data contract: interpreter,
    imports, config, the Prefect server, the preflight, the tokenizer), ``time/process_s``, and
    the overhead share of the whole command (``efficiency/process_overhead_fraction``, process
    start and imports included)."""
    run = MlflowClient().get_run(run_id)
    born = process_started()
    alive = time.time() - born
    work = run.data.metrics.get("efficiency/work_s", 0.0)
    first_stage = float(run.data.tags.get(FIRST_STAGE_TAG, run.info.start_time / 1000))
    times = {
        "time/cold_start_s": first_stage - born,
        "time/process_s": alive,
        "efficiency/process_overhead_fraction": (alive - work) / alive,
    }
    log_metrics(run_id, times)
    return times


def log_metrics_once(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log a stage's summary values unless the run has them already (a resumed run repeats its
    stages, and each repeat would add a second point at step 0)."""
    logged = MlflowClient().get_run(run_id).data.metrics
    log_metrics(run_id, {k: v for k, v in metrics.items() if _metric_key(k) not in logged})


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (no display on servers and CI); imported on
    first use, since it takes a while and a run's first stages draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_training_curves(run_id: str, path: Path) -> None:
    """Training loss per step and every validation metric per evaluation, as one PNG.

    Drawn from the run's own metric history, so a resumed run's curve is whole; a single
    validation point shows as a marker.
    """
    plt = pyplot()
    client = MlflowClient()
    keys = sorted(client.get_run(run_id).data.metrics)
    validation = [k for k in keys if k.startswith("val/") and not k.endswith(("_s", "runtime"))]
    validation = [k for k in validation if "per_second" not in k][:4]
    panels = [["train/loss"], validation] if validation else [["train/loss"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for key in panel:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            ax.plot(
                [m.step for m in history],
                [m.value for m in history],
                marker="o",
                markersize=3 if len(history) > 20 else 6,
                label=key,
            )
        ax.set_xlabel("optimizer step")
        ax.set_title("training loss" if panel == ["train/loss"] else "validation")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    client.log_artifact(run_id, str(path), "training")


def log_datasets(run_id: str, splits: Mapping[str, str], digest: str) -> None:
    """The run's train, validation and test tables as MLflow datasets (the UI's Datasets column).

    ``splits`` maps each context to its parquet file. Each dataset records its schema, row count,
    content digest, target column (``label`` when the table has one) and where it came from.
    """
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for context, path in splits.items():
        frame = pd.read_parquet(path)
        target = "label" if "label" in frame.columns else None
        with warnings.catch_warnings():  # MLflow registers two equal sources for local paths
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = from_pandas(
                frame, source=path, targets=target, name=f"{context}-{digest[:8]}"
            )
        tags = [InputTag("mlflow.data.context", context)]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    MlflowClient().log_inputs(run_id, datasets=inputs)


def describe_run(run_id: str, text: str) -> None:
    """The run's description (the UI's Description field)."""
    MlflowClient().set_tag(run_id, "mlflow.note.content", text)


def record_failure(run_id: str, err: BaseException) -> None:
    """Why a run failed, on the run itself (tag ``fulltune.error`` and its description), so the
    MLflow UI says it without the terminal. Best effort: the store may be what failed."""
    cause = f"{type(err).__name__}: {err}".strip()
    try:
        set_tags(run_id, {"fulltune.error": cause[:5000]})
        describe_run(run_id, f"**Failed.** {cause[:2000]}")
    except Exception:  # a full disk or a lost store: the terminal and the log still say it
        log.debug("could not record the failure on run %s", run_id, exc_info=True)


OPEN_RUNS: set[str] = set()  # the runs of this process inside failing_run


@contextmanager
def failing_run(run_id: str) -> Iterator[None]:
    """Within the block, any exception (an interrupt included) is recorded on the run, which ends
    FAILED, and raised again: a run never stays RUNNING after its work failed. The record is
    written with interrupts held back, so a second one cannot cut it short."""
    OPEN_RUNS.add(run_id)
    try:
        yield
    except BaseException as err:
        with uninterrupted():
            record_failure(run_id, err)
            end_run(run_id, "FAILED")
        raise
    finally:
        OPEN_RUNS.discard(run_id)


def fail_open_runs(reason: str) -> None:
    """End FAILED every run of this process still inside :func:`failing_run`, recording
    ``reason``: for a process about to exit without unwinding (best effort)."""
    for run_id in list(OPEN_RUNS):
        with suppress(Exception):
            set_tags(run_id, {"fulltune.error": reason[:5000]})
            end_run(run_id, "FAILED")


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C, ``_thread.interrupt_main``) for the block, in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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


METRIC_KEY_CHARS = 250  # MLflow's limit on a metric name


def _metric_key(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . space : and /, up to 250 characters; a
    # longer one (a label that is a paragraph) keeps its start and a digest of the whole.
    clean = "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)
    if len(clean) <= METRIC_KEY_CHARS:
        return clean
    import hashlib

    return f"{clean[: METRIC_KEY_CHARS - 11]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
