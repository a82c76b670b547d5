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
from tasks.threads import THREADS

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


class ThreadFit(TrainerCallback):
    """As training goes, match torch's threads to the cores other processes leave free
    (:data:`tasks.threads.THREADS`): another job that starts or ends on the machine changes
    the count, each change logged."""

    def on_step_end(self, args, state, control, **kwargs):
        THREADS.refit()


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


class BudgetPlanner(TrainerCallback):
    """Hold training to its share of the run's clock, revising the plan as it goes.

    Training must end by ``deadline`` (epoch seconds: the budget's end less what follows
    training). The probe's plan of ``steps`` is revised from what the steps really cost: after
    the first ``first_revision`` steps, after every validation (its measured cost replaces the
    probe's), and whenever the step time drifts by more than a tenth from the one the plan used.
    The step count and the learning-rate schedule's length both follow; the Trainer's loop was
    sized to ``cap`` steps, so a plan may grow as well as shrink. At the end the model is
    validated (and checkpointed, for selection) as at the end of an epoch; the plan keeps the
    time of that last validation.
    """

    def __init__(
        self,
        deadline: float,
        steps: int,
        cap: int,
        validation_s: float,
        validate_every: float,
        first_revision: int = 3,
    ) -> None:
        self.deadline, self.steps, self.cap = deadline, steps, cap
        self.validation_s, self.validate_every = validation_s, validate_every
        self.first_revision = first_revision
        self.revisions: list[int] = []
        self.step_s = 0.0  # measured seconds per optimizer step (validations apart)
        self._train_s, self._timed = 0.0, 0
        self._began = self._ended = 0.0
        self._evaluated = self._validated_since = False
        self._planned_step_s: float | None = None

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        state.max_steps = self.steps
        stretch_schedule(lr_scheduler, self.steps)

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluated = True

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.time()
        if self._evaluated and self._ended:  # the gap held a validation (and its checkpoint)
            self.validation_s = now - self._ended
            self._validated_since = True
        self._evaluated = False
        self._began = now

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        now = self._ended = time.time()
        self._train_s += now - self._began
        self._timed += 1
        self.step_s = self._train_s / self._timed
        drifted = self._planned_step_s is not None and (
            abs(self.step_s / self._planned_step_s - 1) > 0.1
        )
        due = state.global_step == self.first_revision or self._validated_since or drifted
        if due and state.global_step < self.steps:
            self.revise(state, now, lr_scheduler)
        # The last model is validated too: stop while there is time for it.
        if state.global_step >= self.steps or now + self.validation_s >= self.deadline:
            control.should_training_stop = True
            if args.eval_strategy != "no" and not control.should_evaluate:
                control.should_evaluate = True  # the last model is validated like the others
                control.should_save = args.save_strategy != "no"

    def revise(self, state, now: float, lr_scheduler) -> None:
        from tasks.sizing import revise_budget

        steps = revise_budget(
            self.deadline - now - self.validation_s,  # the last validation's time kept
            self.step_s,
            self.validation_s,
            self.validate_every,
            state.global_step,
            self.cap,
        )
        self._planned_step_s, self._validated_since = self.step_s, False
        if steps == self.steps:
            return
        log.info(
            "time budget: %d steps instead of %d (%.2f s a step, %.1f s a validation, %.0f s left)",
            steps,
            self.steps,
            self.step_s,
            self.validation_s,
            self.deadline - now,
        )
        self.steps = state.max_steps = steps
        self.revisions.append(steps)
        stretch_schedule(lr_scheduler, steps)


def stretch_schedule(scheduler, steps: int) -> None:
    """Make a transformers learning-rate schedule (a ``LambdaLR`` over ``num_training_steps``:
    linear, cosine, …) end at ``steps``; the steps already taken keep their rates."""
    import functools

    lambdas = getattr(scheduler, "lr_lambdas", None) or []
    for i, schedule in enumerate(lambdas):
        if isinstance(schedule, functools.partial) and "num_training_steps" in schedule.keywords:
            keywords = schedule.keywords | {"num_training_steps": steps}
            lambdas[i] = functools.partial(schedule.func, *schedule.args, **keywords)


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
