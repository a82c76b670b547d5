"""The full-parameter fine-tuning recipe: every weight of the pretrained model is trained.

Setup helpers build the model, the data, the loss and the training arguments; then one
``Trainer.train()`` call runs the loop (AdamW, linear warmup and decay, weight decay, gradient
clipping, seeded), validating as it goes and keeping the best checkpoint by the task's validation
metric (macro F1 for classification, loss for a causal LM). The task's kind supplies the model
class, collator and checks; resume, scheduling, preflight and efficiency are shared.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import DatasetDict, load_from_disk
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from tasks import tracking
from tasks.checkpoints import COMPLETE, latest_checkpoint
from tasks.config import ModelConfig, TrainConfig, parse_duration
from tasks.efficiency import (
    GIB,
    MemoryEstimate,
    available_bytes,
    current_rss_bytes,
    estimate_training_memory,
    matmul_peak_flops,
    non_embedding_params,
    peak_rss_bytes,
    resolve_precision,
    train_flops_per_token,
    use_attention,
)
from tasks.results import TokenizedData, TrainJob, TrainResult
from tasks.sizing import auto_warmup, plan_budget
from tasks.sources import load_tokenizer

if TYPE_CHECKING:
    from tasks.kinds import Kind

log = logging.getLogger(__name__)

# The `auto` schedule: enough optimizer steps to adapt, few enough epochs not to memorise.
TARGET_STEPS = 300
MIN_EPOCHS, MAX_EPOCHS = 2, 10
# The `auto` learning rate: 1e-4 for a ~25M-parameter encoder, scaled by 1/sqrt(size), so BERT-base
# (110M) gets ~5e-5 and BERT-large (335M) ~3e-5, the usual values for those models.
REFERENCE_PARAMS, REFERENCE_LR = 25e6, 1e-4


class MemoryPreflightError(RuntimeError):
    """Training would not fit in memory; the message has the numbers and what to change."""


class ModelCollapsed(RuntimeError):
    """The trained model is no better than guessing; the message says what to try."""


def collapse_advice(finding: str, cfg: TrainConfig, learning_rate: float, version: str) -> str:
    """What happened to a collapsed run, where its model went, and what to change."""
    lower = f"{learning_rate / 3:.1e}"
    return (
        f"the model collapsed ({finding}). It was registered as version {version} without an "
        "alias and tagged `collapsed`, for inspection only; no alias moved.\nTry, in order:\n"
        "  - more optimizer steps: train.epochs (or train.time_budget) higher; small data sets "
        "need several epochs\n"
        "  - class weights for skewed labels: train.class_weights=auto (now "
        f"{cfg.class_weights!r}), or train.balanced_sampling=true\n"
        f"  - a lower learning rate: train.learning_rate={lower} "
        f"(this run used {learning_rate:.1e})"
    )


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

    The marker is written atomically (a temporary file, then a rename); resume only ever uses a
    checkpoint that has it, so one cut short by a kill is never loaded.
    """

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            tmp = folder / f".{COMPLETE}.tmp"
            tmp.write_text(str(state.global_step))
            os.replace(tmp, folder / COMPLETE)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """HF's length-grouped sampler with its shuffle drawn from ``seed + epoch``.

    HF's draws from the global RNG when an epoch starts, so a run resumed mid-epoch would see
    another order than the one it was interrupted in. Seeded per epoch, the order depends only on
    the epoch, and a resumed run continues exactly where the interrupted one stopped.
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class EpochSeededBalancedSampler(torch.utils.data.Sampler[int]):
    """Rows drawn with replacement so that every class is equally likely, seeded per epoch."""

    def __init__(self, labels: np.ndarray, seed: int) -> None:
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, len(self.weights), True, generator=generator)
        return iter(drawn.tolist())


class FinetuneTrainer(Trainer):
    """``Trainer`` with resumable (epoch-seeded) samplers and a collator of its own for scoring.

    A packed training batch is one long row; validation batches (``eval.batch_size`` rows) stay
    padded rows, so scoring never builds one attention matrix over the whole batch.
    """

    def __init__(
        self,
        *args: Any,
        balanced_labels: np.ndarray | None = None,
        eval_collator: Any = None,
        batch_loss: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.balanced_labels = balanced_labels
        self.eval_collator = eval_collator
        self.batch_loss = batch_loss
        if batch_loss is not None:  # its collator reads columns the model's forward does not take
            self.args.remove_unused_columns = False

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.batch_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.batch_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        if self.batch_loss is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.batch_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self.eval_collator is None:
            return super().evaluate(*args, **kwargs)
        training_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = training_collator

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.balanced_labels is not None:
            return EpochSeededBalancedSampler(self.balanced_labels, seed)
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            return EpochSeededLengthGroupedSampler(
                sampler.batch_size, lengths=sampler.lengths, seed=seed
            )
        return sampler


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


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Rows per optimizer step: ``batch_size`` is per process, so all processes count."""
    return cfg.batch_size * cfg.gradient_accumulation_steps * world_size


