"""Data-parallel training in several processes: the same recipe, launched under ``torchrun``.

``train.num_processes: N`` runs :func:`tasks.train.train` in N processes with DDP (gloo on CPU,
NCCL on GPU) on each of ``train.nnodes`` machines: the HF ``Trainer`` reads torchrun's
environment, shards every batch across the ranks and all-reduces the gradients, so each rank
takes the same optimizer step. Only rank 0 logs to MLflow; every rank writes its result;
registration happens afterwards, once, in node 0's flow.

Usage (what :func:`launch` runs; each rank runs :func:`tasks.train.main`)::

    python -m tasks.distributed --rdzv-endpoint 127.0.0.1:PORT ... --nproc_per_node N \
        -m tasks.train JOB.json

``python -m tasks.distributed`` is torchrun with its rendezvous stores listening on loopback only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow

from tasks.results import TrainJob, TrainResult

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """The multi-process run failed, or its ranks ended with different weights."""

    def __init__(self, message: str, signalled: bool = False):
        super().__init__(message)
        self.signalled = signalled  # a rank was killed by a signal: worth a retry


def rendezvous_args() -> list[str]:
    """torchrun's rendezvous on this machine: a free loopback port, one node."""
    import socket
    import uuid

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={uuid.uuid4().hex[:12]}",
        "--nnodes=1",
    ]


def loopback_stores() -> None:
    """Make every ``TCPStore`` server this process starts listen on 127.0.0.1 only.

    torchrun's rendezvous store and the store it shares with its workers are unauthenticated, and
    a ``TCPStore`` server binds every interface whatever host it is given. Handed a socket already
    bound to loopback (``master_listen_fd``), it listens there instead.
    """
    import socket

    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous

    library_store = dist.TCPStore

    def store(
        host_name: str,
        port: int,
        world_size: int | None = None,
        is_master: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if is_master and kwargs.get("master_listen_fd") is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", int(port)))
            listener.listen(128)
            port = listener.getsockname()[1]
            kwargs["master_listen_fd"] = listener.detach()
        return library_store(host_name, port, world_size, is_master, *args, **kwargs)

    dist.TCPStore = store  # type: ignore[misc,assignment]
    c10d_rendezvous_backend.TCPStore = store  # type: ignore[misc,assignment]
    static_tcp_rendezvous.TCPStore = store  # type: ignore[misc,assignment]


def exit_with_launcher(poll_s: float = 0.5) -> None:
    """End this rank when the process that launched it is gone.

    torchrun starts each rank in a session of its own, so a kill -9 of a run (its process group)
    would leave the ranks training on as orphans, holding memory and writing checkpoints beside
    the run that resumes. On Linux the kernel kills the rank with its parent (``PR_SET_PDEATHSIG``);
    elsewhere a daemon thread watches the parent and exits hard when it changes.
    """
    import ctypes
    import signal
    import threading
    import time

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("the launcher (pid %d) is gone: this rank stops", parent)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def launch(job: TrainJob) -> TrainResult:
    """Run the job in ``train.num_processes`` processes on this machine, as node
    ``train.node_rank`` of ``train.nnodes``; the result of this machine's first rank.

    On one machine the rendezvous is a free loopback port. Over several, it is torchrun's static
    rendezvous at ``train.rdzv_endpoint`` (node 0's store): it keeps each machine's ``node_rank``,
    so the process that tracks and registers (global rank 0) is on node 0.

    Raises:
        DistributedError: a rank failed (the message has the end of its output), or the ranks'
            final weights differ (the gradients were not synchronised).
    """
    cfg = job.cfg
    workdir = Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job_path = workdir / "train-job.json"
    job_path.write_text(job.model_dump_json())
    ranks = range(cfg.node_rank * cfg.num_processes, (cfg.node_rank + 1) * cfg.num_processes)
    for rank in ranks:
        job.result_path(rank).unlink(missing_ok=True)
    if cfg.nnodes == 1:  # torchrun, its stores on loopback
        launcher = ["tasks.distributed", *rendezvous_args()]
    else:
        launcher = [
            "torch.distributed.run",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={cfg.rdzv_endpoint}",
            f"--nnodes={cfg.nnodes}",
            f"--node-rank={cfg.node_rank}",
        ]
    command = [
        sys.executable,
        "-m",
        *launcher,
        f"--nproc-per-node={cfg.num_processes}",
        "-m",
        "tasks.train",
        str(job_path),
    ]
    where = f" as node {cfg.node_rank} of {cfg.nnodes}" if cfg.nnodes > 1 else ""
    log.info("launching %d training processes%s: %s", len(ranks), where, " ".join(command))
    # The store's URI reaches the ranks in their environment, never in the job file: it may hold
    # credentials.
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd(), env=env)
    (workdir / "train-ranks.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        raise DistributedError(
            f"torchrun with {cfg.world_size} processes{where} exited with {done.returncode}; "
            f"last output:\n{output[-4000:]}",
            signalled=done.returncode < 0 or "Signal " in output or "SIGKILL" in output,
        )
    # Every rank compared its weights with all the others' before it exited (tasks.train.main).
    results = [TrainResult.model_validate_json(job.result_path(r).read_text()) for r in ranks]
    digests = {r.weights_digest for r in results}
    if len(digests) != 1:
        raise DistributedError(f"the ranks ended with different weights: {sorted(digests)}")
    return results[0]


def agree_on_weights(digest: str) -> None:
    """Compare this rank's final weights with every other rank's, on all machines, then leave
    the process group (a rank that exits without leaving can abort the others' teardown).

    Raises:
        DistributedError: some rank ended with different weights.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    dist.barrier()
    dist.destroy_process_group()
    if len(set(digests)) != 1:
        raise DistributedError(f"the ranks ended with different weights: {digests}")


if __name__ == "__main__":  # torchrun for one machine: python -m tasks.distributed ARGS
    from torch.distributed.run import main

    loopback_stores()
    main()
