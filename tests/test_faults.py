"""Faults at the worst moment, as a user meets them: the home's Prefect server killed mid-run, and
kill -9 the moment a version is created. Each run is a real `fulltune run` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import make_rows, tiny_overrides

pytestmark = pytest.mark.integration


def command(tiny_model_dir: Path, data: Path, home: Path, *extra: str) -> list[str]:
    args = [str(Path(sys.executable).parent / "fulltune"), "run"]
    for item in [
        *tiny_overrides(tiny_model_dir, data, home),
        "train.learning_rate=0.001",
        "registry.model_name=tiny-sentiment",
        *extra,
    ]:
        args += ["--set", item]
    return args


def own_server_env() -> dict[str, str]:
    """The environment of a user's shell: the run starts (and uses) its home's own server."""
    return {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    }


def store(home: Path) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_a_dead_server_and_a_kill_at_registration_leave_nothing_half_done(
    tiny_model_dir: Path, tmp_path: Path
):
    """One home, three runs: the first loses its Prefect server mid-training, the second (which
    starts a new server) is killed the moment its version is created, the third completes and
    marks the second's version for what it is."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.local_server import read_info, stop_server

    data = tmp_path / "rows.csv"
    make_rows(90).to_csv(data, index=False)
    home = tmp_path / "home"
    out = tmp_path / "out.log"
    try:
        # 1. The server dies while the run trains: the run fails in bounded time, by name.
        long_run = command(tiny_model_dir, data, home, "train.max_steps=20000")
        with out.open("w") as sink:
            run = subprocess.Popen(
                long_run, env=own_server_env(), stdout=sink, stderr=subprocess.STDOUT, text=True
            )
            wait_for(out, " loss ", run)
            info = read_info(home)
            assert info is not None
            os.kill(info.pid, signal.SIGKILL)
            try:
                run.wait(timeout=120)
            except subprocess.TimeoutExpired:
                run.kill()
                raise AssertionError(f"the run hung:\n{out.read_text()[-3000:]}") from None
        output = out.read_text()
        assert run.returncode == 1, output[-3000:]
        assert "Prefect server" in output and "stopped during the run" in output
        assert "Traceback" not in output.split("fulltune: error:")[-1]
        client = store(home)
        experiment = client.get_experiment_by_name("fulltune").experiment_id
        [failed] = client.search_runs([experiment])
        assert failed.info.status == "FAILED"

        # 2. The next run starts a server again; kill -9 it as its version is created.
        args = command(tiny_model_dir, data, home, "train.max_steps=4")
        with out.open("w") as sink:
            run = subprocess.Popen(
                args, env=own_server_env(), stdout=sink, stderr=subprocess.STDOUT, text=True
            )
            wait_for(out, "Created version", run)
            run.send_signal(signal.SIGKILL)
            run.wait(timeout=60)
        [half] = client.search_model_versions("name='tiny-sentiment'")
        assert half.tags["fulltune.registration"] == "incomplete"
        killed = client.get_run(half.run_id)
        assert killed.info.status == "RUNNING", "not FINISHED: its process never finished it"

        # 3. The run after it completes, and marks the half-made version.
        again = subprocess.run(
            args, env=own_server_env(), capture_output=True, text=True, timeout=600
        )
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        versions = {v.version: v for v in client.search_model_versions("name='tiny-sentiment'")}
        assert versions[half.version].tags["fulltune.registration"] == "interrupted"
        assert "Incomplete version" in versions[half.version].description
        whole = [v for v in versions.values() if v.version != half.version]
        assert [v.tags["fulltune.registration"] for v in whole] == ["complete"]
        uri = f"sqlite:///{home / 'mlflow.db'}"
        shown = CliRunner().invoke(
            app, ["lineage", f"models:/tiny-sentiment/{half.version}", "--tracking-uri", uri]
        )
        assert shown.exit_code == 0 and "INTERRUPTED" in shown.output, shown.output
    finally:
        stop_server(home)
