"""The ``fulltune`` command line. This module holds the pipeline's commands (run, check, sweep,
resume, reproduce); the models' (predict, lineage, compare, promote), the pairs command and the
operations (serve, server, bench) live beside it, one module per group."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_base import (
    ConfigOption,
    OverridesOption,
    TrackingOption,
    app,
    check_data,
    fail,
    load,
    logged_run,
    orchestrated,
    run_flow,
    setup_logging,
    validated,
)

__all__ = ["app"]


@app.command()
def run(
    config: ConfigOption = None,
    overrides: OverridesOption = None,
) -> None:
    """Run the finetune flow and print the run id, the registered version and the metrics."""
    cfg = load(config, overrides)
    run_flow(cfg)


@app.command()
def check(
    config: ConfigOption = None,
    overrides: OverridesOption = None,
) -> None:
    """Check the settings and the data contract, as `run` would, without training: no Prefect
    flow, no MLflow run. Exits 1 naming every problem."""
    import tempfile

    cfg = load(config, overrides)
    with tempfile.TemporaryDirectory(prefix="fulltune-check-") as work:
        data = validated(cfg, Path(work))
    labels = f", labels {data.labels}" if data.labels else ""
    typer.echo(
        f"ok: the settings and the data contract pass ({cfg.task}): rows {data.rows}{labels}"
    )


@app.command()
def sweep(
    config: ConfigOption = None,
    trials: Annotated[int, typer.Option("--trials", "-n", min=1, help="Optuna trials.")] = 5,
    overrides: OverridesOption = None,
) -> None:
    """Search learning rate, epochs, batch size, warmup and weight decay; register the best."""
    cfg = load(config, overrides)
    from flows.sweep import sweep as sweep_flow

    with orchestrated(cfg, "sweep") as stored:
        summary = sweep_flow(config=stored, trials=trials)
    typer.echo("")
    typer.echo(f"Sweep parent run: {summary.parent_run_id}")
    for t in summary.trials:
        value = "pruned" if t.pruned else f"{t.value:.4f}"
        typer.echo(f"  trial {t.number}: val {summary.metric} {value}  {t.params}")
    final = summary.final
    typer.echo(
        f"Best trial params: {summary.best_params} (val {summary.metric} {summary.best_value:.4f})"
    )
    typer.echo(f"Registered model: {final.model.name} version {final.model.version}")
    if final.decision is not None:
        typer.echo(f"Promotion:        {final.decision.reason}")
    typer.echo(final.table)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The interrupted MLflow run.")],
    tracking_uri: TrackingOption = None,
) -> None:
    """Resume an interrupted run from its latest complete checkpoint, in the same MLflow run."""
    run_info, cfg = logged_run(run_id, tracking_uri)
    if run_info.info.status == "FINISHED":
        fail(f"run {run_id} finished: there is nothing to resume (use `fulltune reproduce`)")
    if not cfg.train.checkpoint_steps:
        fail(f"run {run_id} kept no checkpoints (train.checkpoint_steps was not set)")
    run_flow(cfg)


@app.command()
def reproduce(
    run_id: Annotated[str, typer.Argument(help="The MLflow run to run again.")],
    force: Annotated[
        bool, typer.Option("--force", help="Run even if the data no longer matches.")
    ] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Re-run a past run from its logged config, if its data is still the same."""
    import tempfile

    from tasks.preflight import PreflightError
    from tasks.sources import SourceError
    from tasks.validate import DataValidationError

    run_info, cfg = logged_run(run_id, tracking_uri)
    expected = run_info.data.tags.get("data.fingerprint")
    with tempfile.TemporaryDirectory() as tmp:
        try:  # the run's own first stage: the same contract, the same fingerprint
            found = check_data(cfg, Path(tmp)).fingerprint
        except (PreflightError, SourceError, DataValidationError) as err:
            found = f"unreadable ({str(err).splitlines()[0]})"
    if found != expected:
        message = f"data fingerprint changed since run {run_id}: was {expected}, now {found}"
        if not force:
            fail(message + " (use --force to run anyway)")
        typer.echo(f"warning: {message}; running anyway (--force)", err=True)
    run_flow(cfg, {"fulltune.reproduces": run_id})


@app.command()
def node(
    flow_run: Annotated[
        str, typer.Argument(help="Node 0's flow run (its job has it as PREFECT__FLOW_RUN_ID).")
    ],
    node_rank: Annotated[
        int, typer.Option(min=1, envvar="FULLTUNE_NODE_RANK", help="This machine's node rank.")
    ],
    overrides: OverridesOption = None,
) -> None:
    """Join node 0's flow run as one more machine: its config, read from the Prefect API, with
    this machine's node rank (and `--set` for what differs here, such as `home`). It validates
    and tokenizes the same data and trains beside node 0, which evaluates and registers. What a
    cluster job runs on every node but the first."""
    import tempfile
    from uuid import UUID

    import httpx
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    setup_logging()
    try:
        with get_client(sync_client=True) as client:
            parameters = client.read_flow_run(UUID(flow_run)).parameters
    except (ValueError, ObjectNotFound) as err:
        fail(f"flow run {flow_run!r}: not found on the Prefect API ({err})")
    except httpx.HTTPError as err:
        fail(f"the Prefect API at {PREFECT_API_URL.value()} did not answer: {err}")
    with tempfile.TemporaryDirectory(prefix="fulltune-node-") as folder:
        config = Path(folder) / f"flow-run-{flow_run}.yaml"  # named in any error about it
        config.write_text(yaml.safe_dump(parameters.get("config") or {}))
        cfg = load(config, [*(overrides or []), f"train.node_rank={node_rank}"])
    if cfg.train.nnodes < 2:
        fail(f"flow run {flow_run} trains on one machine (train.nnodes {cfg.train.nnodes})")
    run_flow(cfg)


# The other groups' commands join the app after the pipeline's (the order `--help` lists them in).
from flows import cli_ops, cli_models, cli_pairs  # noqa: E402, F401, I001

if __name__ == "__main__":
    app()
