"""The ``fulltune`` command line: run, predict, lineage, reproduce."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from tasks.config import RunConfig

app = typer.Typer(
    help="Full-parameter fine-tuning of Hugging Face models as a Prefect + MLflow pipeline.",
    no_args_is_help=True,
    add_completion=False,
)

TrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else .fulltune/mlflow.db).",
    ),
]


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config; the embedded demo config if omitted."),
]
OverridesOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: --set train.epochs=2"),
]


@app.callback()
def main() -> None:
    """fulltune: validate, tokenize, fully fine-tune, evaluate and register a model."""


def _setup_logging() -> None:
    # force: each invocation writes to the current stderr (tests call the app repeatedly).
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("httpx", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_config(config: Path | None, overrides: list[str] | None) -> RunConfig:
    """The validated config, or a clean exit naming the file and field at fault."""
    from tasks.config import ConfigError, load_config

    _setup_logging()
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err))


def _fail(message: str) -> NoReturn:
    typer.echo(f"fulltune: error: {message}", err=True)
    raise typer.Exit(code=1)


def _use_tracking(uri: str | None) -> str:
    """Point MLflow at ``uri``, the environment's store, or the default local store."""
    import mlflow

    from tasks.config import RunConfig

    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI") or RunConfig().tracking_uri()
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved


def _run_flow(cfg: RunConfig, extra_tags: dict[str, str] | None = None) -> None:
    from flows.finetune import finetune

    try:
        summary = finetune(config=cfg, extra_tags=extra_tags or {})
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
    if summary.decision is not None:
        verdict = "PROMOTED to @champion" if summary.decision.promoted else "kept as challenger"
        typer.echo(f"Promotion:        {verdict}: {summary.decision.reason}")
    typer.echo(summary.table)


@app.command()
def run(
    config: ConfigOption = None,
    overrides: OverridesOption = None,
) -> None:
    """Run the finetune flow and print the run id, the registered version and the metrics."""
    cfg = _load_config(config, overrides)
    _run_flow(cfg)


@app.command()
def sweep(
    config: ConfigOption = None,
    trials: Annotated[int, typer.Option("--trials", "-n", min=1, help="Optuna trials.")] = 5,
    overrides: OverridesOption = None,
) -> None:
    """Search learning rate, epochs, batch size, warmup and weight decay; register the best."""
    cfg = _load_config(config, overrides)
    from flows.sweep import sweep as sweep_flow

    try:
        summary = sweep_flow(config=cfg, trials=trials)
    except Exception as err:
        _fail(f"{type(err).__name__}: {err}")
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
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Default config of the deployments (the demo's)."),
    ] = None,
) -> None:
    """Serve the `finetune/nightly` (cron) and `finetune/adhoc` deployments from this machine."""
    from prefect import serve as prefect_serve

    from flows.deploy import deployments

    _setup_logging()
    prefect_serve(*deployments(config))


@app.command()
def bench(
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON object.")] = False,
    steps: Annotated[int, typer.Option(min=2, help="Optimizer steps of (a) and (b).")] = 40,
    seed_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of (c).")] = 3,
    overhead: Annotated[
        bool, typer.Option(help="Also time a whole `fulltune run` for the overhead.")
    ] = True,
    sft_steps: Annotated[
        int,
        typer.Option(
            min=0, help="Steps of each SFT arm on SmolLM2 (packed, padded, bare TRL); 0 skips."
        ),
    ] = 0,
) -> None:
    """Measure training throughput, MFU, memory and overhead against bare HF Trainer recipes."""
    import json

    from flows.bench import benchmark, table

    _setup_logging()
    result = benchmark(steps, seed_steps, overhead, sft_steps)
    if not as_json:
        typer.echo(table(result))
    typer.echo(json.dumps(result, default=float))


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
    tracking_uri: TrackingOption = None,
) -> None:
    """Predict labels (with scores), or continue texts with a text-generation model."""
    import pandas as pd

    from tasks.register import resolve_model_uri
    from tasks.sources import SourceError, read_table

    if bool(text) == bool(input_path):
        _fail("give either --text (one or more) or --input FILE")
    _use_tracking(tracking_uri)
    try:
        name, version = resolve_model_uri(model)
    except ValueError as err:
        _fail(str(err))
    import mlflow.pyfunc

    from tasks.config import EvalConfig

    batch_size = batch_size or EvalConfig().batch_size
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    flavor = loaded.metadata.flavors.get("transformers", {})
    chat = flavor.get("inference_task") == "llm/v1/chat"
    if input_path is not None:
        try:
            frame = read_table(str(input_path)).frame
        except SourceError as err:
            _fail(str(err))
        column = "messages" if chat and "messages" in frame.columns else text_column
        if column not in frame.columns:
            _fail(f"{input_path}: no column {column!r} (columns: {list(frame.columns)})")
        if frame.empty:
            _fail(f"{input_path}: no rows")
        inputs = frame[column].tolist()
    else:
        frame, inputs = pd.DataFrame({"text": text}), list(text or [])

    if chat:  # one conversation per request: a plain text is one user turn
        answers = [answer_chat(loaded, value) for value in inputs]
        out = frame.reset_index(drop=True).assign(answer=answers)
        lines = answers
    else:
        texts = [str(t) for t in inputs]
        parts = [
            loaded.predict(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)
        ]
        if isinstance(parts[0], pd.DataFrame):  # a classifier: a label and its score per text
            predictions = pd.concat(parts, ignore_index=True)
            out = frame.reset_index(drop=True).assign(
                label=predictions["label"].to_numpy(), score=predictions["score"].to_numpy()
            )
            rows = zip(out["label"], out["score"], texts, strict=True)
            lines = [f"{label}\t{score:.4f}\t{t}" for label, score, t in rows]
        else:  # a text-generation model: the text continued
            generated = [str(g) for part in parts for g in part]
            out = frame.reset_index(drop=True).assign(generated_text=generated)
            lines = generated
    if output_path is None:
        for line in lines:
            typer.echo(line)
        return
    if output_path.suffix == ".jsonl":
        out.to_json(output_path, orient="records", lines=True, force_ascii=False)
    else:
        out.to_csv(output_path, index=False)
    typer.echo(f"wrote {len(out)} predictions of {name} v{version} to {output_path}")


