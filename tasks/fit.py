"""Will the run fit, and how fast is a step: the memory plan of the loaded model (``train.memory``:
it halves the batch and turns on memory-saving options until the estimate fits) and the step-time
probe a time budget plans from."""

from __future__ import annotations

import dataclasses
import importlib.util
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
from tasks.environment import world_size

log = logging.getLogger("tasks.train")


class MemoryPreflightError(RuntimeError):
    """Training would not fit in memory; the message has the numbers and what to change."""


BATCH_FLOOR = 4  # below this micro-batch, `memory: auto` turns on an option before halving again


def low_memory_optim(on_gpu: bool) -> str | None:
    """The 8-bit AdamW that runs on this device, if one is installed: torchao's (CPU and CUDA),
    else bitsandbytes' (CUDA only)."""
    if importlib.util.find_spec("torchao") is not None:
        return "adamw_torch_8bit"
    if on_gpu and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_bnb_8bit"
    return None


def host_share_bytes(on_gpu: bool) -> int:
    """Memory this rank may take: free GPU memory (a device per rank), or on the CPU the free
    host RAM divided among the ranks on this machine (torchrun's ``LOCAL_WORLD_SIZE``)."""
    free = available_bytes()
    return free if on_gpu else free // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def fit_memory(
    model: PreTrainedModel,
    cfg: TrainConfig,
    seq_len: int,
    on_gpu: bool = False,
    precision: str = "fp32",
    baseline: int | None = None,
) -> tuple[TrainConfig, MemoryEstimate, list[str]]:
    """Check that training fits before it starts and, as ``train.memory`` allows, change the
    settings until it does: (settings, their estimate, what was changed and what it saves).

    ``batch`` halves the micro-batch (doubling accumulation) down to 1. ``auto`` halves it down
    to :data:`BATCH_FLOOR`, then turns on, one at a time and in order of what they cost in
    speed, gradient checkpointing (about a third more compute), an 8-bit AdamW
    (:func:`low_memory_optim`; rounding in the moments) and, where the run computes in bf16
    (``precision``) and the 8-bit AdamW is torchao's (its stochastic rounding), bf16 weights and
    gradients, and, for one process without accumulation, the optimizer step in the backward
    pass (no gradient clipping then), trying the configured batch again after each; with all of
    them on but the last, the batch may then halve down to 1. Every rank of a run decides the
    same (:func:`agree`). ``baseline``: what the process held before the model was loaded (the
    resident memory now when not given; loaded weights may be mapped from their file, and only
    partly resident yet).

    Raises:
        MemoryPreflightError: nothing allowed fits (numbers and remedies).
    """
    rss = current_rss_bytes()
    held = rss if baseline is None else baseline  # besides the model, counted in `weights`
    free = host_share_bytes(on_gpu)
    n_params = model.num_parameters()
    head = model.get_output_embeddings()
    head_outputs = int(head.weight.shape[0]) if isinstance(head, torch.nn.Linear) else 0
    largest = max((p.numel() for p in model.parameters()), default=0)

    def need(c: TrainConfig) -> MemoryEstimate:
        return estimate_training_memory(
            model.config,
            n_params,
            c.batch_size,
            seq_len,
            baseline=held,
            shards=world_size() if c.fsdp == "full_shard" else 1,
            checkpointing=c.gradient_checkpointing,
            optimizer_bytes=8 if c.optim == "adamw_torch" else 2,
            weight_bytes=2 if c.bf16_weights else 4,
            head_outputs=head_outputs,
            # The fingerprint that proves every weight moved (tasks.weights), and the bf16 copy
            # of fp32 weights that autocast caches for the step.
            copy_bytes=2 + (2 if precision == "bf16" and not c.bf16_weights else 0),
            gradient_params=largest if c.optimizer_in_backward else None,
        )

    def fits(c: TrainConfig) -> bool:
        return need(c).total - rss <= free

    def halved_to_fit(c: TrainConfig, floor: int) -> TrainConfig | None:
        # A step in the backward pass has no accumulation to keep the effective batch with.
        while not fits(c) and c.batch_size // 2 >= floor and not c.optimizer_in_backward:
            c = c.model_copy(
                update={
                    "batch_size": c.batch_size // 2,
                    "gradient_accumulation_steps": c.gradient_accumulation_steps * 2,
                }
            )
        return c if fits(c) else None

    estimate = need(cfg)
    if cfg.memory == "off" or fits(cfg):
        return cfg, estimate, []
    options: list[dict[str, Any]] = []
    if cfg.memory == "auto":
        if not cfg.gradient_checkpointing:
            options.append({"gradient_checkpointing": True})
        eight_bit = low_memory_optim(on_gpu)
        if cfg.optim == "adamw_torch" and eight_bit is not None:
            options.append({"optim": eight_bit})
        torchao = cfg.optim == "adamw_torch_8bit" or (
            cfg.optim == "adamw_torch" and eight_bit == "adamw_torch_8bit"
        )
        if precision == "bf16" and torchao and cfg.fsdp == "none" and not cfg.bf16_weights:
            options.append({"bf16_weights": True})
        if not cfg.optimizer_in_backward and cfg.steps_whole_batches:
            options.append({"optimizer_in_backward": True})
    tries: list[tuple[TrainConfig, int]] = []
    if cfg.memory in ("batch", "auto"):
        floor = min(cfg.batch_size, BATCH_FLOOR) if cfg.memory == "auto" else 1
        candidate = cfg
        tries.append((candidate, floor))
        for option in options:
            candidate = candidate.model_copy(update=option)
            tries.append((candidate, floor))
        # Last, the batch down to 1 (with accumulation, so without the step in the backward).
        last = candidate.model_copy(update={"optimizer_in_backward": cfg.optimizer_in_backward})
        if floor > 1 or last != candidate:
            tries.append((last, 1))
    for candidate, floor in tries:
        fitted = halved_to_fit(candidate, floor)
        if fitted is not None:
            return fitted, need(fitted), _choices(cfg, fitted, options, need)
    tried = ""
    if tries:
        smallest = tries[-1][0].model_copy(update={"batch_size": 1})
        taken = [(k, v) for o in options for k, v in o.items() if getattr(smallest, k) == v]
        tried = (
            f" With every option `train.memory: {cfg.memory}` may take (batch 1"
            + "".join(f", {k} {v}" for k, v in taken)
            + f") it would still need {need(smallest).describe()}."
        )
    hint = (
        " `pip install torchao` gives an 8-bit AdamW (2 bytes of optimizer state per parameter "
        "instead of 8)."
        if low_memory_optim(on_gpu) is None and cfg.optim == "adamw_torch"
        else ""
    )
    raise MemoryPreflightError(
        f"training needs about {estimate.describe()} at batch {cfg.batch_size} and sequence "
        f"length {seq_len}, but only {free / GIB:.2f} GiB is available.{tried} Lower "
        f"model.max_length, shard over more processes (train.fsdp: full_shard with "
        f"train.num_processes 2 or more), or choose a smaller model"
        f"{'' if cfg.memory == 'auto' else ', or set train.memory: auto'}.{hint}"
    )


def agree(
    plan: tuple[TrainConfig, MemoryEstimate, list[str]] | MemoryPreflightError, on_gpu: bool
) -> tuple[TrainConfig, MemoryEstimate, list[str]]:
    """One memory plan for every rank of the run: each rank plans from the memory it sees
    (which moves as the others load their models), so they may differ; all then take the plan
    that needs the least, and all stop when any rank found none.

    The process group is started here, before the Trainer's (which then uses it): gloo on CPU,
    NCCL on GPU, with each rank on its own device.

    Raises:
        MemoryPreflightError: this rank's plan failed, or another rank's (its message).
    """
    import torch.distributed as dist

    if world_size() == 1:
        if isinstance(plan, MemoryPreflightError):
            raise plan
        return plan
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    mine = (
        str(plan)
        if isinstance(plan, MemoryPreflightError)
        else (plan[0].model_dump(), dataclasses.asdict(plan[1]), plan[2])
    )
    plans: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(plans, mine)
    failed = [(rank, p) for rank, p in enumerate(plans) if isinstance(p, str)]
    if failed:
        rank, message = failed[0]
        raise MemoryPreflightError(f"rank {rank}: {message}")
    settings, estimate, choices = min(plans, key=lambda p: MemoryEstimate(**p[1]).total)
    if settings != mine[0]:
        log.warning("memory plan: this rank takes the leanest rank's (%s)", "; ".join(choices))
    return TrainConfig.model_validate(settings), MemoryEstimate(**estimate), choices


def _choices(
    cfg: TrainConfig, fitted: TrainConfig, options: list[dict[str, Any]], need: Any
) -> list[str]:
    """What the plan changed from ``cfg`` to ``fitted``, each with the bytes it saves."""
    choices = []
    step = cfg.model_copy(update={"batch_size": fitted.batch_size})
    for option in options:
        if all(getattr(fitted, k) == v for k, v in option.items()):
            after = step.model_copy(update=option)
            saved = need(step).total - need(after).total
            name = ", ".join(f"{k} {v}" for k, v in option.items())
            clipping = "; no gradient clipping" if "optimizer_in_backward" in option else ""
            choices.append(f"{name} (saves {saved / GIB:.2f} GiB{clipping})")
            step = after
    if fitted.batch_size != cfg.batch_size:
        at_start = cfg.model_copy(
            update={k: getattr(fitted, k) for option in options for k in option}
        )
        saved = need(at_start).total - need(fitted).total
        choices.insert(
            0,
            f"batch {cfg.batch_size} -> {fitted.batch_size}, accumulation "
            f"{cfg.gradient_accumulation_steps} -> {fitted.gradient_accumulation_steps} "
            f"(same effective batch; saves {saved / GIB:.2f} GiB)",
        )
    return choices


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
