"""The ``sweep`` flow: Optuna searches the training recipe on validation, the best is registered.

validate_data -> split_data -> tokenize (once) -> trial x N (nested MLflow runs, pruned on the
task's validation metric: macro F1 for classification, loss for a causal LM) -> finetune with the
best settings (the normal test evaluation, registry and promotion gate).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from pydantic import BaseModel
from transformers import TrainerCallback

from flows.finetune import RunSummary, finetune
from flows.stages import Prepared, prepare_data, train_job
from tasks import tracking
from tasks.config import RunConfig, SearchDimension, TrainConfig
from tasks.kinds import Kind, get_kind
from tasks.preflight import check_model, max_positions
from tasks.sources import TokenizerSource
from tasks.train import MlflowMetricsCallback, train

log = logging.getLogger(__name__)


class TrialResult(BaseModel):
    number: int
    params: dict[str, Any]
    value: float | None
    pruned: bool
    mlflow_run_id: str


class SweepSummary(BaseModel):
    parent_run_id: str
    trials: list[TrialResult]
    metric: str  # the validation metric searched on
    best_params: dict[str, Any]
    best_value: float
    final: RunSummary


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """A trial's values from the configured search space (``sweep.space``)."""
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.choices is not None:
            params[name] = trial.suggest_categorical(name, dim.choices)
        elif dim.integer:
            assert dim.low is not None and dim.high is not None
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        else:
            assert dim.low is not None and dim.high is not None
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params


def open_study(cfg: RunConfig, data_fingerprint: str, maximize: bool) -> optuna.Study:
    """The sweep's study in its RDB storage, created or continued.

    Its name is the config (search space included) and the data, so running the same sweep again
    after an interruption continues it; another config or other data starts a new study.
    """
    name = f"fulltune-{cfg.task}-{cfg.digest()}-{data_fingerprint}"
    storage = cfg.optuna_storage()
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize" if maximize else "minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )


def finished_trials(study: optuna.Study) -> list[TrialResult]:
    """The trials an earlier, interrupted sweep of this study completed or pruned."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [
        TrialResult(
            number=t.number,
            params=t.params,
            value=t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
            pruned=t.state == optuna.trial.TrialState.PRUNED,
            mlflow_run_id=str(t.user_attrs.get("mlflow_run_id", "")),
        )
        for t in study.get_trials(deepcopy=False, states=states)
    ]


class PruneOnValidation(TrainerCallback):
    """Report each validation score to Optuna; stop the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial = trial
        self.key = f"eval_{metric}"
        self.pruned = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.key not in metrics:
            return
        self.trial.report(metrics[self.key], step=state.global_step)
        if self.trial.should_prune():
            self.pruned = True
            control.should_training_stop = True


def with_params(cfg: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """``cfg`` with a trial's values, validated like any config (a bad value names its field)."""
    return TrainConfig.model_validate(cfg.model_dump() | params)


@task(name="trial", cache_policy=NONE)
def trial_stage(
    study: optuna.Study,
    prepared: Prepared,
    kind: Kind,
    tokenizer: TokenizerSource,
    parent_run_id: str,
) -> TrialResult:
    """Train one candidate (a nested MLflow run) and tell Optuna its best validation score."""
    cfg = prepared.cfg
    metric = kind.selection_metric
    trial = study.ask()
    params = suggest(trial, cfg.sweep.space)
    trial_cfg = with_params(cfg.train, params)
    run_id = tracking.start_run(
        cfg.model_copy(update={"train": trial_cfg}),
        tags={"mlflow.parentRunId": parent_run_id, "sweep.trial": str(trial.number)},
        run_name=f"trial-{trial.number}",
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    pruner = PruneOnValidation(trial, metric)
    workdir = cfg.home_dir() / "work" / f"sweep-{parent_run_id[:8]}" / f"trial-{trial.number}"
    try:
        with tracking.failing_run(run_id):
            job = train_job(
                prepared, with_params(trial_cfg, {"early_stopping_patience": None}), workdir
            )
            result = train(job, kind, [MlflowMetricsCallback(run_id), pruner], tokenizer.get())
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    scores = [p[metric] for p in result.validation_curve]
    value = (max if kind.greater_is_better else min)(scores, default=float("nan"))
    tracking.log_metrics(run_id, {f"sweep/best_val_{metric}": value, "sweep/pruned": pruner.pruned})
    tracking.end_run(run_id, "FINISHED")
    if pruner.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, value)
    return TrialResult(
        number=trial.number,
        params=params,
        value=None if pruner.pruned else value,
        pruned=pruner.pruned,
        mlflow_run_id=run_id,
    )


@flow(name="sweep")
def sweep(config: RunConfig = RunConfig(), trials: int = 5) -> SweepSummary:
    """Search the recipe with Optuna on validation; register the best through `finetune`."""
    cfg = config
    flow_run_id = str(flow_run.get_id())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    workdir = cfg.home_dir() / "work" / f"{stamp}-sweep-{flow_run_id[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    kind = get_kind(cfg.task)
    parent = tracking.start_run(
        cfg,
        tags={"prefect.flow_run_id": flow_run_id, "sweep.trials": str(trials)},
        run_name=f"sweep-{flow_run.get_name()}",
        headline=(kind.headline, kind.headline_higher),
    )
    metric = kind.selection_metric
    with tracking.failing_run(parent):
        limit = max_positions(check_model(cfg)[0])
        prepared, tokenizer = prepare_data(cfg, kind, workdir, parent, limit)
        cfg = prepared.cfg
        study = open_study(cfg, prepared.data.fingerprint, kind.greater_is_better)
        done = finished_trials(study)
        if done:
            get_run_logger().info(
                "continuing study %s: %d of %d trials done", study.study_name, len(done), trials
            )
        tracking.set_tags(parent, {"sweep.study": study.study_name})
        results = done + [
            trial_stage(study, prepared, kind, tokenizer, parent)
            for _ in range(max(trials - len(done), 0))
        ]
        completed = [r for r in results if r.value is not None]
        if not completed:
            raise RuntimeError(f"all {trials} trials were pruned or failed")
        pick = max if kind.greater_is_better else min
        best = pick(completed, key=lambda r: r.value if r.value is not None else float("nan"))
        tracking.log_metrics(parent, {f"sweep/best_val_{metric}": best.value or 0.0})
        tracking.set_tags(parent, {"sweep.best_trial": str(best.number)})
        tracking.log_json(parent, [r.model_dump() for r in results], "sweep/trials.json")
    tracking.end_run(parent, "FINISHED")
    rows = "\n".join(
        f"| {r.number} | {'pruned' if r.pruned else f'{r.value:.4f}'} | "
        + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
        )
        + " |"
        for r in results
    )
    create_markdown_artifact(
        key="sweep",
        markdown=f"# Sweep ({trials} trials)\n\n"
        f"| trial | best val {metric} | params |\n|---|---|---|\n"
        f"{rows}\n\nBest: trial {best.number}; retrained and registered through `finetune`.\n",
        description=f"Optuna trials on validation {metric}",
    )
    # The best settings go through the normal path: test evaluation, registry, promotion gate.
    final_cfg = cfg.model_copy(update={"train": with_params(cfg.train, best.params)})
    final = finetune(
        config=final_cfg,
        extra_tags={"sweep.parent_run_id": parent, "sweep.best_trial": str(best.number)},
    )
    return SweepSummary(
        parent_run_id=parent,
        trials=results,
        metric=metric,
        best_params=best.params,
        best_value=best.value or 0.0,
        final=final,
    )
