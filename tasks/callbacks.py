"""The recipe's Trainer callbacks: metrics to MLflow, progress lines, step time, the time budget,
and the marker that makes a checkpoint resumable."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from tasks import tracking
from tasks.checkpoints import COMPLETE

# The recipe's progress lines go out under its logger (the terminal, the run's log file, Prefect).
log = logging.getLogger("tasks.train")


class MlflowMetricsCallback(TrainerCallback):
    """Send the Trainer's logs (loss, learning rate, grad norm, eval metrics) to one MLflow run.

    One batched call per logging step: no per-step round trips beyond what the user asked for
    with ``logging_steps``.
    """

    def __init__(self, run_id: str, after_step: int = -1):
        self.run_id = run_id
        # A resumed run replays the steps between its checkpoint and the crash: those metric
        # steps are in MLflow already, and are not logged twice.
        self.after_step = after_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or state.global_step <= self.after_step:
            return
        renamed = {
            (f"val/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"): v
            for key, v in logs.items()
        }
        tracking.log_metrics(self.run_id, renamed, step=state.global_step)


class ProgressLog(TrainerCallback):
    """One line per ``logging_steps``: step / total, loss, learning rate, time left; one per
    validation with its metrics. Logged under ``tasks.train``, so it reaches the terminal, the
    run's log file and the Prefect UI alike (a deployment's run is followed in the browser)."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self._started is None:
            return
        step, total = state.global_step, state.max_steps
        if any(k.startswith("eval_") for k in logs):
            shown = {
                k.removeprefix("eval_"): v
                for k, v in logs.items()
                if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))
            }
            values = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            log.info("step %d/%d  validation: %s", step, total, values)
            return
        if "loss" not in logs:
            return
        done = step - self._first_step
        elapsed = time.perf_counter() - self._started
        left = elapsed / done * (total - step) if done > 0 and total > step else 0.0
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %s left",
            step,
            total,
            float(logs["loss"]),
            float(logs.get("learning_rate", 0.0)),
            time.strftime("%H:%M:%S", time.gmtime(left)),
        )


class StepTimer(TrainerCallback):
    """Wall time spent in optimizer steps only (evaluation and checkpointing excluded)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None


class StateBytes(TrainerCallback):
    """What this process holds of the training state, measured before an optimizer step (the
    gradients are there) once the optimizer holds its moments (from the second step on; the
    sizes do not change after): the bytes of its parameters, gradients and optimizer state, a
    shard's under FSDP."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None or self.bytes.get("optimizer"):
            return
        params = list(model.parameters())
        moments = [t for s in optimizer.state.values() for t in s.values() if hasattr(t, "numel")]
        self.bytes = {
            "parameters": local_bytes(params),
            "gradients": local_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer": local_bytes(moments),
        }


def local_bytes(tensors: list) -> int:
    """The bytes these tensors take in this process (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


class BudgetGuard(TrainerCallback):
    """Stop training once ``seconds`` have passed since it began: the planned step count is an
    estimate, this is the bound (the best checkpoint so far is still the one kept)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._began = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if (
            time.perf_counter() - self._began >= self.seconds
            and state.global_step < state.max_steps
        ):
            control.should_training_stop = True


class CheckpointMarker(TrainerCallback):
    """Mark a checkpoint complete once the Trainer has written all of it (trainer state last).

    The marker is written atomically (a temporary file, then a rename), by the main process once
    every rank has saved its part; resume only ever uses a checkpoint that has it, so one cut
    short by a kill is never loaded.
    """

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part (its RNG state, its shard)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            tmp = folder / f".{COMPLETE}.tmp"
            tmp.write_text(str(state.global_step))
            os.replace(tmp, folder / COMPLETE)
