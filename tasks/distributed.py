"""Data-parallel training in several processes: the same recipe, launched under ``torchrun``.

``train.num_processes: N`` runs :func:`tasks.train.train` in N processes with DDP (gloo on CPU,
NCCL on GPU): the HF ``Trainer`` reads torchrun's environment, shards every batch across the
ranks and all-reduces the gradients, so each rank takes the same optimizer step. Only rank 0
logs to MLflow and writes the result; registration happens afterwards, once, in the flow.

Usage (what :func:`launch` runs)::

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.distributed JOB.json
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from tasks.config import ModelConfig, TrainConfig
from tasks.tokenize import TokenizedData
from tasks.train import TrainResult

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """The multi-process run failed, or its ranks ended with different weights."""


class Job(BaseModel):
    """Everything a rank needs to run its share of training."""

    tokenized: TokenizedData
    labels: list[str]
    model_cfg: ModelConfig
    cfg: TrainConfig
    task: str
    workdir: str
    checkpoint_dir: str | None
    run_id: str | None  # MLflow run that rank 0 streams the training metrics to
    after_step: int = -1
    tracking_uri: str | None = None


def result_path(workdir: Path, rank: int) -> Path:
    return workdir / f"train-result-rank{rank}.json"


def launch(job: Job, num_processes: int) -> TrainResult:
    """Run the job in ``num_processes`` processes; rank 0's result.

    Raises:
        DistributedError: a rank failed (the message has the end of its output), or the ranks'
            final weights differ (the gradients were not synchronised).
    """
    workdir = Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = workdir / "train-job.json"
    job_path.write_text(job.model_dump_json())
    for rank in range(num_processes):
        result_path(workdir, rank).unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={num_processes}",
        "-m",
        "tasks.distributed",
        str(job_path),
    ]
    log.info("launching %d training processes: %s", num_processes, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd())
    (workdir / "train-ranks.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise DistributedError(
            f"torchrun with {num_processes} processes exited with {done.returncode}; "
            f"last output:\n{(done.stdout + done.stderr)[-4000:]}"
        )
    results = [
        TrainResult.model_validate_json(result_path(workdir, rank).read_text())
        for rank in range(num_processes)
    ]
    digests = {r.weights_digest for r in results}
    if len(digests) != 1:
        raise DistributedError(f"the ranks ended with different weights: {sorted(digests)}")
    return results[0]


def main(job_path: str) -> None:
    """One rank: run the recipe; every rank writes its result (its weights' digest included)."""
    from transformers import TrainerCallback

    from tasks.kinds import get_kind
    from tasks.tracking import MlflowMetricsCallback
    from tasks.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(message)s")
    job = Job.model_validate_json(Path(job_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    if job.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(job.tracking_uri)
    # The callback logs on the main process only (Trainer's is_world_process_zero).
    callbacks: list[TrainerCallback] = (
        [MlflowMetricsCallback(job.run_id, job.after_step)] if job.run_id else []
    )
    result = train(
        job.tokenized,
        job.labels,
        job.model_cfg,
        job.cfg,
        Path(job.workdir),
        callbacks,
        Path(job.checkpoint_dir) if job.checkpoint_dir else None,
        get_kind(job.task),
    )
    result_path(Path(job.workdir), rank).write_text(result.model_dump_json())


if __name__ == "__main__":
    main(sys.argv[1])
