"""Several `fulltune run`s at once on a busy machine, as scheduled and hand-started runs meet.

No test harness here: the runs take the path a user's do (no PREFECT_API_URL), so the first one
starts the home's local Prefect server and the others wait for it and share it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.local_server import read_info, stop_server

from .conftest import make_rows, tiny_overrides

RUNS = 4


def user_environment(tmp_path: Path) -> dict[str, str]:
    """A user's shell: no Prefect API or tracking store chosen, a Prefect profile of its own."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    return env | {"PREFECT_HOME": str(tmp_path / "user-prefect")}


def flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter",
        data=json.dumps({"limit": 50}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.integration
def test_four_runs_at_once_on_a_loaded_machine(tiny_model_dir: Path, tmp_path: Path):
    data = tmp_path / "rows.csv"
    make_rows(72).to_csv(data, index=False)
    home = tmp_path / "home"  # fresh: no store, no server yet
    command = [str(Path(sys.executable).parent / "fulltune"), "run"]
    for item in [*tiny_overrides(tiny_model_dir, data, home), "train.max_steps=6"]:
        command += ["--set", item]
    # One busy loop per core: every run starts on a machine with no idle CPU.
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 2)
    ]
    try:
        runs = [
            subprocess.Popen(
                command,
                env=user_environment(tmp_path),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(RUNS)
        ]
        outputs = [run.communicate(timeout=1500)[0] for run in runs]
    finally:
        for process in busy:
            process.kill()
            process.wait()
    try:
        for run, output in zip(runs, outputs, strict=True):
            assert run.returncode == 0, output[-3000:]
            for symptom in ("database is locked", "Timed out", "UNIQUE constraint failed"):
                assert symptom not in output, symptom
        uri = f"sqlite:///{home / 'mlflow.db'}"
        client = MlflowClient(uri, registry_uri=uri)
        versions = client.search_model_versions("name='tiny-sentiment'")
        assert sorted(int(v.version) for v in versions) == list(range(1, RUNS + 1))
        assert len({v.run_id for v in versions}) == RUNS, "each run registered its own version"
        info = read_info(home)
        assert info is not None, "the runs shared the home's server"
        finished = [r for r in flow_runs(info.url) if r["state_type"] == "COMPLETED"]
        assert len(finished) == RUNS, "every run stays visible in the Prefect API"
        tagged = {v.tags["lineage.prefect_flow_run_id"] for v in versions}
        assert tagged == {r["id"] for r in finished}
        for version in versions:  # each command logged its own time: start, whole, overhead
            m = client.get_run(version.run_id).data.metrics
            # The flow's clock starts before its first stage (the MLflow run), the command's
            # before both.
            assert 0 < m["time/cold_start_s"] < m["time/process_s"]
            assert m["time/flow_s"] < m["time/process_s"]
            overhead = (m["time/process_s"] - m["efficiency/work_s"]) / m["time/process_s"]
            assert m["efficiency/process_overhead_fraction"] == pytest.approx(overhead)
    finally:
        stop_server(home)
