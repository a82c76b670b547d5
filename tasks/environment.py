"""Environment variables set for a while and put back: what a library exports to the environment
(MLflow its tracking URI, a run its Prefect API) must not outlive the run that chose it, or the
next run in the same process (a served deployment, a test) would take it for the user's choice.
And what the launcher's variables say about this process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def restored_environment(*names: str, **values: str) -> Iterator[None]:
    """Set ``values`` for the block; afterwards ``names`` and ``values``' keys are as they were
    before it (unset if they were unset), whatever the block wrote to them."""
    keys = [*names, *values]
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def world_size() -> int:
    """Data-parallel processes of this run (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