def steps_per_epoch(cfg: TrainConfig, train_rows: int, world_size: int) -> int:
    """Optimizer steps in one pass over ``train_rows`` (at least one)."""
    return max(1, math.ceil(train_rows / global_batch(cfg, world_size)))


def world_size() -> int:
    """Data-parallel processes of this run (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def auto_schedule(
    cfg: TrainConfig, train_rows: int, n_params: int, processes: int
) -> tuple[float, float]:
    """(epochs, learning rate), resolving ``auto`` from the data size and the model size.

    Epochs: enough for about ``TARGET_STEPS`` optimizer steps of the global batch (all
    ``processes`` together), clamped to [2, 10]: 600 rows at batch 32 get 10 epochs, 35,000 rows
    get 2. Early stopping and best-checkpoint selection make the upper end safe. Learning rate:
    ``1e-4 * sqrt(25M / params)``, clamped to [1e-5, 2e-4].
    """
    epochs = cfg.epochs
    if epochs == "auto":
        per_epoch = steps_per_epoch(cfg, train_rows, processes)
        epochs = float(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / per_epoch))))
    lr = cfg.learning_rate
    if lr == "auto":
        lr = float(np.clip(REFERENCE_LR * math.sqrt(REFERENCE_PARAMS / n_params), 1e-5, 2e-4))
    return float(epochs), float(lr)


def preflight(
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


def setup_data(tokenized: TokenizedData, cfg: TrainConfig) -> DatasetDict:
    """The tokenized train and validation splits, with the subsets the config asks for.

    The test split stays on disk: nothing in training or model selection sees it.
    """
    data = load_from_disk(tokenized.path)
    assert isinstance(data, DatasetDict)
    # max_train_samples is applied when the splits are made, so every stage sees the same rows.
    data = DatasetDict({"train": data["train"], "validation": data["validation"]})
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(data["validation"]):
        data["validation"] = (
            data["validation"].shuffle(seed=cfg.seed).select(range(cfg.max_eval_samples))
        )
    # Sorted by length, validation batches hold texts of similar length: less padding.
    data["validation"] = data["validation"].sort("length")
    return data


def sharding_arguments(cfg: TrainConfig, on_gpu: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` for ``train.fsdp``, ``train.optim`` and checkpointing.

    FSDP2 through accelerate, every transformer block a shard unit (the model's
    ``_no_split_modules``), resharded after each forward (full sharding). accelerate enables FSDP
    only on accelerators: on CPU processes it would quietly train plain DDP instead, so a CPU run
    that asks for FSDP is refused rather than mislabelled.
    """
    if cfg.optim == "adamw_bnb_8bit" and not on_gpu:
        raise ValueError("train.optim adamw_bnb_8bit needs CUDA (bitsandbytes); use adamw_torch")
    if cfg.fsdp == "none":
        return {"activation_checkpointing": cfg.gradient_checkpointing}
    if not on_gpu:
        raise ValueError(
            "train.fsdp full_shard needs CUDA: accelerate runs FSDP only on GPUs, and on CPU "
            "processes it would train plain DDP. Use train.fsdp: none (DDP over gloo) here."
        )
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "cpu_offload": cfg.fsdp_cpu_offload,
            # Under FSDP, checkpointing is FSDP's own (the Trainer refuses both at once).
            "activation_checkpointing": cfg.gradient_checkpointing,
        },
        "activation_checkpointing": False,
    }


def setup_args(
    cfg: TrainConfig,
    output_dir: Path,
    epochs: float,
    learning_rate: float,
    kind: Kind,
    eval_batch_size: int,
) -> TrainingArguments:
    """Map our recipe onto ``TrainingArguments``."""
    eval_steps = cfg.eval_steps or cfg.checkpoint_steps
    interval = "steps" if eval_steps else "epoch"
    # Resumable checkpoints carry the optimizer, scheduler and RNG; selection-only ones need not.
    resumable = cfg.checkpoint_steps is not None
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    distributed = world_size() > 1
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=learning_rate,
        weight_decay=cfg.weight_decay,
        # A share of the total steps, which train() knows only once a time budget is planned: it
        # sets this (resolving `auto`) just before training starts.
        warmup_steps=0.0,
        lr_scheduler_type="linear",
        max_grad_norm=cfg.max_grad_norm,
        # Fused AdamW: one kernel over all parameters (CPU and CUDA); on MiniLM-L6 on 2 CPU cores
        # 13 ms per step instead of 79 ms for the per-tensor (foreach) update.
        optim=cfg.optim if cfg.optim != "adamw_torch" else "adamw_torch_fused",
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=interval,
        eval_steps=eval_steps,
        # Checkpoints serve selection (the best validation model) and resume (the latest state).
        save_strategy=interval if (cfg.select_best or resumable) else "no",
        save_steps=cfg.checkpoint_steps or eval_steps or 500,  # used only with steps
        save_only_model=not resumable,
        save_total_limit=cfg.keep_checkpoints if resumable else 1,
        load_best_model_at_end=cfg.select_best,
        metric_for_best_model=kind.selection_metric,
        greater_is_better=kind.greater_is_better,
        report_to="none",
        use_cpu=not on_gpu,  # also tells accelerate that a torchrun job is CPU DDP (gloo)
        disable_tqdm=True,  # ProgressLog writes one line per logging_steps instead
        # bf16 autocast where the device multiplies bf16 natively (train.precision); TF32
        # matmuls and pinned host memory on GPUs.
        bf16=resolve_precision(cfg.precision, on_gpu)[0] == "bf16",
        tf32=on_gpu,
        dataloader_pin_memory=on_gpu,
        torch_compile=cfg.compile and on_gpu,
        # Under torchrun (train.num_processes > 1): DDP over NCCL on GPUs, gloo on CPUs.
        ddp_backend=("nccl" if on_gpu else "gloo") if distributed else None,
        **sharding_arguments(cfg, on_gpu),
    )


