"""The ``finetune`` flow: raw text in, a fully fine-tuned, registered MLflow model out.

validate_data -> split_data -> tokenize -> train -> evaluate -> register_model -> promote

The flow resolves the run's kind (``tasks/kinds``: what depends on the task type) and tokenizer
(loaded by the first stage that needs it) once and hands them to the stages
(``flows/stages.py``), which wrap the plain functions in ``tasks/``. Stages hand each other small
typed results (paths, ids, metrics), never models in memory.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock
from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff
from prefect.utilities.urls import url_for
from pydantic import BaseModel

from flows import notify
from flows.policies import retry_transient
from flows.stages import (
    evaluate_stage,
    lm_eval_stage,
    prepare_data,
    promote_stage,
    register_model_stage,
    train_job,
    train_stage,
)
from tasks import caching, tracking
from tasks.checkpoints import latest_checkpoint, lock_folder
from tasks.config import RunConfig, redact_uri
from tasks.kinds import Kind, get_kind
from tasks.preflight import max_positions, preflight
from tasks.promote import (
    ModelForgot,
    capability_markdown,
    forgetting,
    forgetting_advice,
    gate_metric,
)
from tasks.register import (
    CardFacts,
    base_license,
    complete_registration,
    describe_version,
    lineage_tags,
)
from tasks.results import Decision, EvalResult, RegisteredModel
from tasks.sources import REGISTRY_SCHEME, RegisteredSource, registered_source


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
    mlflow_run_url: str  # the run's page in the MLflow UI


def claim_run(
    cfg: RunConfig, kind: Kind, tags: dict[str, str], run_name: str
) -> tuple[str, Path | None, FileLock | None]:
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
        cfg,
        tags=tags | {"fulltune.resume_key": resume_key},
        run_name=run_name,
        headline=(kind.headline, kind.headline_higher),
    )
    if not cfg.train.checkpoint_steps:
        return run_id, None, None
    return run_id, root / run_id, lock_folder(root / run_id)


def new_workdir(cfg: RunConfig) -> Path:
    """This flow run's working folder in the home: its splits, reports and training output."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    workdir = cfg.home_dir() / "work" / f"{stamp}-{(flow_run.get_id() or 'local')[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def flow_tags(cfg: RunConfig) -> dict[str, str]:
    """The MLflow run's links to its flow run, its task and its config."""
    return {
        "prefect.flow_run_id": str(flow_run.get_id()),
        "prefect.flow_run_name": str(flow_run.get_name()),
        "fulltune.task": cfg.task,
        "fulltune.config_hash": cfg.digest(),  # of the config as given (the one logged)
    }


def pin_parent(cfg: RunConfig, run_id: str) -> tuple[RunConfig, RegisteredSource | None]:
    """A run from a registered version: the version it resolves to now (trained from even if the
    alias moves meanwhile), recorded as the run's parent."""
    if not cfg.model.name_or_path.startswith(REGISTRY_SCHEME):
        return cfg, None
    parent = registered_source(cfg.model.name_or_path)
    tracking.set_tags(run_id, parent.lineage_tags())
    model = cfg.model.model_copy(update={"name_or_path": parent.pinned})
    return cfg.model_copy(update={"model": model}), parent


class NodeSummary(BaseModel):
    """What a node other than node 0 of a multi-machine run did: its ranks trained."""

    mlflow_run_id: str
    flow_run_id: str | None
    node_rank: int
    nnodes: int
    global_step: int
    weights_digest: str
    workdir: str


