"""Multi-process training: two CPU processes under torchrun (DDP over gloo) on the tiny model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.finetune import finetune
from tasks.config import load_config

from .conftest import colour_rows, make_rows, registered_weights, tiny_overrides

pytestmark = pytest.mark.integration


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_and_two_nodes_train_in_step_and_register_once(
    tiny_model_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """Two ranks on one machine (DDP over gloo), then the same two ranks as two "machines" on
    localhost, each with its own home and store, node 1 joining node 0's flow run. Both take the
    same steps as on one machine, to the same weights; node 0 alone registers."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    data = tmp_path / "reviews.csv"
    make_rows(96).to_csv(data, index=False)

    def settings(home: str, *more: str) -> list[str]:
        return [
            *tiny_overrides(tiny_model_dir, data, tmp_path / home),
            "train.max_steps=20",
            "train.batch_size=4",  # per process: an effective batch of 8
            # The last step's weights, not a checkpoint loaded from disk: any drift would show.
            "train.select_best=false",
            *more,
        ]

    summary = finetune(config=load_config(None, settings("one", "train.num_processes=2")))
    workdir = Path(summary.workdir)
    ranks = [json.loads((workdir / f"train-result-rank{r}.json").read_text()) for r in (0, 1)]
    # The gradients were all-reduced: both ranks took the same 20 steps to the same weights.
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"] != ""
    assert [r["global_step"] for r in ranks] == [20, 20]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["tensors_updated"] == ranks[0]["tensors_total"]

    uri = f"sqlite:///{tmp_path / 'one' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    history = sorted(client.get_metric_history(summary.mlflow_run_id, "train/loss"), key=step)
    assert len({m.step for m in history}) == len(history)  # one process logged: no step twice
    assert history[-1].value < history[0].value
    assert client.get_run(summary.mlflow_run_id).data.metrics["train/num_processes"] == 2
    versions = client.search_model_versions("name='tiny-sentiment'")
    assert [str(v.version) for v in versions] == ["1"]  # registered once, by the flow

    # Two "machines": each its own home and store; node 0 a `fulltune run` that finds nnodes and
    # the rendezvous in its environment (as a cluster's job sets them), node 1 `fulltune node`
    # given node 0's flow run, whose config it reads from the Prefect API.
    fulltune = str(Path(sys.executable).parent / "fulltune")
    env = os.environ | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "FULLTUNE_NNODES": "2",
        "FULLTUNE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
    }
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    node0 = subprocess.Popen(
        [fulltune, "run", *(f"--set={s}" for s in settings("node0"))], env=env, **pipe
    )
    node1 = None
    try:
        flow_run = flow_run_of(tmp_path / "node0", node0)
        node1 = subprocess.Popen(
            [fulltune, "node", flow_run, f"--set=home={tmp_path / 'node1'}"],
            env=env | {"FULLTUNE_NODE_RANK": "1"},
            **pipe,
        )
        output0 = node0.communicate(timeout=600)[0]
        output1 = node1.communicate(timeout=600)[0]
    finally:
        for process in (node0, node1):
            if process is not None:
                process.kill()
    assert node0.returncode == 0, output0
    assert node1.returncode == 0, output1
    assert "Node 1 of 2: trained 20 steps" in output1, output1
    run_id = re.search(r"MLflow run id:\s+(\w+)", output0)
    assert run_id, output0
    [node0_work] = (tmp_path / "node0" / "work").iterdir()
    [node1_work] = (tmp_path / "node1" / "work").iterdir()
    first = json.loads((node0_work / "train-result-rank0.json").read_text())
    second = json.loads((node1_work / "train-result-rank1.json").read_text())
    assert first["weights_digest"] == second["weights_digest"] != ""  # the nodes agree
    assert [first["global_step"], second["global_step"]] == [20, 20]
    assert [first["num_processes"], second["num_processes"]] == [2, 2]
    stores = {}
    for home in ("node0", "node1"):
        uri = f"sqlite:///{tmp_path / home / 'mlflow.db'}"
        stores[home] = MlflowClient(uri, registry_uri=uri)
    spanned = sorted(stores["node0"].get_metric_history(run_id.group(1), "train/loss"), key=step)
    # The same batches, steps and losses as on one machine (gloo sums in another order: the
    # last bits differ, so the weights' digest does too).
    assert [m.step for m in spanned] == [m.step for m in history]
    for a, b in zip(spanned, history, strict=True):
        assert a.value == pytest.approx(b.value, rel=1e-4), (a.step, a.value, b.value)
    assert [str(v.version) for v in stores["node0"].search_model_versions("")] == ["1"]
    assert stores["node1"].search_model_versions("") == []  # only node 0 registers
    experiments = [e.experiment_id for e in stores["node1"].search_experiments()]
    [worker] = stores["node1"].search_runs(experiments)
    assert worker.info.status == "FINISHED"
    assert worker.data.tags["fulltune.node_rank"] == "1"
    assert worker.data.metrics["train/num_processes"] == 2


