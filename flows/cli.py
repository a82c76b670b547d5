"""The ``fulltune`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Full-parameter fine-tuning of Hugging Face models as a Prefect + MLflow pipeline.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """fulltune: validate, tokenize, fully fine-tune, evaluate and register a model."""


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config; the embedded demo config if omitted."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a config value: --set train.epochs=2"),
    ] = None,
) -> None:
    """Run the finetune flow and print the run id, the registered version and the metrics."""
    from tasks.config import ConfigError, load_config

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("httpx", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err))

    from flows.finetune import finetune, metrics_table

    try:
        summary = finetune(config=cfg)
    except Exception as err:  # every failure ends here: say what it was, exit non-zero
        _fail(f"{type(err).__name__}: {err}")
    typer.echo("")
    typer.echo(f"MLflow run id:    {summary.mlflow_run_id}")
    typer.echo(f"Tracking URI:     {cfg.tracking_uri()}")
    typer.echo(
        f"Registered model: {summary.model.name} version {summary.model.version} "
        f"(alias @{summary.model.alias})"
    )
    typer.echo(f"Data fingerprint: {summary.data_fingerprint}")
    typer.echo(metrics_table(summary.metrics, summary.baseline))


def _fail(message: str) -> typer.Exit:
    typer.echo(f"fulltune: error: {message}", err=True)
    raise typer.Exit(code=1)


if __name__ == "__main__":
    sys.exit(app())
