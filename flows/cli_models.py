"""The registry's commands: predict with a version, its lineage, two versions compared, an
alias moved by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_base import TrackingOption, app, fail, use_tracking


@app.command()
def predict(
    model: Annotated[
        str, typer.Option("--model", "-m", help="models:/NAME@ALIAS or models:/NAME/V")
    ],
    text: Annotated[
        list[str] | None,
        typer.Option(
            "--text", "-t", help="A text to classify, continue, or ask a chat model (repeatable)."
        ),
    ] = None,
    input_path: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="CSV, TSV, JSONL or Parquet file of texts (for a chat model: or a `messages` "
            "column of conversations).",
        ),
    ] = None,
    output_path: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write predictions here (.csv/.jsonl).")
    ] = None,
    text_column: Annotated[str, typer.Option(help="Text column of --input.")] = "text",
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Texts per model call (default: eval.batch_size).")
    ] = None,
    pyfunc: Annotated[
        bool,
        typer.Option(
            "--pyfunc",
            help="Load the version through mlflow.pyfunc, as `mlflow models serve` does. It runs "
            "the Python code the registry holds: use only on a store you trust. Default: its "
            "weights with transformers (safetensors, no remote code).",
        ),
    ] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Predict labels (with scores), or continue texts with a text-generation model."""
    import pandas as pd

    from tasks.predict import load_predictor
    from tasks.register import resolve_model_uri
    from tasks.sources import SourceError, read_table

    if bool(text) == bool(input_path):
        fail("give either --text (one or more) or --input FILE")
    use_tracking(tracking_uri)
    try:
        name, version = resolve_model_uri(model)
    except ValueError as err:
        fail(str(err))
    from tasks.config import EvalConfig

    batch_size = batch_size or EvalConfig().batch_size
    if input_path is not None:
        try:
            frame = read_table(str(input_path)).frame
        except SourceError as err:
            fail(str(err))
        if frame.empty:
            fail(f"{input_path}: no rows")
    else:
        frame = pd.DataFrame({"text": text})
    try:
        predictor = load_predictor(name, version, pyfunc=pyfunc)
    except (SourceError, OSError) as err:
        fail(str(err))
    column = "messages" if predictor.chat and "messages" in frame.columns else text_column
    if input_path is not None and column not in frame.columns:
        fail(f"{input_path}: no column {column!r} (columns: {list(frame.columns)})")
    inputs = frame[column].tolist() if input_path is not None else list(text or [])

    out, lines = predictor.predict(frame.reset_index(drop=True), inputs, batch_size)
    if output_path is None:
        for line in lines:
            typer.echo(line)
        return
    if output_path.suffix == ".jsonl":
        out.to_json(output_path, orient="records", lines=True, force_ascii=False)
    else:
        out.to_csv(output_path, index=False)
    typer.echo(f"wrote {len(out)} predictions of {name} v{version} to {output_path}")


@app.command()
def lineage(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    tracking_uri: TrackingOption = None,
) -> None:
    """Print what produced a model version: run, flow run, data, validation, code, config."""
    from tasks.register import describe_lineage

    use_tracking(tracking_uri)
    try:
        rows = describe_lineage(model)
    except ValueError as err:
        fail(str(err))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def resolve_version(ref: str) -> tuple[str, str]:
    """(name, version) of ``models:/...`` or of the version an MLflow run registered."""
    from mlflow import MlflowClient

    from tasks.register import resolve_model_uri

    if ref.startswith("models:/"):
        return resolve_model_uri(ref)
    versions = MlflowClient().search_model_versions(f"run_id = '{ref}'")
    if not versions:
        raise ValueError(f"{ref}: neither models:/NAME/VERSION nor a run that registered a model")
    return versions[0].name, str(versions[0].version)


@app.command("compare")
def compare_command(
    model_a: Annotated[
        str, typer.Argument(help="models:/NAME/VERSION, models:/NAME@ALIAS, or an MLflow run id")
    ],
    model_b: Annotated[str, typer.Argument(help="the other version (or run id)")],
    metric: Annotated[
        str | None,
        typer.Option(
            help="The metric of the CI: macro_f1 or accuracy (classifiers; default macro_f1); "
            "answer_loss, accuracy, macro_f1, exact_match or rouge_l (sft; default: the one B's "
            "gate decided on)."
        ),
    ] = None,
    examples: Annotated[int, typer.Option(min=0, help="Disagreements to show.")] = 10,
    tracking_uri: TrackingOption = None,
) -> None:
    """Two versions on the same test rows: metrics, the gate's paired CI, and the rows where one
    is right and the other wrong (for sft: whose answer loss changed most)."""
    from tasks.compare import compare, render
    from tasks.config import PromoteConfig

    use_tracking(tracking_uri)
    gate = PromoteConfig()
    try:
        a, b = resolve_version(model_a), resolve_version(model_b)
        result = compare(a, b, metric, gate.bootstrap_samples, gate.seed, examples)
    except ValueError as err:
        fail(str(err))
    typer.echo(render(result))


@app.command("promote")
def promote_command(
    model: Annotated[str, typer.Argument(help="models:/NAME/VERSION (or models:/NAME@ALIAS)")],
    to: Annotated[str, typer.Option("--to", help="The alias to move onto it.")] = "champion",
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded on the version).")] = "",
    tracking_uri: TrackingOption = None,
) -> None:
    """Move an alias to a version by hand: a manual promotion, or a rollback to an older one."""
    import getpass
    import socket

    from tasks.promote import AlreadyThere, move_alias
    from tasks.register import resolve_model_uri

    use_tracking(tracking_uri)
    try:
        name, version = resolve_model_uri(model)
        actor = f"{getpass.getuser()}@{socket.gethostname()} (fulltune promote)"
        previous = move_alias(name, version, to, reason, actor)
    except AlreadyThere as err:
        typer.echo(str(err))  # not an error, and nothing is written
        return
    except ValueError as err:
        fail(str(err))
    was = f" (was v{previous})" if previous else ""
    typer.echo(f"@{to} -> {name} v{version}{was}")
