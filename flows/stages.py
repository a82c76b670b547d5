"""The pipeline's stages as Prefect tasks: each wraps a plain function from ``tasks/``.

A wrapper adds only what belongs to orchestration: retries and content-addressed caching (their
policies are in ``flows/policies.py``), and the MLflow logging and Prefect artifacts of the
stage's result. ``prepare_data`` chains the stages
that every flow starts with (validate -> split -> tokenize).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.policies import (
    cached,
    folder_key,
    retry_transient,
    timed,
    tokenization_cache,
    validation_cache,
)
from tasks import caching, tracking
from tasks import sources as sources_module
from tasks.caching import rehome_json
from tasks.checkpoints import latest_checkpoint
from tasks.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    RegistryConfig,
    RunConfig,
    TrainConfig,
)
from tasks.kinds import Kind
from tasks.register import CardFacts, register_model
from tasks.resolve import (
    check_shift,
    contract_settings,
    described,
    size_to_data,
    token_lengths,
    validation_length,
)
from tasks.results import (
    Decision,
    EvalResult,
    HarnessResult,
    Prepared,
    RegisteredModel,
    Splits,
    TokenizedData,
    TrainJob,
    TrainResult,
    ValidatedData,
)
from tasks.sources import TokenizerSource
from tasks.tokenize import tokenize
from tasks.validate import DataValidationError, render_markdown, validate_data

log = logging.getLogger(__name__)


@task(name="validate_data", cache_key_fn=folder_key, persist_result=True)
@timed
def validate_data_stage(
    cfg: DataConfig,
    kind: Kind,
    tokenizer: TokenizerSource,
    max_length: int,
    folder: Path,
    run_id: str,
) -> ValidatedData:
    """Run the data contract on every raw table; fail the flow with a readable report.

    Cached by content: ``folder`` comes from :func:`validation_cache`, so the same data, settings,
    tokenizer and code give a Cached state and the stored result, without reading the data again.
    """
    with caching.building(folder) as staging:
        try:
            data = validate_data(cfg, staging, kind, tokenizer.get(), max_length)
        except DataValidationError as err:
            # The reports stay in the cache folder the message points to, until the next attempt.
            report = staging / "validation.json"
            if report.exists():
                report.write_text(rehome_json(report.read_text("utf-8"), staging, folder), "utf-8")
            caching.keep_failed(staging, folder)
            failures = json.loads(rehome_json(json.dumps(err.failures), staging, folder))
            for name in ("validation.json", "validation.html"):
                if (folder / name).exists():
                    tracking.log_artifact(run_id, folder / name, "validation")
            create_markdown_artifact(
                key="data-validation",
                markdown="# Data validation failed\n\n" + render_markdown(failures) + "\n",
                description="Failed expectations, with counts and example rows",
            )
            report_path = folder / err.report_path.name if err.report_path else None
            raise DataValidationError(failures, report_path) from None
    return caching.rehome(data, staging, folder)


def record_validation(data: ValidatedData, run_id: str) -> None:
    """Attach the validation outcome to the run (also when the stage's result came from cache)."""
    for path in (data.report_path, data.html_report_path, data.quarantine_path):
        if path:
            tracking.log_artifact(run_id, path, "validation")
    tracking.set_tags(run_id, {"data.fingerprint": data.fingerprint, "data.labels": data.labels})
    tracking.log_metrics_once(run_id, data.metrics())
    if data.dropped:
        create_markdown_artifact(
            key="data-quarantine",
            markdown="# Rows quarantined\n\n| rule | rows |\n|---|---|\n"
            + "\n".join(f"| {rule} | {n} |" for rule, n in data.dropped.items())
            + "\n",
            description="Rows removed by on_invalid: drop",
        )


@task(name="split_data", cache_policy=NONE)
@timed
def split_data_stage(
    data: ValidatedData,
    cfg: DataConfig,
    max_train_samples: int | None,
    seed: int,
    workdir: Path,
    run_id: str,
) -> Splits:
    """Carve the seeded, stratified validation and test splits (and the train subset)."""
    from tasks.split import split_data

    splits = split_data(data, cfg, workdir, max_train_samples, seed)
    tracking.log_metrics_once(run_id, {f"data/split_{k}": v for k, v in splits.rows.items()})
    tracking.log_datasets(
        run_id,
        {
            "train": splits.train_path,
            "validation": splits.validation_path,
            "test": splits.test_path,
        },
        data.fingerprint,
    )
    tracking.log_json(run_id, splits.label_counts, "data/label_counts.json")
    return splits


@task(name="tokenize", cache_key_fn=folder_key, persist_result=True)
@timed
def tokenize_stage(
    splits: Splits,
    labels: list[str],
    cfg: ModelConfig,
    kind: Kind,
    tokenizer: TokenizerSource,
    folder: Path,
    run_id: str,
) -> TokenizedData:
    """Tokenize all splits (unpadded) into ``folder`` (see tokenization_cache)."""
    with caching.building(folder) as staging:
        tokenized = tokenize(splits, labels, cfg, staging, kind, tokenizer.get())
    return caching.rehome(tokenized, staging, folder)


def prepare_data(
    cfg: RunConfig, kind: Kind, workdir: Path, run_id: str, limit: int | None = None
) -> tuple[Prepared, TokenizerSource]:
    """The prologue every flow starts with: the model materialised (a GGUF file becomes a cached
    safetensors checkpoint once, a registered version a folder of its weights and tokenizer), its
    tokenizer, then validate -> size -> split -> tokenize, each cached by content, each logged to
    ``run_id``. Returns the prepared data with the run's settings resolved against it
    (``Prepared.cfg``: what every later stage reads) and the tokenizer.

    ``limit`` is the model's position limit: the bound of an ``auto`` max length. The tokenizer
    is loaded by the first stage that runs rather than coming from the cache.
    """
    model = sources_module.materialize_model(cfg.model, caching.cache_root(cfg))
    cfg = cfg.model_copy(update={"model": model, "data": contract_settings(cfg)})
    tokenizer = TokenizerSource.of(cfg.model)
    # When the first stage (the data contract) starts: the command's cold start ends here.
    tracking.set_tags(run_id, {tracking.FIRST_STAGE_TAG: f"{time.time():.3f}"})
    tokenizer_id = caching.tokenizer_identity(tokenizer)
    checked_length = validation_length(cfg.model, limit)
    folder = validation_cache(cfg, tokenizer_id, checked_length)
    data = cached(validate_data_stage, folder)(
        cfg.data, kind, tokenizer, checked_length, folder, run_id
    )
    lengths = token_lengths(data)
    # With `auto`, the length validation measured against is the bound sizing stays within.
    sized = size_to_data(cfg, data, lengths, checked_length)
    for setting, value in described(sized).items():
        get_run_logger().info("auto %s = %s", setting, value)
    tracking.set_tags(run_id, {f"sizing.{k}": v for k, v in described(sized).items()})
    data, cfg = sized.data, cfg.model_copy(update={"model": sized.model})
    record_validation(data, run_id)
    if cfg.data.test is not None and cfg.data.validation is None:
        check_shift(data, lengths, cfg.train.seed, run_id)
    splits = split_data_stage(
        data, cfg.data, cfg.train.max_train_samples, cfg.train.seed, workdir, run_id
    )
    folder = tokenization_cache(splits, data.labels, cfg, kind, tokenizer_id)
    tokenized = cached(tokenize_stage, folder)(
        splits, data.labels, cfg.model, kind, tokenizer, folder, run_id
    )
    tracking.log_metrics_once(run_id, tokenized.metrics())
    return Prepared(cfg=cfg, data=data, splits=splits, tokenized=tokenized), tokenizer


@task(name="train", cache_policy=NONE)
@timed
def train_stage(
    job: TrainJob,
    kind: Kind,
    tokenizer: TokenizerSource,
    run_id: str,
) -> TrainResult:
    """Full-parameter fine-tuning; loss and learning rate stream to MLflow per logging step.

    With ``train.checkpoint_steps`` it checkpoints into ``job.checkpoint_dir`` and resumes from
    the latest complete checkpoint there: after a crash, and on each retry of this task.
    """
    checkpoint_dir = Path(job.checkpoint_dir) if job.checkpoint_dir else None
    resuming = latest_checkpoint(checkpoint_dir) is not None
    job = job.model_copy(
        update={"after_step": tracking.last_logged_step(run_id) if resuming else -1}
    )
    # CPU, memory (and GPU, when there is one) of this machine, every 5 s, in the run's System
    # metrics: what the training cost.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from tasks import distributed
    from tasks.callbacks import MlflowMetricsCallback
    from tasks.train import train

    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=resuming)
    monitor.start()
    try:
        if job.cfg.world_size > 1:  # the same recipe in N data-parallel processes (torchrun)
            result = distributed.launch(job)
        else:
            callbacks = [MlflowMetricsCallback(run_id, job.after_step)]
            result = train(job, kind, callbacks, tokenizer.get())
    finally:
        monitor.finish()
    if result.resumed_from_step:
        tracking.set_tags(run_id, {"fulltune.resumed_from_step": result.resumed_from_step})
    # Summaries at step 0, as single values (the UI shows them as numbers and bar charts; at the
    # last step they drew as one-dot line charts).
    tracking.log_metrics(run_id, result.metrics())
    tracking.log_json(run_id, result.validation_curve, "training/validation_curve.json")
    tracking.log_training_curves(run_id, Path(job.workdir) / "training_curves.png")
    tracking.set_tags(run_id, result.notes | {"quality.collapse": result.collapse or "none"})
    if result.collapse:
        get_run_logger().warning("COLLAPSE GUARD: %s", result.collapse)
        create_markdown_artifact(
            key="collapse-guard",
            markdown=f"# Collapse guard fired\n\n{result.collapse}\n\n"
            "The model is registered for inspection but will never become champion.\n",
            description="The trained model is no better than guessing on validation",
        )
    get_run_logger().info(
        "trained %d steps on %d samples: %d/%d parameter tensors updated",
        result.global_step,
        result.train_samples,
        result.tensors_updated,
        result.tensors_total,
    )
    return result