def step(metric):
    return metric.step


def flow_run_of(home: Path, process, timeout_s: float = 300) -> str:
    """The id of the flow run the `fulltune run` in ``process`` started for ``home``."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s  # a bound on a hung start, not a speed assertion
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs():
                if (run.parameters.get("config") or {}).get("home") == str(home):
                    return str(run.id)
        time.sleep(1)
    raise AssertionError(f"no flow run for {home} after {timeout_s} s")


def test_fsdp_shards_a_tiny_llama_over_two_cpu_processes(
    tiny_llama_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """FSDP2 (full_shard) on two CPU ranks over gloo, through the recipe every run uses: each
    rank holds about half of the weights, gradients and optimizer state (measured), the loss
    follows the one-process run's over the same global batches, and the saved model is the ranks'
    full weights, read back by transformers."""
    from transformers import AutoModelForCausalLM

    from tasks.weights import weights_digest

    data = tmp_path / "colours.csv"
    colour_rows(96).to_csv(data, index=False)

    def run(name: str, *settings: str):
        overrides = tiny_overrides(tiny_llama_dir, data, tmp_path / name, task="sft")
        steady = ["train.max_steps=8", "train.select_best=false", "promote.enabled=false"]
        return finetune(config=load_config(None, [*overrides, *steady, *settings]))

    one = run("one", "train.batch_size=8")
    two = run("two", "train.num_processes=2", "train.fsdp=full_shard", "train.batch_size=4")
    workdir = Path(two.workdir)
    ranks = [json.loads((workdir / f"train-result-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"] != ""
    assert ranks[0]["tensors_updated"] == ranks[0]["tensors_total"]
    runs = {}
    for summary, home in ((one, "one"), (two, "two")):
        uri = f"sqlite:///{tmp_path / home / 'mlflow.db'}"
        client = MlflowClient(uri, registry_uri=uri)
        losses = client.get_metric_history(summary.mlflow_run_id, "train/loss")
        runs[home] = (
            client.get_run(summary.mlflow_run_id).data,
            sorted(losses, key=lambda m: m.step),
        )
    (whole, single_losses), (shard, sharded_losses) = runs["one"], runs["two"]
    # bf16 (on CPUs that multiply it natively) rounds the sharded reductions differently.
    rel = 2e-2 if shard.tags["train.precision"].startswith("bf16") else 1e-3
    whole, shard = whole.metrics, shard.metrics
    for part in ("parameters", "gradients", "optimizer"):
        key = f"efficiency/rank_{part}_bytes"
        assert 0.4 * whole[key] <= shard[key] <= 0.6 * whole[key], (part, shard[key], whole[key])
    assert [m.step for m in sharded_losses] == [m.step for m in single_losses]
    for a, b in zip(sharded_losses, single_losses, strict=True):
        assert a.value == pytest.approx(b.value, rel=rel), (a.step, a.value, b.value)
    uri = f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"
    folder, _ = registered_weights(uri, "models:/tiny-chat/1", tmp_path / "registered")
    assert (
        weights_digest(AutoModelForCausalLM.from_pretrained(folder)) == ranks[0]["weights_digest"]
    )


LISTENERS = """
import json, os, sys
import psutil
import torch.distributed as dist

dist.init_process_group("gloo")  # the workers join through the agent's store
tree = [psutil.Process(os.getppid())] + psutil.Process(os.getppid()).children(recursive=True)
listening = sorted(
    {c.laddr.ip for p in tree for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
)
dist.barrier()
if dist.get_rank() == 0:
    json.dump(listening, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_the_launcher_listens_on_loopback_only(tmp_path: Path) -> None:
    """torchrun's stores are unauthenticated: on one machine nothing listens beyond 127.0.0.1."""
    import subprocess
    import sys

    from tasks.distributed import rendezvous_args

    script, out = tmp_path / "listeners.py", tmp_path / "listening.json"
    script.write_text(LISTENERS)
    command = [sys.executable, "-m", "tasks.distributed", *rendezvous_args()]
    done = subprocess.run(
        [*command, "--nproc_per_node=2", str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    listening = json.loads(out.read_text())
    assert listening, "the agent's stores were seen"
    assert set(listening) == {"127.0.0.1"}, listening
