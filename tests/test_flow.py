"""The whole flow on a tiny random-init BERT: what a user sees in MLflow afterwards."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from flows.finetune import finetune
from tasks.config import load_config

from .conftest import LABELS, registered_weights, tiny_overrides

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def finished_run(prefect_harness, tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    data = home / "reviews.csv"
    from .conftest import make_rows

    make_rows(72).to_csv(data, index=False)
    cfg = load_config(None, tiny_overrides(tiny_model_dir, data, home))
    summary = finetune(config=cfg)
    return cfg, summary


def test_run_has_config_metrics_and_artifacts(finished_run):
    cfg, summary = finished_run
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.tags["prefect.flow_run_id"] == summary.flow_run_id
    assert run.data.tags["data.fingerprint"] == summary.data_fingerprint
    for key in (
        "test/accuracy",
        "test/macro_f1",
        "test/macro_precision",
        "test/macro_recall",
        "yardstick/baseline/macro_f1",
        "test/f1/positive",
        "train/params_updated_fraction",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["train/tensors_updated_fraction"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id)}
    assert {"config", "evaluation", "validation", "data"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in evaluation
    assert "evaluation/per_class_f1.png" in evaluation
    training = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "training")}
    assert "training/training_curves.png" in training


def test_time_is_split_into_work_and_overhead(finished_run):
    """Work is forward and backward passes (optimizer steps, validation, test scoring), each
    timed inside its stage; overhead is the rest of the flow's wall time."""
    cfg, summary = finished_run
    m = MlflowClient(cfg.tracking_uri()).get_run(summary.mlflow_run_id).data.metrics
    steps, validation = m["efficiency/step_time_s"], m["efficiency/validation_s"]
    scoring, flow = m["efficiency/test_scoring_s"], m["time/flow_s"]
    assert min(steps, validation, scoring) > 0
    assert steps + validation <= m["time/train_s"]
    assert scoring <= m["time/evaluate_s"]
    stages = ("split_data", "train", "evaluate", "register_model", "promote")
    assert sum(m[f"time/{stage}_s"] for stage in stages) <= flow
    assert m["efficiency/work_s"] == pytest.approx(steps + validation + scoring)
    assert m["efficiency/overhead_s"] == pytest.approx(flow - m["efficiency/work_s"])
    assert m["efficiency/overhead_fraction"] == pytest.approx(m["efficiency/overhead_s"] / flow)
    assert 0 < m["efficiency/overhead_fraction"] < 1


def test_the_mlflow_ui_gets_what_it_shows(finished_run):
    """Model-training mode, Source and User, Datasets, a Description, single-value summaries,
    and a model card on the version."""
    cfg, summary = finished_run
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(summary.mlflow_run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    contexts = {
        t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"
    }
    assert contexts == {"train", "validation", "test"}
    description = run.data.tags["mlflow.note.content"]
    assert "training" in description and f"{summary.metrics['macro_f1']:.4f}" in description
    for key in ("efficiency/mfu", "train/runtime_s", "test/macro_f1"):
        [point] = client.get_metric_history(run.info.run_id, key)
        assert point.step == 0, key  # a value, not a one-dot line
    version = client.get_model_version(summary.model.name, summary.model.version)
    assert "Base model" in version.description and "Promotion gate" in version.description
    assert client.get_registered_model(summary.model.name).description


def test_only_what_lineage_needs_stays_in_the_work_folder(finished_run):
    _cfg, summary = finished_run
    work = Path(summary.workdir)
    assert not (work / "model").exists(), "the registered weights are not kept twice"
    assert (work / "test.parquet").exists(), "the split the version was scored on stays"


def test_training_loss_went_down(finished_run):
    cfg, summary = finished_run
    history = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri()).get_metric_history(
        summary.mlflow_run_id, "train/loss"
    )
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) >= 10
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_every_parameter_tensor_changed(finished_run, tiny_model_dir: Path, tmp_path: Path):
    cfg, summary = finished_run
    initial = load_file(tiny_model_dir / "model.safetensors")
    folder, _ = registered_weights(cfg.tracking_uri(), summary.model.model_uri, tmp_path)
    trained = load_file(folder / "model.safetensors")
    encoder = {k: v for k, v in initial.items() if not k.startswith("classifier")}
    assert encoder, "the initial checkpoint has encoder weights"
    unchanged = [k for k, v in encoder.items() if torch.equal(v, trained[k])]
    assert unchanged == []
    # The 3-class head is new, so it is compared with its shape only.
    assert trained["classifier.weight"].shape[0] == len(LABELS)


