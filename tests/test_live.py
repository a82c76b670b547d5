"""Real servers and a real browser: the flow against a live Prefect server and MLflow server.

Both servers start on free loopback ports with their own temporary SQLite stores, the flow runs
against them as a user's would (``fulltune run`` with ``PREFECT_API_URL`` and
``MLFLOW_TRACKING_URI``), and the results are read back through the servers' REST APIs and their
web UIs in headless Chromium. Screenshots land in ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.local_server import free_port
from tasks import tracking

from .conftest import make_rows, tiny_overrides

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
STAGES = {
    "validate_data",
    "split_data",
    "tokenize",
    "train",
    "evaluate",
    "register_model",
    "promote",
}


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{url}: server exited with {process.returncode}:\n{log.read_text()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop the server's whole process group (mlflow leaves workers behind otherwise)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(15)


class Servers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefect_port, self.mlflow_port = free_port(), free_port()
        self.prefect = f"http://127.0.0.1:{self.prefect_port}"
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        self.env = os.environ | {
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": f"{self.prefect}/api",
            "PREFECT_UI_API_URL": f"{self.prefect}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": self.mlflow,
        }

    def prefect_api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.prefect}/api/{path}",
            data=json.dumps(body or {}).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def mlflow_api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.mlflow}/api/2.0/mlflow/{path}", timeout=30) as r:
            return json.load(r)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("live")
    s = Servers(root)
    started = []
    try:
        for name, command, health in [
            (
                "prefect",
                [
                    BIN / "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    s.prefect_port,
                ],
                f"{s.prefect}/api/health",
            ),
            (
                "mlflow",
                [
                    *(BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", s.mlflow_port),
                    *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
                    *("--artifacts-destination", root / "mlartifacts", "--workers", 1),
                ],
                f"{s.mlflow}/health",
            ),
        ]:
            log = root / f"{name}.log"
            process = subprocess.Popen(
                [str(c) for c in command],
                env=s.env,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )
            started.append(process)
            wait_healthy(health, process, log)
        yield s
    finally:
        for process in started:
            stop(process)


@pytest.fixture(scope="module")
def finished_run(servers: Servers, tiny_model_dir: Path) -> dict[str, Any]:
    """One `fulltune run` against the live servers; its flow run and MLflow run ids."""
    data = servers.root / "reviews.csv"
    make_rows(72).to_csv(data, index=False)
    overrides = tiny_overrides(tiny_model_dir, data, servers.root / "home")
    command = [str(BIN / "fulltune"), "run"]
    for item in overrides:
        command += ["--set", item]
    result = subprocess.run(command, env=servers.env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_id = next(
        line.split()[-1] for line in result.stdout.splitlines() if "MLflow run id:" in line
    )
    flow_runs = servers.prefect_api("flow_runs/filter", {})
    assert len(flow_runs) == 1
    return {"flow_run": flow_runs[0], "run_id": run_id}


def test_flow_run_and_every_task_completed_on_the_prefect_server(
    servers: Servers, finished_run: dict[str, Any]
) -> None:
    flow_run = finished_run["flow_run"]
    assert flow_run["state_type"] == "COMPLETED"
    task_runs = servers.prefect_api(
        "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
    )
    names = {t["task_key"].split("-")[0] for t in task_runs} | {t["name"] for t in task_runs}
    for stage in STAGES:
        assert any(n.startswith(stage) for n in names), (stage, names)
    assert {t["state_type"] for t in task_runs} == {"COMPLETED"}


def test_the_prefect_server_holds_the_runs_own_records_and_progress(
    servers: Servers, finished_run: dict[str, Any]
) -> None:
    """What the Prefect UI's log tab shows: fulltune's own records, not only Prefect's."""
    flow_run = finished_run["flow_run"]
    logs = servers.prefect_api("logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    by_logger: dict[str, list[str]] = {}
    for record in logs:
        by_logger.setdefault(record["name"], []).append(record["message"])
    assert any(m.startswith("data valid") for m in by_logger.get("tasks.validate", []))
    train = by_logger.get("tasks.train", [])
    assert any(m.startswith("memory preflight") for m in train), train
    assert any(re.match(r"step \d+/\d+  loss \d", m) for m in train), train
    assert any("validation:" in m for m in train), train
    assert any(m.startswith("promotion") for m in by_logger.get("tasks.promote", []))
    # Posted while the flow ran (the server stored it before the run ended), not at the end:
    # someone following the run in the browser sees the steps as they happen.
    step = next(r for r in logs if r["name"] == "tasks.train" and r["message"].startswith("step "))
    assert step["created"] < flow_run["end_time"], (step["created"], flow_run["end_time"])


def test_each_ui_links_to_the_other(servers: Servers, finished_run: dict[str, Any]) -> None:
    flow_run = finished_run["flow_run"]
    run = servers.mlflow_api(f"runs/get?run_id={finished_run['run_id']}")["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["prefect.flow_run_url"] == f"{servers.prefect}/runs/flow-run/{flow_run['id']}"
    artifacts = servers.prefect_api(
        "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}
    )
    links = {a["key"]: a["data"] for a in artifacts if a["type"] == "markdown" and a["key"]}
    experiment = run["info"]["experiment_id"]
    run_page = f"{servers.mlflow}/#/experiments/{experiment}/runs/{finished_run['run_id']}"
    assert f"({run_page}?workflowType=machine_learning)" in links["mlflow-run"], links
    assert (
        f"({servers.mlflow}/#/models/tiny-sentiment/versions/1)" in links["mlflow-model-version"]
    ), links


def test_mlflow_server_has_the_metrics_and_the_aliased_version(
    servers: Servers, finished_run: dict[str, Any]
) -> None:
    run = servers.mlflow_api(f"runs/get?run_id={finished_run['run_id']}")["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert 0 <= metrics["test/macro_f1"] <= 1
    assert metrics["train/tensors_updated_fraction"] == 1.0
    version = servers.mlflow_api("registered-models/alias?name=tiny-sentiment&alias=challenger")[
        "model_version"
    ]
    assert version["version"] == "1" and version["run_id"] == finished_run["run_id"]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert tags["lineage.prefect_flow_run_id"] == finished_run["flow_run"]["id"]


def chromium() -> Any:
    """Playwright driving Debian's Chromium; never a downloaded browser."""
    executable = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not executable.exists():
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium failed or was not run")
    return sync_playwright, executable


def test_prefect_and_mlflow_uis_show_the_run(
    servers: Servers, finished_run: dict[str, Any]
) -> None:
    sync_playwright, executable = chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    flow_run = finished_run["flow_run"]
    run = servers.mlflow_api(f"runs/get?run_id={finished_run['run_id']}")["run"]
    f1 = next(m["value"] for m in run["data"]["metrics"] if m["key"] == "test/macro_f1")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(executable),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{servers.prefect}/runs/flow-run/{flow_run['id']}")
            page.get_by_text(flow_run["name"]).first.wait_for(timeout=60_000)
            # The Logs tab: the run's own progress (step / total, loss, ETA), not only Prefect's.
            page.get_by_text(re.compile(r"step \d+/\d+  loss")).first.wait_for(timeout=60_000)
            page.get_by_text(re.compile("^memory preflight")).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "prefect-flow-run.png"), full_page=True)
            # The timeline is drawn on a canvas; the Task Runs tab lists the runs as text.
            page.get_by_text("Task Runs", exact=True).first.click()
            page.get_by_text("register_model-").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "prefect-task-runs.png"), full_page=True)
            listed = page.locator("body").inner_text()
            for stage in STAGES:
                assert f"{stage}-" in listed, (stage, listed[:2000])

            experiment = run["info"]["experiment_id"]
            # The experiment in model-training mode (MLflow 3.17 picks GenAI or model training
            # by a UI-wide toggle that the URL sets), in fulltune's saved view: the runs table,
            # the datasets filled, the test metrics as columns.
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(tracking.ui_url(servers.mlflow, experiment))
            close_modal(page)
            page.get_by_text("Run Name").first.wait_for(timeout=60_000)
            page.get_by_text(run["info"]["run_name"]).first.wait_for(timeout=60_000)
            page.get_by_text("test/macro_f1").first.wait_for(timeout=60_000)
            assert "Detect Issues" not in page.locator("body").inner_text()
            # What decides stands in the first screen at 1600 px, the assistant panel open.
            grid = page.locator(".ag-root-wrapper").first.bounding_box()
            assert grid is not None
            for column in tracking.view_columns("macro_f1"):
                name = column.split("`")[1]
                header = page.get_by_role("columnheader", name=name, exact=True).first
                box = header.bounding_box()
                assert box is not None and box["x"] + box["width"] <= grid["x"] + grid["width"], (
                    name,
                    box,
                    grid,
                )
            page.get_by_role("gridcell", name="promoted").or_(
                page.get_by_role("gridcell", name="kept")
            ).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow-experiment.png"))
            page.set_viewport_size({"width": 1400, "height": 1000})

            page.goto(f"{servers.mlflow}/#/experiments/{experiment}/runs/{run['info']['run_id']}")
            close_modal(page)
            page.get_by_placeholder("Search metrics").fill("test/macro_f1")
            row = page.get_by_role("row").filter(has_text="test/macro_f1").first
            row.wait_for(timeout=60_000)
            shown = [float(x) for x in re.findall(r"\d+\.\d+|\d+", row.inner_text())]
            assert any(abs(x - f1) < 1e-3 for x in shown), (f1, row.inner_text())
            page.screenshot(path=str(ARTIFACTS / "mlflow-run.png"), full_page=True)

            page.goto(f"{servers.mlflow}/#/models/tiny-sentiment/versions/1")
            close_modal(page)
            page.get_by_text("Version 1").first.wait_for(timeout=60_000)
            page.get_by_text("challenger").first.wait_for(timeout=60_000)
            page.get_by_text("Base model").first.wait_for(timeout=60_000)  # the model card
            page.screenshot(path=str(ARTIFACTS / "mlflow-model-version.png"), full_page=True)
        finally:
            browser.close()


def close_modal(page: Any) -> None:
    """MLflow 3 opens a "new Model Registry UI" dialog over the page: close it when it shows."""
    page.wait_for_load_state("load")  # not networkidle: the MLflow UI keeps polling
    dialog = page.get_by_role("dialog").first
    try:
        dialog.wait_for(timeout=5_000)
    except Exception:  # no dialog this time
        return
    close = dialog.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    else:
        page.keyboard.press("Escape")
    dialog.wait_for(state="hidden", timeout=10_000)