@flow(name="finetune-node", on_failure=[notify.on_failure])
def finetune_node(config: RunConfig = RunConfig()) -> NodeSummary:
    """Node ``train.node_rank`` of a run over ``train.nnodes`` machines (not node 0).

    The same data is validated, sized and tokenized here as on node 0 (the same content gives
    the same token ids), then this machine's ranks train beside node 0's, in step with them.
    Node 0's ``finetune`` flow evaluates, registers and gates; this node's MLflow run keeps its
    data report, its ranks' log and its machine's system metrics.
    """
    cfg = config
    if cfg.model.name_or_path.startswith(REGISTRY_SCHEME):
        tracking.configure(cfg)
    limit = max_positions(preflight(cfg))
    workdir = new_workdir(cfg)
    kind = get_kind(cfg.task)
    node = f"node {cfg.train.node_rank} of {cfg.train.nnodes}"
    run_id = tracking.start_run(
        cfg,
        tags=flow_tags(cfg) | {"fulltune.node_rank": str(cfg.train.node_rank)},
        run_name=f"{flow_run.get_name()}-node{cfg.train.node_rank}",
        headline=(kind.headline, kind.headline_higher),
    )
    get_run_logger().info(
        "MLflow run %s: %s, rendezvous at %s", run_id, node, cfg.train.rdzv_endpoint
    )
    with tracking.failing_run(run_id):
        cfg, _ = pin_parent(cfg, run_id)
        prepared, tokenizer = prepare_data(cfg, kind, workdir, run_id, limit)
        job = train_job(prepared, prepared.cfg.train, workdir, None, run_id)
        trained = train_stage(job, kind, tokenizer, run_id)
    decision = f"{node}: trained; node 0 evaluates and registers"
    tracking.set_tags(run_id, {"fulltune.decision": decision, "fulltune.alias": "none"})
    tracking.end_run(run_id, "FINISHED")
    shutil.rmtree(trained.model_dir, ignore_errors=True)
    return NodeSummary(
        mlflow_run_id=run_id,
        flow_run_id=str(flow_run.get_id()) if flow_run.get_id() else None,
        node_rank=cfg.train.node_rank,
        nnodes=cfg.train.nnodes,
        global_step=trained.global_step,
        weights_digest=trained.weights_digest,
        workdir=str(workdir),
    )


def run_description(
    card: CardFacts, metric: str, evaluation: EvalResult, decision: Decision | None
) -> str:
    """One paragraph for the MLflow run's Description: model, data, rows, result, decision."""
    rows = card.rows
    value = evaluation.metrics.get(metric)
    result = f"test {metric} {value:.4f}" if value is not None else "no test metric"
    yardsticks = ", ".join(
        f"{name} {scores[metric]:.4f}"
        for name, scores in (("baseline", evaluation.baseline), ("classical", evaluation.classical))
        if metric in scores
    )
    gate = decision.reason if decision is not None else "the promotion gate was off"
    return (
        f"Full fine-tuning ({card.task}) of {card.base_model} on {card.data} "
        f"(data fingerprint {card.data_fingerprint}; {rows.get('train', 0)} training, "
        f"{rows.get('validation', 0)} validation, {rows.get('test', 0)} test rows). "
        f"Result: {result}" + (f" (yardsticks: {yardsticks})" if yardsticks else "") + ". "
        f"Gate: {gate}."
    )


