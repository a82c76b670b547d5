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


# The other groups' commands join the app after the pipeline's (the order `--help` lists them in).
from flows import cli_ops, cli_models, cli_pairs  # noqa: E402, F401, I001

if __name__ == "__main__":
    app()
