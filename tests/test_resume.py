"""Crash-safe training: kill -9 mid-training, run again, and it resumes in the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from prefect.settings import PREFECT_API_URL

from .conftest import make_rows, tiny_overrides

STEPS, EVERY = 240, 20


# Sharded: two CPU ranks under FSDP2, each step's batch split between them.
FSDP = ["train.num_processes=2", "train.fsdp=full_shard", "train.batch_size=4"]


def command(tiny_model_dir: Path, data: Path, home: Path, *settings: str) -> list[str]:
    args = [str(Path(sys.executable).parent / "fulltune"), "run"]
    for item in [
        *tiny_overrides(tiny_model_dir, data, home),
        f"train.max_steps={STEPS}",
        f"train.checkpoint_steps={EVERY}",
        "train.learning_rate=0.001",
        "promote.enabled=false",
        "train.threads=1",  # one process resumes bit for bit, however busy the machine gets
        *settings,
    ]:
        args += ["--set", item]
    return args


def env() -> dict[str, str]:
    # The subprocesses talk to the test session's Prefect API instead of starting their own.
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value())
    }


def store(home: Path) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def finished(home: Path):
    client = store(home)
    [run] = client.search_runs([client.get_experiment_by_name("fulltune").experiment_id])
    return client, run


@pytest.mark.integration
@pytest.mark.parametrize("settings", [[], FSDP], ids=["one-process", "fsdp-two-ranks"])
def test_kill_9_mid_training_then_resume(
    prefect_harness, tiny_model_dir: Path, tmp_path: Path, settings: list[str]
):
    data = tmp_path / "rows.csv"
    make_rows(90).to_csv(data, index=False)

    # The reference: the same config, never interrupted.
    reference_home = tmp_path / "reference"
    subprocess.run(
        command(tiny_model_dir, data, reference_home, *settings),
        env=env(),
        check=True,
        capture_output=True,
    )
    _, reference = finished(reference_home)

    home = tmp_path / "crash"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        command(tiny_model_dir, data, home, *settings),
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not list(home.glob("checkpoints/*/*/checkpoint-*/COMPLETE")):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # A sharded run's ranks (each in a session of its own) stop with their launcher.
    time.sleep(2)
    ranks = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(home) in " ".join(p.info["cmdline"] or [])
    ]
    assert not ranks, [p.info["cmdline"] for p in ranks]
    killed_at = max(
        int(p.parent.name.split("-")[1]) for p in home.glob("checkpoints/*/*/checkpoint-*/COMPLETE")
    )
    assert killed_at < STEPS

    second = subprocess.run(
        command(tiny_model_dir, data, home, *settings), env=env(), capture_output=True, text=True
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Resuming MLflow run" in second.stdout + second.stderr

    client, run = finished(home)  # exactly one run: the interrupted one, re-attached
    assert run.info.status == "FINISHED"
    resumed_from = int(run.data.tags["fulltune.resumed_from_step"])
    assert EVERY <= resumed_from < STEPS
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in losses]
    assert len(steps) == len(set(steps)), "no metric step logged twice"
    assert max(steps) == STEPS
    for summary in ("data/truncated_fraction_train", "data/split_train", "data/tokens_train"):
        assert len(client.get_metric_history(run.info.run_id, summary)) == 1, summary
    assert len(client.search_model_versions("name='tiny-sentiment'")) == 1
    if not settings:  # one process continues bit for bit
        for key in ("test/accuracy", "test/macro_f1", "val_selected/macro_f1"):
            assert run.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-6)
    else:  # ranks resume on the same course, not bit for bit (one test row of 12 may differ)
        accuracy = reference.data.metrics["test/accuracy"]
        assert run.data.metrics["test/accuracy"] == pytest.approx(accuracy, abs=0.1)
        ended = [m.value for m in losses if m.step > STEPS - EVERY]
        assert max(ended) < 0.3, ended  # trained on to the end, from about 1.1
    assert not list(home.glob("checkpoints/*/*/checkpoint-*")), "removed once the run finished"


@pytest.mark.integration
def test_two_concurrent_runs_of_one_config_share_a_store_safely(
    prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    data = tmp_path / "rows.csv"
    make_rows(90).to_csv(data, index=False)
    home = tmp_path / "shared"
    args = command(tiny_model_dir, data, home)
    args[args.index(f"train.max_steps={STEPS}")] = "train.max_steps=60"
    runs = [
        subprocess.Popen(
            args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
        assert "database is locked" not in output
        assert "Resuming" not in output  # a live run's checkpoints are never taken over
    client = store(home)
    found = client.search_runs([client.get_experiment_by_name("fulltune").experiment_id])
    assert len(found) == 2 and all(r.info.status == "FINISHED" for r in found)
    for r in found:  # every logged step is there exactly once, in each run
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        assert sorted(steps) == sorted(set(steps)) and max(steps) == 60
    versions = client.search_model_versions("name='tiny-sentiment'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r.info.run_id for r in found}