def full(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on the CPU. Under FSDP each rank holds a shard (a DTensor):
    gathering it is a collective, so every rank must call this for the same parameters."""
    value = param.detach()
    gather = getattr(value, "full_tensor", None)
    return (gather() if gather is not None else value).cpu()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter, to prove afterwards that each one was updated."""
    return {name: full(p).clone() for name, p in model.named_parameters()}


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: two models with the same digest have the same weights."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        h.update(name.encode())
        h.update(full(param).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def count_updated(
    model: torch.nn.Module, before: dict[str, torch.Tensor]
) -> tuple[int, int, int, int]:
    """(params_total, params_updated, tensors_total, tensors_updated) against a snapshot."""
    params_total = params_updated = tensors_updated = 0
    for name, param in model.named_parameters():
        changed = full(param) != before[name]
        params_total += param.numel()
        params_updated += int(changed.sum())
        tensors_updated += int(bool(changed.any()))
    return params_total, params_updated, len(before), tensors_updated


def train(
    tokenized: TokenizedData,
    labels: list[str],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    eval_batch_size: int,
    workdir: Path,
    kind: Kind,
    callbacks: list[TrainerCallback] | None = None,
    checkpoint_dir: Path | None = None,
    tokenizer: Any | None = None,
) -> TrainResult:
    """Fine-tune every parameter on the train split; save the selected model to ``workdir/model``.

    The validation split is scored every epoch (or ``eval_steps``); with ``select_best`` the
    checkpoint with the best validation score (the kind's selection metric) is the one saved. The
    test split is never loaded. With ``checkpoint_dir``, checkpoints go there and training resumes
    from the latest complete one found there (model, optimizer, scheduler, RNG states and position
    in the data order). ``kind`` supplies the model class, the collator, the metrics and the
    task's checks; the recipe is the same for every kind. ``tokenizer`` is the run's tokenizer
    (loaded from ``model_cfg`` when not given, as in a torchrun rank).
    """
    set_seed(cfg.seed)  # before any new head is initialised, so runs are reproducible
    data = setup_data(tokenized, cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.revision)
    # May give the tokenizer a pad token, which must happen before it is saved with the model.
    collator = kind.collator(tokenizer, model_cfg, training=True)
    model = kind.setup_model(model_cfg, labels)
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    precision, why = resolve_precision(cfg.precision, on_gpu)
    attention = use_attention(model, precision, on_gpu)
    before = snapshot(model)
    lengths = np.asarray(data["train"]["length"])
    cfg, estimate = preflight(model, cfg, int(lengths.max()))
    log.info("memory preflight: %s", estimate.describe())
    processes = world_size()
    epochs, learning_rate = auto_schedule(
        cfg, len(data["train"]), model.num_parameters(), processes
    )
    extras = kind.train_extras(cfg, data["train"], labels)
    if extras.reference is not None:  # the starting model's columns, before any step changes it
        data = extras.reference(model, data)
    length = (
        f"{cfg.max_steps} steps (train.max_steps)" if cfg.max_steps > 0 else f"{epochs:.1f} epochs"
    )
    log.info("schedule: %s at lr %.2e; %s", length, learning_rate, extras.notes)
    log.info("precision %s (%s)%s", precision, why, f", {attention} attention" if attention else "")
    extras.notes["train.precision"] = f"{precision} ({why})"

    early_stopping = (
        [EarlyStoppingCallback(cfg.early_stopping_patience)]
        if (cfg.early_stopping_patience and cfg.select_best)
        else []
    )
    timer = StepTimer()
    output_dir = checkpoint_dir or workdir / "trainer"
    trainer = FinetuneTrainer(
        model=model,
        args=setup_args(cfg, output_dir, epochs, learning_rate, kind, eval_batch_size),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=collator,
        eval_collator=kind.collator(tokenizer, model_cfg, training=False),
        compute_metrics=kind.compute_metrics(labels),
        compute_loss_func=extras.compute_loss_func,
        callbacks=[*(callbacks or []), *early_stopping, timer, CheckpointMarker(), ProgressLog()],
        balanced_labels=extras.sampler_labels,
        batch_loss=extras.batch_loss,
    )
    trainer.remove_callback(PrinterCallback)  # its raw dicts: ProgressLog says it in words
    per_epoch = steps_per_epoch(cfg, len(data["train"]), processes)
    plan: dict[str, float] = {}
    if cfg.time_budget is not None:
        budget = parse_duration(cfg.time_budget)
        step_s, eval_s = measure_step_seconds(trainer, cfg.gradient_accumulation_steps)
        set_seed(cfg.seed)  # the probe drew random numbers: training starts as it would have
        evals_per_epoch = per_epoch / cfg.eval_steps if cfg.eval_steps else 1.0
        planned, why = plan_budget(budget, step_s, eval_s, per_epoch, evals_per_epoch)
        trainer.args.max_steps = planned
        trainer.add_callback(BudgetGuard(budget))
        log.info("time budget %s: %s", cfg.time_budget, why)
        extras.notes["plan.time_budget"] = why
        plan = {
            "plan/budget_s": budget,
            "plan/steps": float(planned),
            "plan/step_s": step_s,
            "plan/validation_s": eval_s,
        }
    total_steps = (
        trainer.args.max_steps if trainer.args.max_steps > 0 else math.ceil(epochs * per_epoch)
    )
    warmup, why = auto_warmup(cfg.warmup_fraction, total_steps, model.num_parameters())
    trainer.args.warmup_steps = warmup
    if cfg.warmup_fraction == "auto":
        log.info("auto train.warmup_fraction = %.2f: %s", warmup, why)
        extras.notes["sizing.train.warmup_fraction"] = f"{warmup} ({why})"
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:
        log.warning("resuming from %s", resume)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - started
    if plan:
        plan |= {"plan/actual_s": runtime, "plan/actual_steps": float(output.global_step)}
        log.info(
            "time budget: planned %d steps in %.0f s; ran %d steps in %.0f s",
            plan["plan/steps"],
            plan["plan/budget_s"],
            output.global_step,
            runtime,
        )

    model_dir = workdir / "model"
    trainer.save_model(str(model_dir))  # the selected model, with its tokenizer
    selected = trainer.model  # the best checkpoint's weights when select_best loaded them
    assert isinstance(selected, torch.nn.Module)
    params_total, params_updated, tensors_total, tensors_updated = count_updated(selected, before)
    if tensors_updated < tensors_total:
        frozen = [n for n, p in selected.named_parameters() if torch.equal(full(p), before[n])]
        log.warning("%d parameter tensors were not updated: %s", len(frozen), frozen[:10])

    checking = time.perf_counter()
    checked = kind.check(trainer, data["validation"], labels, data["train"])
    validation_s = (
        time.perf_counter()
        - checking
        + sum(float(e.get("eval_runtime", 0.0)) for e in trainer.state.log_history)
    )
    if checked.collapse:
        log.warning("COLLAPSE GUARD: %s; this model will not be promoted", checked.collapse)

    # Efficiency: non-pad tokens of the samples actually stepped through, over pure step time.
    resumed_step = int(resume.name.rsplit("-", 1)[1]) if resume else 0
    samples_seen = min(
        (output.global_step - resumed_step) * global_batch(cfg, processes),
        math.ceil(epochs * len(lengths)),
    )
    tokens = int(samples_seen * lengths.mean())
    config = model.config  # the architecture; selection only swaps the weights
    flops = tokens * train_flops_per_token(
        non_embedding_params(selected),
        config.num_hidden_layers,
        config.hidden_size,
        float(lengths.mean()),
    )
    peak = matmul_peak_flops(dtype="bfloat16" if precision == "bf16" else "float32")
    step_time = max(timer.seconds, 1e-9)
    losses, curve = training_history(trainer.state.log_history, kind.selection_metric)
    best = trainer.state.best_global_step
    return TrainResult(
        model_dir=str(model_dir),
        global_step=output.global_step,
        train_samples=len(data["train"]),
        epochs=epochs,
        learning_rate=learning_rate,
        best_step=int(best) if best else None,
        stopped_early=output.global_step < trainer.state.max_steps,
        notes=extras.notes,
        train_loss=float(output.training_loss),
        first_logged_loss=losses[0] if losses else None,
        last_logged_loss=losses[-1] if losses else None,
        runtime_s=runtime,
        samples_per_s=float(output.metrics.get("train_samples_per_second", 0.0)),
        params_total=params_total,
        params_updated=params_updated,
        tensors_total=tensors_total,
        tensors_updated=tensors_updated,
        validation=checked.validation,
        validation_curve=curve,
        reference=checked.reference,
        collapse=checked.collapse,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        step_time_s=timer.seconds,
        non_pad_tokens=tokens,
        tokens_per_s=tokens / step_time,
        mfu=flops / step_time / peak,
        matmul_peak_flops=peak,
        peak_rss_bytes=peak_rss_bytes(),
        preflight_estimate_bytes=estimate.total,
        resumed_from_step=resumed_step or None,
        weights_digest=weights_digest(selected),
        num_processes=trainer.args.world_size,
        plan=plan,
        validation_s=validation_s,
    )


def training_history(
    history: list[dict[str, Any]], selection_metric: str
) -> tuple[list[float], list[dict[str, float]]]:
    """(logged training losses, validation curve) from the Trainer's log history."""
    losses = [entry["loss"] for entry in history if "loss" in entry]
    scored = f"eval_{selection_metric}"
    curve = [
        {"step": float(e["step"]), "epoch": float(e.get("epoch", 0))}
        | {
            k.removeprefix("eval_"): float(v)
            for k, v in e.items()
            if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
        }
        for e in history
        if scored in e
    ]
    return losses, curve


def run_job(
    job: TrainJob,
    kind: Kind,
    callbacks: Sequence[TrainerCallback],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> TrainResult:
    """:func:`train` on a :class:`TrainJob` (the train stage's input, and each rank's)."""
    return train(
        job.tokenized,
        job.labels,
        job.model_cfg,
        job.cfg,
        job.eval_batch_size,
        Path(job.workdir),
        kind,
        list(callbacks),
        Path(job.checkpoint_dir) if job.checkpoint_dir else None,
        tokenizer,
    )


def main(job_path: str) -> None:
    """One torchrun rank: run the recipe; every rank writes its result (its weights' digest)."""
    from tasks.kinds import get_kind

    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(message)s")
    job = TrainJob.model_validate_json(Path(job_path).read_text())
    # The tracking store comes from MLFLOW_TRACKING_URI, set by the launcher.
    # The callback logs on the main process only (Trainer's is_world_process_zero).
    callbacks: list[TrainerCallback] = (
        [MlflowMetricsCallback(job.run_id, job.after_step)] if job.run_id else []
    )
    result = run_job(job, get_kind(job.task), callbacks)
    job.result_path(int(os.environ.get("RANK", "0"))).write_text(result.model_dump_json())


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
