"""What keeps runs trustworthy on a shared machine: errors named before compute, retries only for
transient failures, killed runs marked, credentials never shown, registration done once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from flows.policies import is_transient
from tasks import tracking
from tasks.config import ConfigError, RunConfig, load_config, redact_uri
from tasks.distributed import DistributedError
from tasks.preflight import ALLOWED_ROOTS_ENV, ALLOWED_TRACKING_ENV, PreflightError, preflight
from tasks.results import TrainJob


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionResetError("peer went away"), True),
        (TimeoutError("read timed out"), True),
        (OSError(28, "No space left on device"), True),
        (FileNotFoundError("data.csv"), False),
        (ValueError("bad config"), False),
        (RuntimeError("The size of tensor a (1024) must match the size of tensor b (512)"), False),
        (TypeError("unhashable type: 'dict'"), False),
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
        (MlflowException.invalid_parameter_value("bad alias"), False),
        (RuntimeError("(sqlite3.OperationalError) database is locked"), True),
        (DistributedError("rank 1 exited with -9", signalled=True), True),
        (DistributedError("rank 1 raised IndexError"), False),
    ],
)
def test_only_transient_failures_are_retried(error: BaseException, transient: bool):
    assert is_transient(error) is transient


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("https://user:tok@mlflow.example.com", "https://user:***@mlflow.example.com"),
        ("https://mlflow.example.com/?token=abc&x=1", "https://mlflow.example.com/?token=***&x=1"),
        ("sqlite:////home/me/.fulltune/mlflow.db", "sqlite:////home/me/.fulltune/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_credentials_are_redacted_and_nothing_else_changes(uri: str, shown: str):
    assert redact_uri(uri) == shown


def test_a_password_never_reaches_params_or_the_logged_config():
    cfg = RunConfig.model_validate(
        {"registry": {"tracking_uri": "postgresql://mlflow:s3cret@db/mlflow"}}
    )
    assert "s3cret" not in str(cfg.flat())
    assert "s3cret" not in cfg.redacted().model_dump_json()
    assert "s3cret" in cfg.model_dump_json(), "the run itself still connects with it"
    assert "tracking_uri" not in TrainJob.model_fields, "nor the job file the ranks read"


def test_a_misspelt_override_is_blamed_on_itself_with_the_nearest_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=3"])
    assert "--set 'train.epoch=3'" in str(err.value)
    assert "did you mean train.epochs?" in str(err.value)
    with pytest.raises(ConfigError, match=r"--set 'train.batch_size=x': train.batch_size"):
        load_config(None, ["train.batch_size=x"])


def test_preflight_names_every_problem_at_once(tiny_model_dir: Path, tmp_path: Path):
    cfg = load_config(
        None,
        [
            f"home={tmp_path / 'home'}",
            f"model.name_or_path={tiny_model_dir}",
            "model.max_length=512",
            f"data.train={tmp_path / 'missing.csv'}",
            "registry.alias=latest",
            "registry.model_name=a:b",
        ],
    )
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    message = str(err.value)
    for expected in (
        "model.max_length: 512 is more than the 128 positions",
        "data.train:",
        "missing.csv: file not found",
        "registry.alias: 'latest'",
        "registry.model_name:",
    ):
        assert expected in message


def test_a_served_deployment_refuses_paths_and_stores_off_its_allow_list(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    data = allowed / "data" / "rows.csv"
    data.write_text("text,label\n")
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, f"{allowed}:{tiny_model_dir}")
    monkeypatch.setenv(ALLOWED_TRACKING_ENV, f"sqlite:///{allowed / 'home' / 'mlflow.db'}")
    inside = load_config(
        None,
        [
            f"home={allowed / 'home'}",
            f"data.train={data}",
            f"model.name_or_path={tiny_model_dir}",
            "model.max_length=64",
        ],
    )
    preflight(inside)  # nothing to object to
    outside = inside.model_copy(update={"home": str(tmp_path / "elsewhere")})
    outside = RunConfig.model_validate(
        outside.model_dump() | {"data": outside.data.model_dump() | {"test": "/etc/passwd"}}
    )
    with pytest.raises(PreflightError) as err:
        preflight(outside)
    assert "home:" in str(err.value) and "data.test: /etc/passwd is outside" in str(err.value)
    assert "registry.tracking_uri" in str(err.value), "another home means another store"


def store(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.create_sqlite_store(uri)
    return uri, MlflowClient(uri, registry_uri=uri)


def test_a_run_whose_process_died_is_marked_killed_and_a_live_one_is_not(tmp_path: Path):
    _, client = store(tmp_path)
    experiment = client.create_experiment("fulltune")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = client.create_run(
        experiment,
        tags=tracking.process_tags() | {"fulltune.pid": dead.stdout.strip()},
    ).info.run_id
    live = client.create_run(experiment, tags=tracking.process_tags()).info.run_id
    assert tracking.mark_killed_runs(client, experiment) == [orphan]
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"


def test_an_experiment_created_by_a_racing_run_is_taken_not_fought(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    uri, client = store(tmp_path)
    cfg = RunConfig.model_validate({"home": str(tmp_path), "registry": {"tracking_uri": uri}})
    winner = client.create_experiment("fulltune")  # the other run got there first...
    lookups = iter([None])  # ...just after this run looked and found nothing
    original = MlflowClient.get_experiment_by_name
    monkeypatch.setattr(
        MlflowClient,
        "get_experiment_by_name",
        lambda self, name: next(lookups, None) or original(self, name),
    )
    assert tracking.experiment_id(client, cfg) == winner


@pytest.mark.flow
def test_registration_retried_after_a_failure_registers_once(tiny_model_dir: Path, tmp_path: Path):
    """A retry of the register stage reuses the model the first attempt logged and the version it
    created; every version carries its lineage tags from the moment it exists."""
    import mlflow

    from tasks.config import RegistryConfig
    from tasks.kinds import get_kind
    from tasks.register import register_model

    uri, client = store(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    run_id = client.create_run(client.create_experiment("fulltune")).info.run_id
    kind = get_kind("text-classification")
    cfg = RegistryConfig(model_name="tiny", alias="challenger")

    def attempt():
        return register_model(
            str(tiny_model_dir),
            cfg,
            run_id,
            kind,
            ["a text"],
            {"lineage.mlflow_run_id": run_id},
            {},
        )

    first, retry = attempt(), attempt()
    assert first == retry
    [version] = client.search_model_versions("name = 'tiny'")
    assert version.tags["lineage.mlflow_run_id"] == run_id
    logged = mlflow.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id], output_format="list"
    )
    assert len(logged) == 1, "the model's artifacts are written once"


def test_a_failed_run_is_marked_even_if_a_second_interrupt_arrives(tmp_path: Path, monkeypatch):
    """A lost server interrupts the run again every few seconds; one landing while the failure is
    recorded must not leave the MLflow run RUNNING."""
    import _thread
    import time

    cfg = RunConfig(home=str(tmp_path))
    run_id = tracking.start_run(cfg, {}, "interrupted")
    recorded = tracking.record_failure

    def record_then_interrupted(run: str, err: BaseException) -> None:
        _thread.interrupt_main()  # the second interrupt, while the first is being recorded
        time.sleep(0.2)
        recorded(run, err)

    monkeypatch.setattr(tracking, "record_failure", record_then_interrupted)
    with pytest.raises(KeyboardInterrupt), tracking.failing_run(run_id):
        raise KeyboardInterrupt
    run = MlflowClient(cfg.tracking_uri()).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["fulltune.error"].startswith("KeyboardInterrupt")
