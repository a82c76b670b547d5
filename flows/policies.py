"""The stages' policies, in one place: when a failed stage is tried again (only when the failure
is transient), what a cached stage is keyed by (its inputs' content, in a folder of the home's
cache) and how each stage's time is logged. The wrappers in ``flows/stages.py`` apply them."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pandas as pd
from prefect import get_run_logger

from tasks import caching, tracking
from tasks import sources as sources_module
from tasks import tokenize as tokenize_module
from tasks import validate as validate_module
from tasks.config import RunConfig
from tasks.kinds import Kind
from tasks.results import Splits
from tasks.sources import fingerprint
from tasks.validate import suite_path

P = ParamSpec("P")
R = TypeVar("R")


def timed(stage: Callable[P, R]) -> Callable[P, R]:
    """Log the stage's wall time to the run as ``time/<stage>_s``, whether it passes or fails."""
    signature = inspect.signature(stage)
    name = stage.__name__.removesuffix("_stage")

    @functools.wraps(stage)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        run_id = signature.bind(*args, **kwargs).arguments["run_id"]
        started = time.perf_counter()
        try:
            return stage(*args, **kwargs)
        finally:
            tracking.log_metrics(run_id, {f"time/{name}_s": time.perf_counter() - started})

    return wrapper


def is_transient(err: BaseException) -> bool:
    """Whether trying again may succeed: I/O, a connection, a busy store, a killed process.

    A config, data or shape error (ValueError, TypeError, a RuntimeError from a tensor op, a
    missing file) fails the same way every time: retrying it only wastes the run's time.
    """
    if isinstance(
        err, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
    ):
        return False
    if isinstance(err, OSError | ConnectionError | TimeoutError):
        return True
    from tasks.distributed import DistributedError  # the training stack: imported on failure

    if isinstance(err, DistributedError):
        return err.signalled  # a rank killed from outside (OOM killer, preemption), not a bug
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        transient_codes = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"}
        return err.error_code in transient_codes or "database is locked" in str(err)
    return "database is locked" in str(err)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a stage only when its failure was transient."""
    err = state.data
    transient = isinstance(err, BaseException) and is_transient(err)
    if isinstance(err, BaseException) and not transient:
        get_run_logger().info("not retrying %s: %s is not transient", task.name, type(err).__name__)
    return transient


# Stages write into the run's own folder and pass paths on, so Prefect's input-hash cache has
# nothing to add within one run; caching across runs needs content keys, not argument hashes.
def validation_cache(cfg: RunConfig, tokenizer_id: str, max_length: int) -> Path:
    """The content-addressed folder for validation results of these inputs.

    The key covers the bytes of every source, the data settings, the tokenizer (token lengths
    are checked), ``max_length``, the suite file and the code of validation and reading.
    """
    data = cfg.data
    key = caching.digest(
        cfg.task,
        data.model_dump(mode="json"),
        [caching.source_identity(name) for name in (data.train, data.validation, data.test)],
        tokenizer_id,
        max_length,
        caching.code_version(validate_module, sources_module, extra=[suite_path(cfg.task)]),
    )
    return caching.entry(caching.cache_root(cfg), "validate", key)


def tokenization_cache(
    splits: Splits, labels: list[str], cfg: RunConfig, kind: Kind, tokenizer_id: str
) -> Path:
    """The content-addressed folder for tokenized splits (contents, tokenizer, settings, code)."""
    encode_module = inspect.getmodule(type(kind))
    assert encode_module is not None
    key = caching.digest(
        cfg.task,
        [
            fingerprint(pd.read_parquet(p))
            for p in (splits.train_path, splits.validation_path, splits.test_path)
        ],
        labels,
        cfg.model.model_dump(mode="json"),
        tokenizer_id,
        caching.code_version(tokenize_module, encode_module),
    )
    return caching.entry(caching.cache_root(cfg), "tokenize", key)


def folder_key(context: Any, parameters: dict[str, Any]) -> str:
    """The Prefect cache key of a cached stage: its content-addressed output folder, by its full
    path. A cached result holds paths into that folder, so it is valid in this home only: another
    project with the same data and settings gets another key, and computes its own."""
    folder = parameters["folder"].resolve()
    return f"{folder.parent.name}-{folder.name}-{caching.digest(str(folder))[:12]}"


def cached(stage: Any, folder: Path) -> Any:
    """The stage, told to recompute when its output folder is missing or half-written.

    Its result is stored as JSON (the typed result's fields: paths, counts, fingerprints; not a
    pickle) in the home's own ``cache/results``, beside the folders it points into.
    """
    return stage.with_options(
        refresh_cache=not caching.is_complete(folder),
        result_storage=folder.parent.parent / "results",
        result_serializer="json",
    )
