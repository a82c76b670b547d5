"""Multi-process training: two CPU processes under torchrun (DDP over gloo) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.finetune import finetune
from tasks.config import load_config

from .conftest import colour_rows, make_rows, tiny_overrides

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


@pytest.mark.gpu
def test_fsdp_shards_a_tiny_llama_over_the_gpus(
    tiny_llama_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """FSDP2 (full_shard) through the Trainer on every GPU there is: each rank ends with the same
    full weights, and the preflight's per-rank estimate holds 1/N of weights, gradients and
    optimizer state. accelerate runs FSDP only on accelerators, hence the gpu marker; on CPU the
    run is refused (tests/test_efficiency.py)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("FSDP over ranks needs 2+ GPUs (accelerate enables it only on accelerators)")
    processes = torch.cuda.device_count()
    data = tmp_path / "colours.csv"
    colour_rows(96).to_csv(data, index=False)
    cfg = load_config(
        None,
        [
            *tiny_overrides(tiny_llama_dir, data, tmp_path / "home", task="sft"),
            f"train.num_processes={processes}",
            "train.fsdp=full_shard",
            "train.max_steps=12",
            "train.batch_size=4",
            "train.select_best=false",
            "promote.enabled=false",
        ],
    )
    summary = finetune(config=cfg)
    workdir = Path(summary.workdir)
    ranks = [
        json.loads((workdir / f"train-result-rank{r}.json").read_text()) for r in range(processes)
    ]
    assert len({r["weights_digest"] for r in ranks}) == 1 and ranks[0]["weights_digest"]
    assert ranks[0]["tensors_updated"] == ranks[0]["tensors_total"]
    assert [r["num_processes"] for r in ranks] == [processes] * processes
    assert summary.metrics["answer_loss"] < summary.baseline["answer_loss"]
    from transformers import AutoConfig

    from tasks.efficiency import estimate_training_memory

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    one = estimate_training_memory(config, 10_000, 4, 32, shards=1)
    two = estimate_training_memory(config, 10_000, 4, 32, shards=2)
    assert (
        two.weights + two.gradients + two.optimizer
        == (one.weights + one.gradients + one.optimizer) // 2
    )
    assert ranks[0]["preflight_estimate_bytes"] > 0


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