@task(name="evaluate", cache_policy=NONE)
@timed
def evaluate_stage(
    model_dir: str, prepared: Prepared, kind: Kind, workdir: Path, run_id: str
) -> EvalResult:
    """Score the model and the task's two yardsticks on the test split.

    Classification: the majority class and TF-IDF + logistic regression. Causal LM: the
    untrained model and a unigram model, plus generations from the configured prompts.
    """
    from tasks.threads import THREADS

    THREADS.start(prepared.cfg.train.threads)
    result = kind.evaluate(model_dir, prepared, workdir)
    tracking.log_metrics(
        run_id,
        {f"test/{k}": tracking.shown(v) for k, v in result.metrics.items()}
        | {
            f"{tracking.YARDSTICKS}/baseline/{k}": tracking.shown(v)
            for k, v in result.baseline.items()
        }
        | {
            f"{tracking.YARDSTICKS}/classical/{k}": tracking.shown(v)
            for k, v in result.classical.items()
        },
    )
    tracking.set_tags(run_id, result.version_tags())
    for path in result.artifacts():
        tracking.log_artifact(run_id, path, "evaluation")
    for artifact_file, rows in result.tables().items():
        tracking.log_table(run_id, rows, artifact_file)
    tracking.log_json(run_id, result.model_dump(), "evaluation/test_metrics.json")
    create_markdown_artifact(
        key="evaluation",
        markdown=f"# Test evaluation\n\n{result.table()}\n\n{result.details_markdown()}\n",
        description="The fine-tuned model against the task's yardsticks on the test split",
    )
    return result


