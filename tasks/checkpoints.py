"""Checkpoint folders: which checkpoint is complete, and whether a live run holds the folder.

Plain files and locks, no torch: the flow claims (or re-attaches) a run's checkpoint folder before
its first stage, and the train task writes into it.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

COMPLETE = "COMPLETE"  # written into a checkpoint folder once the Trainer has saved all of it


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete checkpoint under ``folder``, or None."""
    if folder is None or not folder.is_dir():
        return None
    complete = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).exists()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def lock_folder(folder: Path) -> FileLock | None:
    """Take an exclusive lock on a checkpoint folder, or None if a live process holds it.

    The operating system drops the lock (an ``flock``) when its holder exits, SIGKILL included: a
    folder whose lock can be taken belongs to a run that is no longer running. The caller
    releases it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock
