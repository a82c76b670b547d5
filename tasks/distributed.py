"""Data-parallel training in several processes: the same recipe, launched under ``torchrun``.

``train.num_processes: N`` runs :func:`tasks.train.train` in N processes with DDP (gloo on CPU,
NCCL on GPU): the HF ``Trainer`` reads torchrun's environment, shards every batch across the
ranks and all-reduces the gradients, so each rank takes the same optimizer step. Only rank 0
logs to MLflow; every rank writes its result; registration happens afterwards, once, in the flow.

Usage (what :func:`launch` runs; each rank runs :func:`tasks.train.main`)::

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.train JOB.json
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow

from tasks.results import TrainJob, TrainResult

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """The multi-process run failed, or its ranks ended with different weights."""

    def __init__(self, message: str, signalled: bool = False):
        super().__init__(message)
        self.signalled = signalled  # a rank was killed by a signal: worth a retry


def launch(job: TrainJob, num_processes: int) -> TrainResult:
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
        job.result_path(rank).unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={num_processes}",
        "-m",
        "tasks.train",
        str(job_path),
    ]
    log.info("launching %d training processes: %s", num_processes, " ".join(command))
    # The store's URI reaches the ranks in their environment, never in the job file: it may hold
    # credentials.
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd(), env=env)
    (workdir / "train-ranks.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        raise DistributedError(
            f"torchrun with {num_processes} processes exited with {done.returncode}; "
            f"last output:\n{output[-4000:]}",
            signalled=done.returncode < 0 or "Signal " in output or "SIGKILL" in output,
        )
    results = [
        TrainResult.model_validate_json(job.result_path(rank).read_text())
        for rank in range(num_processes)
    ]
    digests = {r.weights_digest for r in results}
    if len(digests) != 1:
        raise DistributedError(f"the ranks ended with different weights: {sorted(digests)}")
    return results[0]
