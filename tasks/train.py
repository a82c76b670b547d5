"""The full-parameter fine-tuning recipe: every weight of the pretrained model is trained.

:func:`train` reads top to bottom as the recipe: set up the data and the model, fit the batch to
memory and resolve the schedule (:func:`setup`), build the ``Trainer`` (:func:`setup_trainer`),
plan the steps (a time budget, the warm-up), then one ``Trainer.train()`` call runs the loop
(AdamW, linear warm-up and decay, weight decay, gradient clipping, seeded), validating as it goes
and keeping the best checkpoint by the kind's validation metric. The task's kind supplies the
model class, collator and checks; resume, scheduling, the memory fit and the accounting are shared.
One signature, ``train(job, kind, callbacks, tokenizer)``, serves the flow, the sweep, the bench
and every torchrun rank.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import DatasetDict, load_from_disk
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from tasks.callbacks import (
    BudgetPlanner,
    CheckpointMarker,
    MlflowMetricsCallback,
    ProgressLog,
    StateBytes,
    StepTimer,
    ThreadFit,
)
from tasks.checkpoints import latest_checkpoint
from tasks.config import TrainConfig, parse_duration
from tasks.efficiency import (
    MemoryEstimate,
    current_rss_bytes,
    peak_rss_bytes,
    resolve_precision,
    throughput,
    use_attention,
)
from tasks.fit import (
    MemoryPreflightError,
    agree,
    fit_memory,
    measure_step_seconds,
    world_size,
)
from tasks.results import TokenizedData, TrainJob, TrainResult
from tasks.sizing import (
    DISK_BYTES_PER_S,
    MAX_BUDGET_EPOCHS,
    SAVE_S,
    auto_schedule,
    auto_warmup,
    global_batch,
    plan_budget,
    steps_per_epoch,
)
from tasks.sources import load_tokenizer
from tasks.threads import THREADS
from tasks.trainer import FinetuneTrainer
from tasks.weights import count_updated, full, snapshot, weights_digest

if TYPE_CHECKING:
    from tasks.kinds import Kind, TrainExtras

log = logging.getLogger(__name__)


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


def shard_units(model: PreTrainedModel) -> list[str]:
    """The block classes FSDP shards one by one: the model's ``_no_split_modules`` except any
    that holds the input embeddings (BERT's ``BertEmbeddings``), which accelerate shards as a unit
    of their own; a module sharded twice fails."""
    embeddings = model.get_input_embeddings()
    holders = {
        type(m).__name__ for m in model.modules() if any(s is embeddings for s in m.modules())
    }
    return sorted(set(getattr(model, "_no_split_modules", None) or []) - holders)


def sharding_arguments(cfg: TrainConfig, on_gpu: bool, units: Sequence[str] = ()) -> dict[str, Any]:
    """The ``TrainingArguments`` for ``train.fsdp``, ``train.optim`` and checkpointing.

    FSDP2 through accelerate, every transformer block a shard unit (``units``, see
    :func:`shard_units`), resharded after each forward (full sharding), on GPUs (NCCL) and CPU
    processes (gloo) alike (:class:`FinetuneTrainer` enables it on CPU, where accelerate would
    not). The saved model and checkpoints hold full weights, so any rank count resumes them.
    """
    if cfg.optim == "adamw_bnb_8bit" and not on_gpu:
        raise ValueError("train.optim adamw_bnb_8bit needs CUDA (bitsandbytes); use adamw_torch")
    if cfg.bf16_weights and resolve_precision(cfg.precision, on_gpu)[0] != "bf16":
        raise ValueError(
            "train.bf16_weights needs bf16 arithmetic, and this device has no native bf16 "
            "(train.precision resolved to fp32): leave it false"
        )
    if cfg.fsdp == "none":
        return {"activation_checkpointing": cfg.gradient_checkpointing}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            **({"transformer_layer_cls_to_wrap": list(units)} if units else {}),
            "cpu_offload": cfg.fsdp_cpu_offload and on_gpu,  # CPU ranks hold them in host memory
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
    units: Sequence[str] = (),
) -> TrainingArguments:
    """Map our recipe onto ``TrainingArguments`` (``units``: the classes FSDP shards)."""
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
        # Clipping needs every gradient's norm first; a step in the backward pass has none.
        max_grad_norm=0.0 if cfg.optimizer_in_backward else cfg.max_grad_norm,
        # Fused AdamW: one kernel over all parameters (CPU and CUDA), faster than the per-tensor
        # (foreach) update (docs/benchmarks.md).
        optim=cfg.optim if cfg.optim != "adamw_torch" else "adamw_torch_fused",
        # bf16 weights: torchao rounds each update stochastically (train.bf16_weights).
        optim_args="bf16_stochastic_round=True" if cfg.bf16_weights else None,
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
        **sharding_arguments(cfg, on_gpu, units),
    )


@dataclass(frozen=True)
class Setup:
    """The recipe as it will run: the training settings after the memory plan
    (``train.memory``), the resolved schedule and arithmetic, and the notes the run is tagged
    with."""

    cfg: TrainConfig
    epochs: float
    learning_rate: float
    precision: str
    estimate: MemoryEstimate
    notes: dict[str, str]
    data: DatasetDict  # train and validation, with the kind's columns (a DPO reference's)
    lengths: np.ndarray  # tokens per training row
    extras: TrainExtras  # the kind's loss, sampler labels or batch loss
    collator: Any


def setup(
    job: TrainJob,
    kind: Kind,
    model: PreTrainedModel,
    data: DatasetDict,
    collator: Any,
    held: int | None = None,
) -> Setup:
    """Fit the batch to memory, resolve the schedule and precision, and let the kind add its
    loss, sampler or reference columns. ``held``: the process's memory before the model was
    loaded."""
    on_gpu = job.cfg.device != "cpu" and torch.cuda.is_available()
    THREADS.start(job.cfg.threads)
    precision, why = resolve_precision(job.cfg.precision, on_gpu)
    attention = use_attention(model, precision, on_gpu)
    lengths = np.asarray(data["train"]["length"])
    plan: tuple[TrainConfig, MemoryEstimate, list[str]] | MemoryPreflightError
    try:
        plan = fit_memory(model, job.cfg, int(lengths.max()), on_gpu, precision, held)
    except MemoryPreflightError as error:  # every rank hears of it, so none waits for the others
        plan = error
    cfg, estimate, choices = agree(plan, on_gpu)
    if cfg.bf16_weights:
        model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers wraps `to`
    for choice in choices:
        log.warning("memory plan (train.memory: %s): %s", cfg.memory, choice)
    log.info("memory preflight: %s", estimate.describe())
    epochs, learning_rate = auto_schedule(
        cfg, len(data["train"]), model.num_parameters(), world_size()
    )
    extras = kind.train_extras(cfg, data["train"], job.labels)
    if extras.reference is not None:  # the starting model's columns, before any step changes it
        data = extras.reference(model, data)
    length = (
        f"{cfg.max_steps} steps (train.max_steps)" if cfg.max_steps > 0 else f"{epochs:.1f} epochs"
    )
    log.info("schedule: %s at lr %.2e; %s", length, learning_rate, extras.notes)
    log.info("precision %s (%s)%s", precision, why, f", {attention} attention" if attention else "")
    notes = extras.notes | {
        "train.precision": f"{precision} ({why})",
        "train.threads": f"{torch.get_num_threads()} of {len(os.sched_getaffinity(0))} cores",
    }
    if choices:
        notes["train.memory"] = "; ".join(choices)
    return Setup(
        cfg,
        epochs,
        learning_rate,
        precision,
        estimate,
        notes,
        data,
        lengths,
        extras,
        collator,
    )


def setup_trainer(
    job: TrainJob,
    kind: Kind,
    run: Setup,
    model: PreTrainedModel,
    tokenizer: Any,
    callbacks: Sequence[TrainerCallback],
) -> FinetuneTrainer:
    """The ``Trainer`` over the run's data, with the recipe's callbacks."""
    cfg, data, extras = run.cfg, run.data, run.extras
    early_stopping = (
        [EarlyStoppingCallback(cfg.early_stopping_patience)]
        if (cfg.early_stopping_patience and cfg.select_best)
        else []
    )
    output_dir = Path(job.checkpoint_dir) if job.checkpoint_dir else Path(job.workdir) / "trainer"
    trainer = FinetuneTrainer(
        model=model,
        args=setup_args(
            cfg,
            output_dir,
            run.epochs,
            run.learning_rate,
            kind,
            job.eval_batch_size,
            shard_units(model) if cfg.fsdp != "none" else (),
        ),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=run.collator,
        eval_collator=kind.collator(tokenizer, job.model_cfg, training=False),
        compute_metrics=kind.compute_metrics(job.labels),
        compute_loss_func=extras.compute_loss_func,
        callbacks=[
            *callbacks,
            *early_stopping,
            StepTimer(),
            ThreadFit(),
            StateBytes(),
            CheckpointMarker(),
            ProgressLog(),
        ],
        balanced_labels=extras.sampler_labels,
        batch_loss=extras.batch_loss,
        optimizer_in_backward=cfg.optimizer_in_backward,
    )
    trainer.remove_callback(PrinterCallback)  # its raw dicts: ProgressLog says it in words
    return trainer


def plan_steps(
    trainer: FinetuneTrainer, run: Setup, notes: dict[str, str], job: TrainJob
) -> tuple[dict[str, float], BudgetPlanner | None]:
    """Turn a time budget into a step count (probed on the run's own batches) and resolve the
    warm-up from the total steps; returns the ``plan/*`` figures (empty without a budget) and the
    callback that revises the plan as training goes.

    The budget is the run's clock from ``job.clock_started`` (the flow's start: validation,
    tokenization and the probe count), and keeps back what follows training: the
    ``job.evaluation_tokens`` the test evaluation scores, at the probe's validation speed, and
    the model saved and registered.
    """
    cfg = run.cfg
    assert trainer.train_dataset is not None
    per_epoch = steps_per_epoch(cfg, len(trainer.train_dataset), world_size())  # type: ignore[arg-type]
    model = trainer.model
    assert isinstance(model, PreTrainedModel)
    n_params = model.num_parameters()
    plan: dict[str, float] = {}
    planner = None
    total_steps = math.ceil(run.epochs * per_epoch) if trainer.args.max_steps <= 0 else 0
    if cfg.time_budget is not None:
        budget = parse_duration(cfg.time_budget)
        clock = job.clock_started or time.time()
        step_s, eval_s = measure_step_seconds(trainer, cfg.gradient_accumulation_steps)
        set_seed(cfg.seed)  # the probe drew random numbers: training starts as it would have
        validation_tokens = float(np.sum(np.asarray(run.data["validation"]["length"])))
        scoring_s = eval_s * job.evaluation_tokens / max(validation_tokens, 1.0)
        saving_s = SAVE_S + 3 * sum(p.numel() * p.element_size() for p in model.parameters()) / (
            DISK_BYTES_PER_S
        )
        reserve = scoring_s + saving_s
        deadline = clock + budget - reserve
        evals_per_epoch = per_epoch / cfg.eval_steps if cfg.eval_steps else 1.0
        left = deadline - time.time() - eval_s  # the last validation, at the end, kept
        planned, why = plan_budget(left, step_s, eval_s, per_epoch, evals_per_epoch)
        why = (
            f"{budget:.0f} s budget - {time.time() - clock:.0f} s spent - {reserve:.0f} s kept "
            f"for the test scoring and registration: {why}"
        )
        cap = min(MAX_BUDGET_EPOCHS * per_epoch, 3 * planned + 10)  # room for the plan to grow
        trainer.args.max_steps = cap
        planner = BudgetPlanner(deadline, planned, cap, eval_s, per_epoch / evals_per_epoch)
        trainer.add_callback(planner)
        log.info("time budget %s: %s", cfg.time_budget, why)
        notes["plan.time_budget"] = why
        plan = {
            "plan/budget_s": budget,
            "plan/steps": float(planned),
            "plan/step_s": step_s,
            "plan/validation_s": eval_s,
            "plan/reserve_s": reserve,
            "plan/spent_before_training_s": time.time() - clock,
            "clock_started": clock,  # epoch seconds, not a metric
        }
        total_steps = planned
    total_steps = total_steps or trainer.args.max_steps
    warmup, why = auto_warmup(cfg.warmup_fraction, total_steps, n_params)
    # A budget's loop runs to its cap: a warm-up share counts from the planned steps instead.
    trainer.args.warmup_steps = (
        math.ceil(warmup * total_steps) if planner and warmup < 1 else warmup
    )
    if cfg.warmup_fraction == "auto":
        log.info("auto train.warmup_fraction = %.2f: %s", warmup, why)
        notes["sizing.train.warmup_fraction"] = f"{warmup} ({why})"
    return plan, planner


def train(
    job: TrainJob,
    kind: Kind,
    callbacks: Sequence[TrainerCallback] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> TrainResult:
    """Fine-tune every parameter on the train split; save the selected model to ``workdir/model``.

    The validation split is scored every epoch (or ``eval_steps``); with ``select_best`` the
    checkpoint with the best validation score (the kind's selection metric) is the one saved. The
    test split is never loaded. With ``job.checkpoint_dir``, checkpoints go there and training
    resumes from the latest complete one found there (model, optimizer, scheduler, RNG states and
    position in the data order). ``tokenizer`` is the run's tokenizer (loaded from the job's model
    settings when not given, as in a torchrun rank).
    """
    set_seed(job.cfg.seed)  # before any new head is initialised, so runs are reproducible
    data = setup_data(job.tokenized, job.cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(job.model_cfg.name_or_path, job.model_cfg.revision)
    # May give the tokenizer a pad token, which must happen before it is saved with the model.
    collator = kind.collator(tokenizer, job.model_cfg, training=True)
    before_model = current_rss_bytes()  # what the memory plan counts besides the model
    model = kind.setup_model(job.model_cfg, job.labels)
    run = setup(job, kind, model, data, collator, before_model)
    before = snapshot(model)  # after the plan may have cast it to bf16
    data = run.data
    trainer = setup_trainer(job, kind, run, model, tokenizer, callbacks)
    notes = dict(run.notes)
    plan, planner = plan_steps(trainer, run, notes, job)
    checkpoint_dir = Path(job.checkpoint_dir) if job.checkpoint_dir else None
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:
        log.warning("resuming from %s", resume)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - started
    if planner is not None:
        plan |= {
            "plan/actual_s": runtime,
            "plan/actual_steps": float(output.global_step),
            "plan/revised_steps": float(planner.steps),
            "plan/revisions": float(len(planner.revisions)),
            "plan/measured_step_s": planner.step_s,
            "training_ended": time.time(),  # epoch seconds, not a metric
        }
        log.info(
            "time budget: planned %d steps, revised to %d; ran %d steps in %.0f s",
            plan["plan/steps"],
            planner.steps,
            output.global_step,
            runtime,
        )

    model_dir = Path(job.workdir) / "model"
    trainer.save_model(str(model_dir))  # the selected model, with its tokenizer
    selected = trainer.model  # the best checkpoint's weights when select_best loaded them
    assert isinstance(selected, torch.nn.Module)
    params_total, params_updated, tensors_total, tensors_updated = count_updated(selected, before)
    if tensors_updated < tensors_total:
        frozen = [n for n, p in selected.named_parameters() if torch.equal(full(p), before[n])]
        log.warning("%d parameter tensors were not updated: %s", len(frozen), frozen[:10])

    checking = time.perf_counter()
    checked = kind.check(trainer, data["validation"], job.labels, data["train"])
    validation_s = (
        time.perf_counter()
        - checking
        + sum(float(e.get("eval_runtime", 0.0)) for e in trainer.state.log_history)
    )
    if checked.collapse:
        log.warning("COLLAPSE GUARD: %s; this model will not be promoted", checked.collapse)

    # Efficiency: non-pad tokens of the samples actually stepped through, over pure step time.
    cfg, lengths = run.cfg, run.lengths
    resumed_step = int(resume.name.rsplit("-", 1)[1]) if resume else 0
    samples_seen = min(
        (output.global_step - resumed_step) * global_batch(cfg, world_size()),
        math.ceil(run.epochs * len(lengths)),
    )
    tokens = int(samples_seen * lengths.mean())
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer))
    held = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StateBytes))
    tokens_per_s, mfu, peak = throughput(
        selected, model.config, tokens, float(lengths.mean()), timer.seconds, run.precision
    )
    losses, curve = training_history(trainer.state.log_history, kind.selection_metric)
    best = trainer.state.best_global_step
    return TrainResult(
        model_dir=str(model_dir),
        global_step=output.global_step,
        train_samples=len(data["train"]),
        epochs=run.epochs,
        learning_rate=run.learning_rate,
        best_step=int(best) if best else None,
        stopped_early=output.global_step < trainer.state.max_steps,
        notes=notes,
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
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        matmul_peak_flops=peak,
        peak_rss_bytes=peak_rss_bytes(),
        preflight_estimate_bytes=run.estimate.total,
        resumed_from_step=resumed_step or None,
        weights_digest=weights_digest(selected),
        num_processes=trainer.args.world_size,
        plan=plan,
        validation_s=validation_s,
        state_bytes=held.bytes,
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


def main(job_path: str) -> None:
    """One torchrun rank: run the recipe; every rank writes its result (its weights' digest)."""
    from tasks.distributed import agree_on_weights, exit_with_launcher
    from tasks.kinds import get_kind

    exit_with_launcher()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(message)s")
    job = TrainJob.model_validate_json(Path(job_path).read_text())
    # The tracking store comes from MLFLOW_TRACKING_URI, set by the launcher.
    # The callback logs on the main process only (Trainer's is_world_process_zero).
    callbacks = [MlflowMetricsCallback(job.run_id, job.after_step)] if job.run_id else []
    result = train(job, get_kind(job.task), callbacks)
    agree_on_weights(result.weights_digest)
    job.result_path(int(os.environ.get("RANK", "0"))).write_text(result.model_dump_json())


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
