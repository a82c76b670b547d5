"""Multi-process training: two CPU processes under torchrun (DDP over gloo) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.finetune import finetune
from tasks.config import load_config

from .conftest import make_rows, tiny_overrides

pytestmark = pytest.mark.integration


def test_two_processes_train_in_step_and_register_once(
    tiny_model_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    data = tmp_path / "reviews.csv"
    make_rows(96).to_csv(data, index=False)
    cfg = load_config(
        None,
        [
            *tiny_overrides(tiny_model_dir, data, tmp_path / "home"),
            "train.num_processes=2",
            "train.max_steps=20",
            "train.batch_size=4",  # per process: an effective batch of 8
            # The last step's weights, not a checkpoint loaded from disk: any drift would show.
            "train.select_best=false",
        ],
    )
    summary = finetune(config=cfg)

    workdir = Path(summary.workdir)
    ranks = [json.loads((workdir / f"train-result-rank{r}.json").read_text()) for r in (0, 1)]
    # The gradients were all-reduced: both ranks took the same 20 steps to the same weights.
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"] != ""
    assert [r["global_step"] for r in ranks] == [20, 20]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["tensors_updated"] == ranks[0]["tensors_total"]

    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    history = client.get_metric_history(summary.mlflow_run_id, "train/loss")
    steps = [m.step for m in sorted(history, key=lambda m: m.step)]
    assert len(steps) == len(set(steps))  # one process logged: no step twice
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.metrics["train/num_processes"] == 2
    versions = client.search_model_versions("name='tiny-sentiment'")
    assert [str(v.version) for v in versions] == ["1"]  # registered once, by the flow
