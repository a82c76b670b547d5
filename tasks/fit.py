"""Will the run fit, and how fast is a step: the memory preflight of the loaded model (with
``auto_batch`` it halves the batch until the estimate fits) and the step-time probe a time budget
plans from."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, Trainer

from tasks.config import TrainConfig
from tasks.efficiency import (
    GIB,
    MemoryEstimate,
    available_bytes,
    current_rss_bytes,
    estimate_training_memory,
)

log = logging.getLogger("tasks.train")


class MemoryPreflightError(RuntimeError):
    """Training would not fit in memory; the message has the numbers and what to change."""


def world_size() -> int:
    """Data-parallel processes of this run (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fit_memory(
    model: PreTrainedModel, cfg: TrainConfig, seq_len: int
) -> tuple[TrainConfig, MemoryEstimate]:
    """Check that training fits before it starts; with ``auto_batch``, shrink the batch to fit.

    Raises:
        MemoryPreflightError: the estimate exceeds the available memory (numbers and remedies).
    """
    baseline = current_rss_bytes()
    free = available_bytes()
    n_params = model.num_parameters()

    def need(batch: int) -> MemoryEstimate:
        return estimate_training_memory(
            model.config,
            n_params,
            batch,
            seq_len,
            baseline=baseline,
            shards=world_size() if cfg.fsdp == "full_shard" else 1,
            checkpointing=cfg.gradient_checkpointing,
            optimizer_bytes=2 if cfg.optim == "adamw_bnb_8bit" else 8,
        )

    estimate = need(cfg.batch_size)
    if not cfg.check_memory or estimate.total - baseline <= free:
        return cfg, estimate
    if cfg.auto_batch:
        batch, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
        while batch > 1 and need(batch).total - baseline > free:
            batch, accumulation = batch // 2, accumulation * 2
        if need(batch).total - baseline <= free:
            log.warning(
                "auto_batch: batch %d -> %d, accumulation %d -> %d (same effective batch)",
                cfg.batch_size,
                batch,
                cfg.gradient_accumulation_steps,
                accumulation,
            )
            fitted = cfg.model_copy(
                update={"batch_size": batch, "gradient_accumulation_steps": accumulation}
            )
            return fitted, need(batch)
    raise MemoryPreflightError(
        f"training needs about {estimate.describe()} at batch {cfg.batch_size} and sequence "
        f"length {seq_len}, but only {free / GIB:.2f} GiB is available. Lower train.batch_size "
        f"(raising train.gradient_accumulation_steps keeps the effective batch), set "
        f"train.auto_batch: true, set train.gradient_checkpointing: true, or lower "
        f"model.max_length."
    )


def measure_step_seconds(trainer: Trainer, accumulation: int) -> tuple[float, float]:
    """(seconds per optimizer step, seconds per whole validation), timed on the run's own batches.

    Three training micro-batches go forward and backward (the first only warms up; gradients are
    discarded, no weight changes) and two validation batches forward. Both are timed per token
    and scaled to the split's mean length: length-grouped training starts with its longest batch
    and sorted validation with its shortest, so per-batch times would mislead. Seeds are
    restored by the caller.
    """
    model = trainer.model
    assert isinstance(model, torch.nn.Module)

    def per_token(loader: Any, step: Any, batches: int, warm_up: bool) -> float:
        seconds, tokens = 0.0, 0
        for i, batch in enumerate(loader):
            started = time.perf_counter()
            step(batch)
            if i > 0 or not warm_up:
                seconds += time.perf_counter() - started
                tokens += int(batch["input_ids"].numel())
            if i + 1 >= batches + warm_up:
                break
        return seconds / max(tokens, 1)

    train_set = trainer.train_dataset
    assert train_set is not None
    # The Trainer sets this per step inside its loop; a loss not normalised by the model reads it.
    trainer.current_gradient_accumulation_steps = accumulation
    model.train()
    train_rate = per_token(
        trainer.get_train_dataloader(), lambda b: trainer.training_step(model, b), 2, True
    )
    model.zero_grad(set_to_none=True)
    args = trainer.args
    step_tokens = float(np.mean(train_set["length"])) * args.per_device_train_batch_size
    step_s = train_rate * step_tokens * accumulation
    eval_s = 0.0
    if trainer.eval_dataset is not None:
        eval_set = trainer.eval_dataset
        eval_rate = per_token(
            trainer.get_eval_dataloader(),
            lambda b: trainer.prediction_step(model, b, prediction_loss_only=False),
            2,
            False,
        )
        eval_s = eval_rate * float(np.sum(eval_set["length"]))  # type: ignore[arg-type]
    return step_s, eval_s
