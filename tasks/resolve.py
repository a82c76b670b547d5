"""What the data says about the run, worked out once after the data contract: the settings the
contract checks with, ``model.max_length`` and ``model.truncation`` sized to the token lengths it
measured (each ``auto`` with its reason), and whether a given test file looks like the training
data. Plain functions: the stages log what they return.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from tasks import sizing, tracking
from tasks.config import DEFAULT_MAX_TRUNCATED, DataConfig, ModelConfig, RunConfig
from tasks.results import ValidatedData

log = logging.getLogger(__name__)


def validation_length(model: ModelConfig, limit: int | None) -> int:
    """The token budget the data contract measures truncation against: the configured
    ``max_length``, or (``auto``, sized after validation) the model's limit."""
    return model.max_length if model.max_length != "auto" else limit or 512


def contract_settings(cfg: RunConfig) -> DataConfig:
    """The data settings the contract checks with: an unset truncation bound filled in (a sized
    ``auto`` length cuts only what the model cannot hold anyway: measured, not refused)."""
    if cfg.data.max_truncated_fraction is not None:
        return cfg.data
    allowed = 1.0 if cfg.model.max_length == "auto" else DEFAULT_MAX_TRUNCATED
    return cfg.data.model_copy(update={"max_truncated_fraction": allowed})


def token_lengths(data: ValidatedData) -> dict[str, np.ndarray]:
    """Tokens per row of each validated table, as the data contract counted them."""
    path = data.token_lengths_path
    return dict(np.load(path)) if path and Path(path).exists() else {}


class Sized(NamedTuple):
    """The model settings sized to the data, the validated data with its truncated share at the
    length that will be used, and each ``auto`` choice with its reason."""

    model: ModelConfig
    data: ValidatedData
    reasons: dict[str, str]


def size_to_data(
    cfg: RunConfig, data: ValidatedData, lengths: dict[str, np.ndarray], limit: int
) -> Sized:
    """Resolve ``model.max_length`` (within ``limit``) and ``model.truncation`` from the token
    lengths, each with its reason, and the truncated share at the length actually used."""
    train = lengths.get("train", np.zeros(0, dtype=np.int64))
    model = cfg.model
    reasons: dict[str, str] = {}
    if model.max_length == "auto":
        value, reasons["model.max_length"] = sizing.size_max_length(train, limit, cfg.task)
        model = model.model_copy(update={"max_length": value})
    if cfg.task == "text-classification":
        side, why = sizing.choose_truncation(model.truncation, train, model.tokens())
        if model.truncation == "auto" or side == "head+tail":
            reasons["model.truncation"] = why
        model = model.model_copy(update={"truncation": side})
    elif model.truncation == "auto":
        model = model.model_copy(update={"truncation": "head"})
    truncated = {s: sizing.cut_share(v, model.tokens()) for s, v in lengths.items()}
    data = data.model_copy(update={"truncated_fraction": truncated or data.truncated_fraction})
    return Sized(model, data, reasons)


def described(sized: Sized) -> dict[str, str]:
    """Each ``auto`` choice as ``{setting: "value (reason)"}``: the run's ``sizing.*`` tags."""
    return {
        setting: f"{getattr(sized.model, setting.split('.')[1])} ({reason})"
        for setting, reason in sized.reasons.items()
    }


def check_shift(
    data: ValidatedData, lengths: dict[str, np.ndarray], seed: int, run_id: str
) -> None:
    """Compare the given test file with the training data a validation split is carved from;
    log the figures (``shift/*``) and warn, on the run too, when they differ."""
    if data.test_path is None or not {"train", "test"} <= lengths.keys():
        return
    frames = {"train": pd.read_parquet(data.train_path), "test": pd.read_parquet(data.test_path)}
    if not all("text" in f for f in frames.values()):
        return
    figures, warning = sizing.distribution_shift(
        lengths["train"],
        lengths["test"],
        frames["train"]["text"].astype(str).tolist(),
        frames["test"]["text"].astype(str).tolist(),
        seed,
    )
    tracking.log_metrics_once(run_id, figures)
    if warning is not None:
        log.warning("DISTRIBUTION SHIFT: %s", warning)
        tracking.set_tags(run_id, {"data.shift_warning": warning})