def test_registered_version_loads_back_and_predicts_declared_labels(finished_run):
    cfg, summary = finished_run
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    version = client.get_model_version_by_alias("tiny-sentiment", "challenger")
    assert str(version.version) == summary.model.version
    assert version.tags["lineage.mlflow_run_id"] == summary.mlflow_run_id
    assert version.tags["lineage.data_fingerprint"] == summary.data_fingerprint
    assert version.tags["lineage.prefect_flow_run_id"] == summary.flow_run_id
    assert "promotion.decision" in version.tags
    mlflow.set_tracking_uri(cfg.tracking_uri())
    model = mlflow.pyfunc.load_model("models:/tiny-sentiment@challenger")
    out = model.predict(pd.DataFrame({"text": ["love this great day", "awful broken thing"]}))
    assert set(out["label"]) <= set(LABELS)
    assert len(out) == 2


def test_test_metrics_are_consistent(finished_run):
    _, summary = finished_run
    assert 0.0 <= summary.metrics["macro_f1"] <= 1.0
    # The majority baseline predicts one class of three on a balanced test split.
    assert summary.baseline["accuracy"] == pytest.approx(1 / 3)


@pytest.fixture
def receiver():
    """A local HTTP endpoint that records what is posted to it."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_a_failed_run_and_a_promotion_are_posted_to_the_webhook(
    prefect_harness, receiver, tiny_model_dir: Path, tmp_path: Path
):
    from prefect.blocks.webhook import Webhook
    from prefect.states import Completed

    from flows import notify
    from flows.finetune import RunSummary
    from tasks.results import Decision, RegisteredModel

    url, received = receiver
    Webhook(url=url, allow_private_urls=True).save("fulltune-test-hook", overwrite=True)
    data = tmp_path / "rows.csv"
    from .conftest import make_rows

    make_rows(72).drop(columns="sentiment").to_csv(data, index=False)
    cfg = load_config(
        None,
        [
            *tiny_overrides(tiny_model_dir, data, tmp_path),
            "notify.webhook_block=fulltune-test-hook",
        ],
    )
    with pytest.raises(Exception, match="required column"):
        finetune(config=cfg)
    [failure] = received
    assert failure["event"] == "failure" and "required column" in failure["message"]
    assert failure["data"] == str(data)

    # A promotion, as the completion hook sees a finished run whose version became champion.
    summary = RunSummary(
        mlflow_run_id="r1",
        flow_run_id="f1",
        model=RegisteredModel(name="m", version="3", alias="challenger", model_uri="models:/m/3"),
        metrics={},
        baseline={},
        classical={},
        table="",
        decision=Decision.model_construct(promoted=True, reason="beats v2 by 0.02"),
        data_fingerprint="x",
        workdir=str(tmp_path),
        mlflow_run_url="http://127.0.0.1:5000/#/experiments/1/runs/r1",
    )

    class Run:
        name, id, parameters = "happy-run", "f1", {"config": cfg.model_dump(mode="json")}

    notify.on_completion(finetune, Run(), Completed(data=summary))
    assert received[-1] == received[1]
    assert received[1]["event"] == "promotion" and received[1]["version"] == "3"
    assert received[1]["reason"] == "beats v2 by 0.02"