def answer_chat(model: Any, value: Any) -> str:
    """A chat model's answer to a text (one user turn) or a list of messages (JSON or parsed)."""
    import json

    if isinstance(value, str) and value.lstrip().startswith("["):
        value = json.loads(value)
    messages = [{"role": "user", "content": str(value)}] if isinstance(value, str) else list(value)
    reply = model.predict({"messages": [dict(m) for m in messages]})
    return str(reply[0]["choices"][0]["message"]["content"]).strip()


@app.command()
def lineage(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    tracking_uri: TrackingOption = None,
) -> None:
    """Print what produced a model version: run, flow run, data, validation, code, config."""
    from tasks.register import describe_lineage

    _use_tracking(tracking_uri)
    try:
        rows = describe_lineage(model)
    except ValueError as err:
        _fail(str(err))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _logged_run(run_id: str, tracking_uri: str | None) -> tuple[Any, RunConfig]:
    """A past run and the config it logged, or a clean exit naming what is missing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.config import RunConfig

    _setup_logging()
    _use_tracking(tracking_uri)
    client = MlflowClient()
    try:
        run_info = client.get_run(run_id)
        logged = client.download_artifacts(run_id, "config/config.json")
    except MlflowException as err:
        _fail(f"run {run_id}: {err.message}")
    return run_info, RunConfig.model_validate_json(Path(logged).read_text())


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The interrupted MLflow run.")],
    tracking_uri: TrackingOption = None,
) -> None:
    """Resume an interrupted run from its latest complete checkpoint, in the same MLflow run."""
    run_info, cfg = _logged_run(run_id, tracking_uri)
    if run_info.info.status == "FINISHED":
        _fail(f"run {run_id} finished: there is nothing to resume (use `fulltune reproduce`)")
    if not cfg.train.checkpoint_steps:
        _fail(f"run {run_id} kept no checkpoints (train.checkpoint_steps was not set)")
    _run_flow(cfg)


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

    from tasks.kinds import get_kind
    from tasks.sources import SourceError, load_tokenizer, materialize_model
    from tasks.validate import DataValidationError, validate_data

    run_info, cfg = _logged_run(run_id, tracking_uri)
    expected = run_info.data.tags.get("data.fingerprint")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model_cfg = materialize_model(cfg.model, cfg.home_dir() / "cache")
            tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.revision)
            kind = get_kind(cfg.task)
            data = validate_data(cfg.data, Path(tmp), kind, tokenizer, cfg.model.max_length)
            found = data.fingerprint
        except (SourceError, DataValidationError) as err:
            found = f"unreadable ({str(err).splitlines()[0]})"
    if found != expected:
        message = f"data fingerprint changed since run {run_id}: was {expected}, now {found}"
        if not force:
            _fail(message + " (use --force to run anyway)")
        typer.echo(f"warning: {message}; running anyway (--force)", err=True)
    _run_flow(cfg, {"fulltune.reproduces": run_id})


if __name__ == "__main__":
    sys.exit(app())