@task(name="lm_eval", cache_policy=NONE)
@timed
def lm_eval_stage(
    model_dir: str, kind: Kind, model_cfg: ModelConfig, cfg: EvalConfig, run_id: str
) -> HarnessResult:
    """lm-evaluation-harness tasks on the fine-tuned and the base model (``eval.lm_eval``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.harness import run_harness

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = run_harness(
        AutoModelForCausalLM.from_pretrained(model_dir),
        kind.setup_model(model_cfg, []),
        tokenizer,
        cfg.lm_eval,
        cfg.batch_size,
    )
    tracking.log_metrics(run_id, result.metrics())
    tracking.set_tags(
        run_id,
        {
            "lm_eval.tasks": ",".join(cfg.lm_eval.tasks),
            "lm_eval.chat_template": str(cfg.lm_eval.apply_chat_template).lower(),
        },
    )
    tracking.log_json(run_id, result.model_dump(), "evaluation/lm_eval.json")
    create_markdown_artifact(
        key="lm-eval",
        markdown=f"# lm-evaluation-harness\n\n{result.markdown()}\n",
        description="General capability of the fine-tuned and the base model",
    )
    return result


@task(
    name="register_model",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
@timed
def register_model_stage(
    model_dir: str,
    cfg: RegistryConfig,
    run_id: str,
    kind: Kind,
    example: Any,
    tags: dict[str, str],
    inference_config: dict[str, Any],
    card: CardFacts | None = None,
) -> RegisteredModel:
    """Log the model with the transformers flavor (the kind's pipeline task), register, alias."""
    registered = register_model(model_dir, cfg, run_id, kind, example, tags, inference_config, card)
    tracking.set_tags(
        run_id, {"registry.model": registered.name, "registry.version": registered.version}
    )
    import mlflow

    uri = mlflow.get_tracking_uri()
    tracking.link_in_prefect(
        "mlflow-model-version",
        tracking.version_page(uri, registered.name, registered.version),
        f"Model {registered.name} version {registered.version} (its model card)",
        uri,
    )
    return registered


@task(name="promote", cache_policy=NONE)
@timed
def promote_stage(
    registered: RegisteredModel,
    evaluation: EvalResult,
    prepared: Prepared,
    kind: Kind,
    run_id: str,
    collapse: str | None,
) -> Decision:
    """Move the champion alias to the new version only if the evidence says it is better."""
    from tasks.promote import promote

    decision = promote(registered, evaluation, kind, prepared, collapse)
    cfg = prepared.cfg.promote
    tracking.set_tags(run_id, decision.tags())
    tracking.log_metrics(run_id, decision.metrics())
    create_markdown_artifact(
        key="promotion",
        markdown=f"# Promotion of {registered.name} v{registered.version}\n\n"
        f"**{'promoted to @' + cfg.alias if decision.promoted else 'kept as challenger'}**\n\n"
        f"{decision.reason}\n",
        description="The champion/challenger gate's decision",
    )
    return decision


def train_job(
    prepared: Prepared,
    train_cfg: TrainConfig,
    workdir: Path,
    checkpoint_dir: Path | None = None,
    run_id: str | None = None,
    clock_started: float | None = None,
    evaluation_tokens: float = 0.0,
) -> TrainJob:
    """The train stage's input for this run (``train_cfg``: the run's, or a sweep trial's;
    ``clock_started``: when the run's time budget began)."""
    cfg = prepared.cfg
    return TrainJob(
        tokenized=prepared.tokenized,
        labels=prepared.data.labels,
        model_cfg=cfg.model,
        cfg=train_cfg,
        eval_batch_size=cfg.eval.batch_size,
        task=cfg.task,
        workdir=str(workdir),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        run_id=run_id,
        clock_started=clock_started,
        evaluation_tokens=evaluation_tokens,
    )
