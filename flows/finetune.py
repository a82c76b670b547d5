"""The ``finetune`` flow: raw text in, a fully fine-tuned, registered MLflow model out.

validate_data -> split_data -> tokenize -> train -> evaluate -> register_model -> promote

Each stage is a plain function in ``tasks/`` wrapped here as a Prefect task; the wrapper adds what
belongs to orchestration (retries, the MLflow logging of the stage's result). Stages hand each other
small typed results (paths, ids, metrics), never models in memory. What depends on the task type
(text classification, causal LM) is asked of its kind (``tasks/kinds``), named by ``config.task``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import mlflow
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from tasks import caching, distributed, tracking
from tasks import sources as sources_module
from tasks import tokenize as tokenize_module
from tasks import validate as validate_module
from tasks.config import (
    DataConfig,
    ModelConfig,
    PromoteConfig,
    RunConfig,
    TrainConfig,
)
from tasks.evaluate import EvalResult
from tasks.kinds import get_kind
from tasks.kinds.causal_lm import LMEvalResult
from tasks.promote import Decision
from tasks.register import RegisteredModel, lineage_tags, register_model
from tasks.sources import fingerprint, load_tokenizer
from tasks.split import Splits, split_data
from tasks.tokenize import TokenizedData, tokenize
from tasks.train import TrainResult, latest_checkpoint, lock_folder, train
from tasks.validate import (
    DataValidationError,
    ValidatedData,
    render_markdown,
    suite_path,
    validate_data,
)

log = logging.getLogger(__name__)
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


class RunSummary(BaseModel):
    """What a finished run produced."""

    mlflow_run_id: str
    flow_run_id: str | None
    model: RegisteredModel
    metrics: dict[str, float]
    baseline: dict[str, float]
    classical: dict[str, float]
    table: str  # the test metrics next to the task's yardsticks, as Markdown
    decision: Decision | None
    data_fingerprint: str
    workdir: str


# Stages write into the run's own folder and pass paths on, so Prefect's input-hash cache has
# nothing to add within one run; caching across runs needs content keys, not argument hashes.
def validation_cache(
    cfg: DataConfig, model_cfg: ModelConfig, task_type: str, cache_root: Path
) -> Path:
    """The content-addressed folder for validation results of these inputs.

    The key covers the bytes of every source, the data settings, the tokenizer (token lengths
    are checked), ``max_length``, the suite file and the code of validation and reading.
    """
    tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.revision)
    key = caching.digest(
        task_type,
        cfg.model_dump(mode="json"),
        [caching.source_identity(name) for name in (cfg.train, cfg.validation, cfg.test)],
        caching.tokenizer_identity(tokenizer),
        model_cfg.max_length,
        caching.code_version(validate_module, sources_module, extra=[suite_path(task_type)]),
    )
    return caching.entry(cache_root, "validate", key)


def tokenization_cache(
    splits: Splits, labels: list[str], cfg: ModelConfig, task: str, cache_root: Path
) -> Path:
    """The content-addressed folder for tokenized splits (contents, tokenizer, settings, code)."""
    tokenizer = load_tokenizer(cfg.name_or_path, cfg.revision)
    encode_module = inspect.getmodule(get_kind(task).encode)
    assert encode_module is not None
    key = caching.digest(
        task,
        [
            fingerprint(pd.read_parquet(p))
            for p in (splits.train_path, splits.validation_path, splits.test_path)
        ],
        labels,
        cfg.model_dump(mode="json"),
        caching.tokenizer_identity(tokenizer),
        caching.code_version(tokenize_module, encode_module),
    )
    return caching.entry(cache_root, "tokenize", key)


def _folder_key(context: Any, parameters: dict[str, Any]) -> str:
    """The Prefect cache key of a cached stage: its content-addressed output folder."""
    folder = parameters["folder"]
    return f"{folder.parent.name}-{folder.name}"


def cached(stage: Any, folder: Path) -> Any:
    """The stage, told to recompute when its output folder is missing or half-written."""
    return stage.with_options(refresh_cache=not caching.is_complete(folder))


@task(name="validate_data", cache_key_fn=_folder_key, persist_result=True)
@timed
def validate_data_stage(
    cfg: DataConfig, model_cfg: ModelConfig, task_type: str, folder: Path, run_id: str
) -> ValidatedData:
    """Run the data contract on every raw table; fail the flow with a readable report.

    Cached by content: ``folder`` comes from :func:`validation_cache`, so the same data, settings,
    tokenizer and code give a Cached state and the stored result, without reading the data again.
    """
    shutil.rmtree(folder, ignore_errors=True)  # whatever an interrupted run left there
    tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.revision)
    try:
        data = validate_data(cfg, folder, task_type, tokenizer, model_cfg.max_length)
    except DataValidationError as err:
        for name in ("validation.json", "validation.html"):
            if (folder / name).exists():
                tracking.log_artifact(run_id, folder / name, "validation")
        create_markdown_artifact(
            key="data-validation",
            markdown="# Data validation failed\n\n" + render_markdown(err.failures) + "\n",
            description="Failed expectations, with counts and example rows",
        )
        raise
    caching.mark_done(folder)
    return data


def record_validation(data: ValidatedData, run_id: str) -> None:
    """Attach the validation outcome to the run (also when the stage's result came from cache)."""
    for path in (data.report_path, data.html_report_path, data.quarantine_path):
        if path:
            tracking.log_artifact(run_id, path, "validation")
    tracking.set_tags(run_id, {"data.fingerprint": data.fingerprint, "data.labels": data.labels})
    tracking.log_metrics(
        run_id,
        {f"data/rows_{k}": v for k, v in data.rows.items()}
        | {f"data/dropped/{rule}": n for rule, n in data.dropped.items()}
        | {f"data/truncated_fraction_{k}": v for k, v in data.truncated_fraction.items()}
        | {
            "data/encoding_fallback_lines": data.encoding_fallback_lines,
            "data/validation_s": data.seconds,
        },
    )
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
    splits = split_data(data, cfg, workdir, max_train_samples, seed)
    tracking.log_metrics(run_id, {f"data/split_{k}": v for k, v in splits.rows.items()})
    tracking.log_json(run_id, splits.label_counts, "data/label_counts.json")
    return splits


@task(name="tokenize", cache_key_fn=_folder_key, persist_result=True)
@timed
def tokenize_stage(
    splits: Splits, labels: list[str], cfg: ModelConfig, task: str, folder: Path, run_id: str
) -> TokenizedData:
    """Tokenize all splits (unpadded) into ``folder`` (see tokenization_cache)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tokenized = tokenize(splits, labels, cfg, folder, get_kind(task))
    caching.mark_done(folder)
    return tokenized


def record_tokenization(tokenized: TokenizedData, run_id: str) -> None:
    tracking.log_metrics(
        run_id,
        {f"data/mean_tokens_{k}": v for k, v in tokenized.mean_tokens.items()}
        | {f"data/tokens_{k}": v for k, v in tokenized.tokens.items()}
        | {f"data/examples_{k}": v for k, v in tokenized.rows.items()}
        | {f"data/truncated_fraction_{k}": v for k, v in tokenized.truncated_fraction.items()},
    )


@task(name="train", cache_policy=NONE)
@timed
def train_stage(
    tokenized: TokenizedData,
    labels: list[str],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    task: str,
    workdir: Path,
    checkpoint_dir: Path | None,
    run_id: str,
) -> TrainResult:
    """Full-parameter fine-tuning; loss and learning rate stream to MLflow per logging step.

    With ``train.checkpoint_steps`` it checkpoints into ``checkpoint_dir`` and resumes from the
    latest complete checkpoint there: after a crash, and on each retry of this task.
    """
    resuming = latest_checkpoint(checkpoint_dir) is not None
    after_step = tracking.last_logged_step(run_id) if resuming else -1
    if cfg.num_processes > 1:  # the same recipe in N data-parallel processes (torchrun)
        job = distributed.Job(
            tokenized=tokenized,
            labels=labels,
            model_cfg=model_cfg,
            cfg=cfg,
            task=task,
            workdir=str(workdir),
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
            run_id=run_id,
            after_step=after_step,
            tracking_uri=mlflow.get_tracking_uri(),
        )
        result = distributed.launch(job, cfg.num_processes)
    else:
        logger = tracking.MlflowMetricsCallback(run_id, after_step)
        result = train(
            tokenized, labels, model_cfg, cfg, workdir, [logger], checkpoint_dir, get_kind(task)
        )
    if result.resumed_from_step:
        tracking.set_tags(run_id, {"fulltune.resumed_from_step": result.resumed_from_step})
    tracking.log_metrics(
        run_id,
        {
            "train/runtime_s": result.runtime_s,
            "train/samples_per_s": result.samples_per_s,
            "train/mean_loss": result.train_loss,
            "train/epochs": result.epochs,
            "train/peak_learning_rate": result.learning_rate,
            "train/best_step": float(result.best_step or result.global_step),
            "train/stopped_early": float(result.stopped_early),
            "train/params_total": result.params_total,
            "train/params_updated_fraction": result.params_updated / result.params_total,
            "train/tensors_updated_fraction": result.tensors_updated / result.tensors_total,
            "train/tokens_seen": result.non_pad_tokens,
            "train/num_processes": result.num_processes,
            "efficiency/step_time_s": result.step_time_s,
            "efficiency/tokens_per_s": result.tokens_per_s,
            "efficiency/samples_per_s": result.samples_per_s,
            "efficiency/mfu": result.mfu,
            "efficiency/matmul_peak_flops": result.matmul_peak_flops,
            "efficiency/peak_rss_bytes": result.peak_rss_bytes,
            "efficiency/preflight_estimate_bytes": result.preflight_estimate_bytes,
            "efficiency/non_pad_tokens": result.non_pad_tokens,
        }
        | {f"val_selected/{k}": v for k, v in result.validation.items()}
        | {f"val_selected/{k}": v for k, v in result.reference.items()},
        step=result.global_step,
    )
    tracking.log_json(run_id, result.validation_curve, "training/validation_curve.json")
    tracking.set_tags(
        run_id,
        result.notes | {"quality.collapse": result.collapse or "none"},
    )
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
    model_dir: str,
    tokenized: TokenizedData,
    labels: list[str],
    splits: Splits,
    cfg: RunConfig,
    workdir: Path,
    run_id: str,
) -> EvalResult | LMEvalResult:
    """Score the model and the task's two yardsticks on the test split.

    Classification: the majority class and TF-IDF + logistic regression. Causal LM: the
    untrained model and a unigram model, plus generations from the configured prompts.
    """
    result = get_kind(cfg.task).evaluate(
        model_dir, tokenized, labels, splits, cfg.model, cfg.eval, cfg.train, workdir
    )
    tracking.log_metrics(
        run_id,
        {f"test/{k}": v for k, v in result.metrics.items()}
        | {f"baseline/{k}": v for k, v in result.baseline.items()}
        | {f"classical/{k}": v for k, v in result.classical.items()},
    )
    tracking.set_tags(run_id, result.version_tags())
    for path in result.artifacts():
        tracking.log_artifact(run_id, path, "evaluation")
    for artifact_file, rows in result.tables().items():
        tracking.log_table(run_id, rows, artifact_file)
    tracking.log_json(run_id, result.model_dump(), "evaluation/test_metrics.json")
    create_markdown_artifact(
        key="evaluation",
        markdown=f"# Test evaluation\n\n{metrics_table(result)}\n\n{result.details_markdown()}\n",
        description="The fine-tuned model against the task's yardsticks on the test split",
    )
    return result


@task(name="register_model", cache_policy=NONE, retries=2, retry_delay_seconds=5)
@timed
def register_model_stage(
    model_dir: str,
    cfg: RunConfig,
    run_id: str,
    example: list[str],
    tags: dict[str, str],
) -> RegisteredModel:
    """Log the model with the transformers flavor (the kind's pipeline task), register, alias."""
    kind = get_kind(cfg.task)
    registered = register_model(
        model_dir,
        cfg.registry,
        run_id,
        example,
        tags,
        kind.pipeline_task,
        kind.signature,
        kind.inference_config(cfg.eval),
    )
    tracking.set_tags(
        run_id, {"registry.model": registered.name, "registry.version": registered.version}
    )
    return registered


@task(name="promote", cache_policy=NONE)
@timed
def promote_stage(
    registered: RegisteredModel,
    evaluation: EvalResult | LMEvalResult,
    labels: list[str],
    splits: Splits,
    tokenized: TokenizedData,
    cfg: PromoteConfig,
    task: str,
    run_id: str,
    collapse: str | None,
) -> Decision:
    """Move the champion alias to the new version only if the evidence says it is better."""
    decision = get_kind(task).promote(
        registered, evaluation, labels, splits, tokenized, cfg, collapse
    )
    tracking.set_tags(run_id, decision.tags())
    metrics = {"promotion/promoted": float(decision.promoted)}
    if decision.delta is not None:
        metrics |= {
            "promotion/delta": decision.delta,
            "promotion/ci_low": decision.ci_low or 0.0,
            "promotion/ci_high": decision.ci_high or 0.0,
        }
    tracking.log_metrics(run_id, metrics)
    create_markdown_artifact(
        key="promotion",
        markdown=f"# Promotion of {registered.name} v{registered.version}\n\n"
        f"**{'promoted to @' + cfg.alias if decision.promoted else 'kept as challenger'}**\n\n"
        f"{decision.reason}\n",
        description="The champion/challenger gate's decision",
    )
    return decision


def metrics_table(evaluation: EvalResult | LMEvalResult) -> str:
    """A Markdown table of the headline test metrics next to the task's two yardsticks."""
    first, second = evaluation.baseline_names
    rows = [f"| metric | fine-tuned | {first} | {second} |", "|---|---|---|---|"]
    for key in evaluation.headline_keys:
        values = (evaluation.metrics[key], evaluation.baseline[key], evaluation.classical[key])
        rows.append(f"| {key} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(rows)


def claim_run(
    cfg: RunConfig, tags: dict[str, str], run_name: str
) -> tuple[str, Path | None, IO[str] | None]:
    """The MLflow run this flow run writes to, its checkpoint folder and the folder's lock.

    With ``train.checkpoint_steps``, a run of the same config on the same data that died
    mid-training (its folder has a complete checkpoint and no live process holds its lock) is
    re-attached and resumed. Otherwise a new run gets a folder of its own, so two concurrent runs of
    one config never share checkpoints.
    """
    resume_key = caching.digest(
        cfg.digest(), [caching.source_identity(n) for n in (cfg.data.train, cfg.data.test)]
    )
    root = cfg.home_dir() / "checkpoints" / resume_key
    if cfg.train.checkpoint_steps:
        for candidate in tracking.find_unfinished_runs(cfg, resume_key):
            folder = root / candidate
            if latest_checkpoint(folder) is not None and (lock := lock_folder(folder)):
                tracking.reattach_run(candidate, tags)
                get_run_logger().info(
                    "Resuming MLflow run %s from %s", candidate, latest_checkpoint(folder)
                )
                return candidate, folder, lock
    run_id = tracking.start_run(
        cfg, tags=tags | {"fulltune.resume_key": resume_key}, run_name=run_name
    )
    if not cfg.train.checkpoint_steps:
        return run_id, None, None
    return run_id, root / run_id, lock_folder(root / run_id)


# No log_prints: dill (under datasets' fingerprinting) reads dis.dis output from a captured
# stdout, and Prefect's print patch would turn that bytecode into log lines instead.
@flow(name="finetune")
def finetune(
    config: RunConfig = RunConfig(),
    extra_tags: dict[str, str] | None = None,
) -> RunSummary:
    """Validate, split, tokenize, fully fine-tune, evaluate, register and gate one model."""
    cfg = config
    started = time.perf_counter()
    flow_run_id = flow_run.get_id()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    workdir = cfg.home_dir() / "work" / f"{stamp}-{(flow_run_id or 'local')[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    tags = {
        "prefect.flow_run_id": str(flow_run_id),
        "prefect.flow_run_name": str(flow_run.get_name()),
        "fulltune.task": cfg.task,
        "fulltune.config_hash": cfg.digest(),
    } | (extra_tags or {})
    run_id, checkpoint_dir, lock = claim_run(cfg, tags, str(flow_run.get_name()))
    get_run_logger().info("MLflow run %s (tracking URI %s)", run_id, cfg.tracking_uri())
    try:
        cache_root = cfg.home_dir() / "cache"
        folder = validation_cache(cfg.data, cfg.model, cfg.task, cache_root)
        data = cached(validate_data_stage, folder)(cfg.data, cfg.model, cfg.task, folder, run_id)
        record_validation(data, run_id)
        splits = split_data_stage(
            data, cfg.data, cfg.train.max_train_samples, cfg.train.seed, workdir, run_id
        )
        folder = tokenization_cache(splits, data.labels, cfg.model, cfg.task, cache_root)
        tokenized = cached(tokenize_stage, folder)(
            splits, data.labels, cfg.model, cfg.task, folder, run_id
        )
        record_tokenization(tokenized, run_id)
        trained = train_stage.with_options(
            retries=cfg.train.retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=10),
            timeout_seconds=cfg.train.timeout_hours * 3600 if cfg.train.timeout_hours else None,
        )(tokenized, data.labels, cfg.model, cfg.train, cfg.task, workdir, checkpoint_dir, run_id)
        evaluation = evaluate_stage(
            trained.model_dir, tokenized, data.labels, splits, cfg, workdir, run_id
        )
        example = pd.read_parquet(splits.test_path)["text"].head(3).tolist()
        registered = register_model_stage(
            trained.model_dir,
            cfg,
            run_id,
            example,
            lineage_tags(run_id, str(flow_run_id), data, cfg.digest())
            | evaluation.version_tags()
            | {"quality.collapse": trained.collapse or "none"},
        )
        decision = None
        if cfg.promote.enabled:
            decision = promote_stage(
                registered,
                evaluation,
                data.labels,
                splits,
                tokenized,
                cfg.promote,
                cfg.task,
                run_id,
                trained.collapse,
            )
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    total = time.perf_counter() - started
    tracking.log_metrics(
        run_id,
        {
            "time/flow_s": total,
            "efficiency/overhead_s": total - trained.step_time_s,
            "efficiency/overhead_fraction": (total - trained.step_time_s) / total,
        },
    )
    tracking.end_run(run_id, "FINISHED")
    if checkpoint_dir is not None:  # the model is saved and registered: the checkpoints are done
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if lock is not None:
        lock.close()

    table = metrics_table(evaluation)
    create_markdown_artifact(
        key="finetune-summary",
        markdown=(
            f"# fulltune run\n\n- MLflow run: `{run_id}`\n"
            f"- Registered model: `{registered.name}` version {registered.version} "
            f"(alias `{registered.alias}`)\n- Data fingerprint: `{data.fingerprint}`\n"
            f"- Test rows: {evaluation.test_rows}\n"
            f"- Promotion: {decision.reason if decision else 'gate disabled'}\n\n{table}\n\n"
            f"{evaluation.details_markdown()}\n"
        ),
        description="Test metrics of the fine-tuned model against the task's yardsticks",
    )
    return RunSummary(
        mlflow_run_id=run_id,
        flow_run_id=str(flow_run_id) if flow_run_id else None,
        model=registered,
        metrics=evaluation.metrics,
        baseline=evaluation.baseline,
        classical=evaluation.classical,
        table=table,
        decision=decision,
        data_fingerprint=data.fingerprint,
        workdir=str(workdir),
    )