# No log_prints: dill (under datasets' fingerprinting) reads dis.dis output from a captured
# stdout, and Prefect's print patch would turn that bytecode into log lines instead.
@flow(name="finetune", on_failure=[notify.on_failure], on_completion=[notify.on_completion])
def finetune(
    config: RunConfig = RunConfig(),
    extra_tags: dict[str, str] | None = None,
) -> RunSummary:
    """Validate, split, tokenize, fully fine-tune, evaluate, register and gate one model.

    Args:
        config: The whole run: data, model, training recipe, evaluation, registry and gate.
        extra_tags: Tags added to the MLflow run (for example the run a reproduction repeats).
    """
    cfg = config
    base_model = cfg.model.name_or_path  # as the user named it (a GGUF file becomes a folder)
    started = time.perf_counter()
    clock = time.time()  # a time budget is this flow run's: from here to its end
    if cfg.model.name_or_path.startswith(REGISTRY_SCHEME):  # the preflight resolves it there
        tracking.configure(cfg)
    # Settings that cannot work fail here, naming the setting: before a run, a model or data.
    limit = max_positions(preflight(cfg))
    flow_run_id = flow_run.get_id()
    workdir = new_workdir(cfg)
    tags = flow_tags(cfg) | (extra_tags or {})
    config_hash = tags["fulltune.config_hash"]  # of the config as given (the one logged)
    kind = get_kind(cfg.task)
    run_id, checkpoint_dir, lock = claim_run(cfg, kind, tags, str(flow_run.get_name()))
    get_run_logger().info("MLflow run %s (tracking URI %s)", run_id, redact_uri(cfg.tracking_uri()))
    # Each UI links to the other: the MLflow run names its flow run, the flow run links its pages.
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    run_url = tracking.run_page(cfg.tracking_uri(), experiment, run_id)
    flow_run_url = url_for("flow-run", obj_id=flow_run_id) if flow_run_id else None
    if flow_run_url:
        tracking.set_tags(run_id, {"prefect.flow_run_url": flow_run_url})
    tracking.link_in_prefect("mlflow-run", run_url, f"MLflow run {run_id}", cfg.tracking_uri())
    # A run that starts from a registered version records it as its parent (run and version).
    cfg, parent = pin_parent(cfg, run_id)
    if parent is not None:
        base_model = (
            parent.pinned if parent.uri == parent.pinned else f"{parent.pinned} ({parent.uri})"
        )
    with tracking.failing_run(run_id):
        # The model materialised, the data validated, sized, split and tokenized: from here on
        # every stage reads the settings resolved against them (prepared.cfg), never the input.
        prepared, tokenizer = prepare_data(cfg, kind, workdir, run_id, limit)
        cfg = prepared.cfg
        trained = train_stage.with_options(
            retries=cfg.train.retries,
            retry_condition_fn=retry_transient,
            retry_delay_seconds=exponential_backoff(backoff_factor=10),
            timeout_seconds=cfg.train.timeout_hours * 3600 if cfg.train.timeout_hours else None,
        )(
            train_job(
                prepared,
                cfg.train,
                workdir,
                checkpoint_dir,
                run_id,
                clock,
                kind.evaluation_tokens(prepared),
            ),
            kind,
            tokenizer,
            run_id,
        )
        evaluation = evaluate_stage(trained.model_dir, prepared, kind, workdir, run_id)
        # How far validation (what selection saw) was from test: optimism shows up here.
        tracking.log_metrics(
            run_id,
            {
                f"gap/val_minus_test_{name}": trained.validation[name] - value
                for name, value in evaluation.metrics.items()
                if name in trained.validation
            },
        )
        harness = None
        if cfg.eval.lm_eval.tasks:
            harness = lm_eval_stage(trained.model_dir, kind, cfg.model, cfg.eval, run_id)
        lost, forgotten = forgetting(evaluation, harness, cfg.promote)
        tracking.log_metrics(run_id, lost)
        example = kind.input_example(prepared.splits)
        card = CardFacts(
            task=cfg.task,
            base_model=base_model,
            data=cfg.data.train,
            data_fingerprint=prepared.data.fingerprint,
            rows=prepared.splits.rows,
            labels=prepared.data.labels,
            metrics_table=evaluation.table(),
            test_rows=evaluation.test_rows,
            collapse=trained.collapse,
            license=base_license(base_model) or base_license(cfg.model.name_or_path),
            capability=capability_markdown(evaluation, harness, lost),
            forgetting=forgotten,
        )
        registered = register_model_stage(
            trained.model_dir,
            cfg.registry,
            run_id,
            kind,
            example,
            lineage_tags(run_id, str(flow_run_id), prepared.data, config_hash)
            | (parent.lineage_tags() if parent else {})
            | evaluation.version_tags()
            | {"quality.collapse": trained.collapse or "none"}
            | ({"collapsed": "true"} if trained.collapse else {})
            | ({"forgetting": "; ".join(forgotten)} if forgotten else {}),
            kind.inference_config(cfg.eval, evaluation),
            card,
        )
        if trained.collapse:  # registered for inspection, never a candidate
            from tasks.promote import ModelCollapsed, collapse_advice

            advice = collapse_advice(
                trained.collapse, cfg.train, trained.learning_rate, registered.version
            )
            if cfg.promote.on_collapse == "fail":
                complete_registration(registered)  # whole, and never a candidate
                raise ModelCollapsed(advice)
            get_run_logger().warning("%s", advice)
        decision = None
        if cfg.promote.enabled:  # a collapsed or forgetful version is not eligible
            decision = promote_stage(
                registered,
                evaluation,
                prepared,
                kind,
                run_id,
                trained.collapse or ("it forgot: " + "; ".join(forgotten) if forgotten else None),
            )
            describe_version(
                registered,
                card,
                f"{decision.reason}.\n\nDecided on `{decision.metric}`: {decision.metric_reason}.",
            )
        complete_registration(registered)
        if forgotten:
            raise ModelForgot(forgetting_advice(forgotten, registered.version, cfg.promote))
    total = time.perf_counter() - started
    # Work is forward and backward passes: optimizer steps, validation, scoring the test split.
    # Everything else (Prefect, validation of the data, MLflow, loading, saving, registering,
    # the classical yardstick) is overhead.
    work = trained.step_time_s + trained.validation_s + evaluation.scoring_s
    if trained.plan:  # the budget against the whole run's clock, and what followed training
        ended = time.time()
        tracking.log_metrics(
            run_id,
            {
                "plan/run_s": ended - clock,
                "plan/run_over_budget": (ended - clock) / trained.plan["plan/budget_s"],
                "plan/after_training_s": ended - trained.plan["training_ended"],
            },
        )
    tracking.log_metrics(
        run_id,
        {
            "time/flow_s": total,
            "efficiency/work_s": work,
            "efficiency/test_scoring_s": evaluation.scoring_s,
            "efficiency/overhead_s": total - work,
            "efficiency/overhead_fraction": (total - work) / total,
        },
    )
    promoted = decision is not None and decision.promoted
    gate = ("promoted" if promoted else "kept") if decision else "gate off"
    alias = cfg.promote.alias if promoted else (registered.alias or "none")
    if promoted:  # the alias the version holds now
        registered = registered.model_copy(update={"alias": cfg.promote.alias})
    # The runs table's deciding columns: what the gate did, and the alias the version holds.
    tracking.set_tags(run_id, {"fulltune.decision": gate, "fulltune.alias": alias})
    metric = decision.metric if decision else gate_metric(cfg.promote, evaluation, kind)[0]
    tracking.describe_run(run_id, run_description(card, metric, evaluation, decision))
    tracking.end_run(run_id, "FINISHED")
    # The model is registered (its weights are in the artifact store): the working copy and the
    # checkpoints are done. The splits and reports stay, for lineage.
    shutil.rmtree(trained.model_dir, ignore_errors=True)
    shutil.rmtree(workdir / "trainer", ignore_errors=True)  # the Trainer's own checkpoints
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if lock is not None:
        lock.release()

    table = evaluation.table()
    create_markdown_artifact(
        key="finetune-summary",
        markdown=(
            f"# fulltune run\n\n- MLflow run: `{run_id}`\n"
            f"- Registered model: `{registered.name}` version {registered.version} "
            f"(alias `{registered.alias}`)\n- Data fingerprint: `{prepared.data.fingerprint}`\n"
            f"- Test rows: {evaluation.test_rows}\n"
            f"- Promotion: {decision.reason if decision else 'gate disabled'}\n"
            + (f"- Decided on `{decision.metric}`: {decision.metric_reason}\n" if decision else "")
            + f"\n{table}\n\n{card.capability}\n\n{evaluation.details_markdown()}\n"
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
        data_fingerprint=prepared.data.fingerprint,
        workdir=str(workdir),
        mlflow_run_url=run_url,
    )
