"""The ``fulltune`` command line: run, predict, lineage, reproduce."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from tasks.config import RunConfig
    from tasks.results import ValidatedData

app = typer.Typer(
    help="Full-parameter fine-tuning of Hugging Face models as a Prefect + MLflow pipeline.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
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
    typer.Option(
        "--config",
        "-c",
        help="YAML config; without it the built-in defaults, which size the schedule, learning "
        "rate and max length to the data and model (configs/demo.yaml is the demo's).",
    ),
]
OverridesOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: --set train.epochs=2"),
]


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEBUG = {"on": os.environ.get("FULLTUNE_DEBUG", "") not in ("", "0")}
VERBOSE = {"on": False}
QUIET = {"on": False}


def _print_version(asked: bool) -> None:
    if not asked:
        return
    from importlib.metadata import version

    packages = ("fulltune", "torch", "transformers", "prefect", "mlflow", "great_expectations")
    for package in packages:
        typer.echo(f"{package:<20}{version(package)}")
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    typer.echo(f"{'device':<20}{device}, {os.cpu_count()} CPU cores")
    raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Print full tracebacks on the terminal too.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Also show the libraries' progress bars and load reports."),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only warnings, errors and the summary.")
    ] = False,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Versions and the device."
        ),
    ] = False,
) -> None:
    """fulltune: validate, tokenize, fully fine-tune, evaluate and register a model."""
    DEBUG["on"] = DEBUG["on"] or debug
    VERBOSE["on"] = verbose
    QUIET["on"] = quiet
    if not verbose:  # before any command imports transformers, which reads these once
        _quiet_libraries()


class _WithoutTracebacks(logging.Formatter):
    """The terminal's formatter: tracebacks go to the run's log file, not the terminal, and
    Prefect's records (whose failure states repeat the whole error) show 200 characters: the
    error itself is printed once, in full, at the end."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        if record.name.startswith("prefect"):
            first = line.splitlines()[0] if line else line
            return first if len(first) <= 200 else first[:199] + "…"
        return line


def _setup_logging() -> None:
    # force: each invocation writes to the current stderr (tests call the app repeatedly).
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    if not DEBUG["on"]:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_WithoutTracebacks(LOG_FORMAT))
    for noisy in ("httpx", "great_expectations", "mlflow.system_metrics", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # GE sets its loggers' levels on import
        handler.addFilter(_quiet_great_expectations)
        if QUIET["on"]:  # the log file (added later) keeps every record
            handler.setLevel(logging.WARNING)
    if not VERBOSE["on"]:
        _quiet_libraries()


def _quiet_great_expectations(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith("great_expectations")


def _quiet_libraries() -> None:
    """The libraries' progress bars and load reports off: fulltune logs its own progress, and a
    "classifier.weight MISSING" report alarms a newcomer although a new head is expected."""
    import warnings

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' load and save bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
    warnings.filterwarnings("ignore", message=".*clean_up_tokenization_spaces.*")
    if "transformers" in sys.modules:  # imported already (a test, a notebook): it read the env
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _log_file(home: Path, command: str) -> Path:
    """Send this invocation's whole log, tracebacks included, to ``<home>/logs/``."""
    import time

    folder = home / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{command}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return path


def _named_cause(err: Exception) -> bool:
    """Errors whose message already names the setting, file or rule at fault."""
    from tasks.distributed import DistributedError
    from tasks.preflight import PreflightError
    from tasks.promote import ModelForgot
    from tasks.sources import SourceError
    from tasks.split import SplitError
    from tasks.train import MemoryPreflightError, ModelCollapsed
    from tasks.validate import DataValidationError

    named = (DataValidationError, PreflightError, SourceError, SplitError, MemoryPreflightError)
    return isinstance(err, (*named, DistributedError, ModelCollapsed, ModelForgot))


@contextmanager
def _orchestrated(cfg: RunConfig, command: str) -> Iterator[RunConfig]:
    """The run's log file, its Prefect API (the home's local server unless one is configured),
    and its config as the flow may store it: a tracking URI with credentials travels in the
    environment, never as a flow parameter, so Prefect's database and UI never hold it."""
    from flows.local_server import ServerError, ServerLost, prefect_api
    from tasks.config import redact_uri
    from tasks.preflight import check_home

    for problem in check_home(cfg):  # the log file and the Prefect server live in the home
        _fail(f"the run cannot start:\n  {problem}")
    log_path = _log_file(cfg.home_dir(), command)
    uri = cfg.registry.tracking_uri
    if uri is not None and redact_uri(uri) != uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = uri
        cfg = cfg.redacted()
    try:
        with prefect_api(cfg.home_dir()):
            yield cfg
    except ServerLost as err:
        # Prefect's log and event workers would wait on the dead API at exit: leave without them.
        typer.echo(f"fulltune: error: {err}\n(full log with tracebacks: {log_path})", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except ServerError as err:
        _fail(f"the local Prefect server: {err}")
    except Exception as err:  # every failure ends here: say what it was, exit non-zero
        logging.getLogger("fulltune").debug("failure", exc_info=True)
        message = str(err) if _named_cause(err) else f"{type(err).__name__}: {err}"
        if full := _disk_full(err, cfg):
            message = full
        _fail(f"{message}\n(full log with tracebacks: {log_path})")


def _disk_full(err: BaseException, cfg: RunConfig) -> str | None:
    """For a failure from a full disk (any link of the error's chain): which path, how to fix."""
    import errno
    import shutil

    seen: BaseException | None = err
    while seen is not None:
        text = str(seen)
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or (
            "database or disk is full" in text or "No space left on device" in text
        ):
            where = getattr(seen, "filename", None) or str(cfg.home_dir())
            free = shutil.disk_usage(cfg.home_dir() if cfg.home_dir().exists() else "/").free
            return (
                f"the disk is full: writing {where} failed ({free / 2**20:.0f} MiB free on the "
                f"home's disk). Free space there (old runs' checkpoints: {cfg.home_dir()}/"
                "checkpoints, then its cache and work folders), or set home on a larger disk"
            )
        seen = seen.__cause__ or seen.__context__
    return None


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

    user_value = os.environ.get("MLFLOW_TRACKING_URI")
    resolved = uri or user_value or RunConfig().tracking_uri()
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    # mlflow exports the URI to the environment; put the user's own value back, or every later
    # run in this process (a test module, a served deployment) would take it for the user's choice
    # (as tasks.tracking.configure does for runs).
    if user_value is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_value
    return resolved


def _run_flow(cfg: RunConfig, extra_tags: dict[str, str] | None = None) -> None:
    from flows.local_server import start_early

    start_early(cfg.home_dir())  # a new home's Prefect server boots while the pipeline imports
    # torch, transformers' models, datasets, sklearn and GE load in the stages that need them,
    # inside the flow: its first stage starts without them, and its clock counts them.
    from flows.finetune import finetune
    from tasks import tracking

    with _orchestrated(cfg, "run") as stored:
        summary = finetune(config=stored, extra_tags=extra_tags or {})
        times = tracking.log_process_times(summary.mlflow_run_id)
        prefect_ui = os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
    typer.echo("")
    typer.echo(f"MLflow run id:    {summary.mlflow_run_id}")
    from tasks.config import redact_uri

    typer.echo(f"Tracking URI:     {redact_uri(cfg.tracking_uri())}")
    alias = f"alias @{summary.model.alias}" if summary.model.alias else "no alias"
    typer.echo(f"Registered model: {summary.model.name} version {summary.model.version} ({alias})")
    if prefect_ui and summary.flow_run_id:
        typer.echo(f"Prefect run:      {prefect_ui}/runs/flow-run/{summary.flow_run_id}")
    served = "" if tracking.ui_base(cfg.tracking_uri())[1] else " (after `make ui`)"
    typer.echo(f"MLflow run:       {summary.mlflow_run_url}{served}")
    if summary.model.version:
        page = tracking.version_page(cfg.tracking_uri(), summary.model.name, summary.model.version)
        typer.echo(f"MLflow version:   {page}{served}")
    typer.echo(f"Data fingerprint: {summary.data_fingerprint}")
    if summary.decision is not None:
        verdict = "PROMOTED to @champion" if summary.decision.promoted else "kept as challenger"
        typer.echo(f"Promotion:        {verdict}: {summary.decision.reason}")
    typer.echo(summary.table)
    overhead = times["efficiency/process_overhead_fraction"]
    typer.echo(
        f"Time:             {times['time/process_s']:.0f} s in all, "
        f"{times['time/cold_start_s']:.1f} s to the first stage, {overhead:.0%} outside forward "
        "and backward passes"
    )


@app.command()
def run(
    config: ConfigOption = None,
    overrides: OverridesOption = None,
) -> None:
    """Run the finetune flow and print the run id, the registered version and the metrics."""
    cfg = _load_config(config, overrides)
    _run_flow(cfg)


@app.command()
def check(
    config: ConfigOption = None,
    overrides: OverridesOption = None,
) -> None:
    """Check the settings and the data contract, as `run` would, without training: no Prefect
    flow, no MLflow run. Exits 1 naming every problem."""
    import tempfile

    cfg = _load_config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="fulltune-check-") as work:
        data = _validated(cfg, Path(work))
    labels = f", labels {data.labels}" if data.labels else ""
    typer.echo(
        f"ok: the settings and the data contract pass ({cfg.task}): rows {data.rows}{labels}"
    )


def _validated(cfg: RunConfig, work: Path) -> ValidatedData:
    """The config's data through its contract, as a run's first stage sees it (a clean exit
    naming every problem otherwise)."""
    from flows.finetune import cache_root
    from flows.stages import contract_settings, validation_length
    from tasks.kinds import get_kind
    from tasks.preflight import PreflightError, max_positions, preflight
    from tasks.sources import REGISTRY_SCHEME, SourceError, TokenizerSource, materialize_model
    from tasks.validate import DataValidationError, validate_data

    if cfg.model.name_or_path.startswith(REGISTRY_SCHEME):  # a registered version: its store
        _use_tracking(cfg.tracking_uri())
    try:
        facts = preflight(cfg)
        model = materialize_model(cfg.model, cache_root(cfg))
        tokenizer = TokenizerSource.of(model).get()
        length = validation_length(model, max_positions(facts))
        return validate_data(contract_settings(cfg), work, get_kind(cfg.task), tokenizer, length)
    except (PreflightError, SourceError, DataValidationError) as err:
        _fail(str(err))


@app.command()
def sweep(
    config: ConfigOption = None,
    trials: Annotated[int, typer.Option("--trials", "-n", min=1, help="Optuna trials.")] = 5,
    overrides: OverridesOption = None,
) -> None:
    """Search learning rate, epochs, batch size, warmup and weight decay; register the best."""
    cfg = _load_config(config, overrides)
    from flows.sweep import sweep as sweep_flow

    with _orchestrated(cfg, "sweep") as stored:
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
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Default config of the deployments (the demo's)."),
    ] = None,
    allow: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow",
            help="A folder triggered runs may read data from and keep their home in "
            "(repeatable; default: the config's home and data folders).",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Runs of each deployment that may train at once.")
    ] = 1,
    timezone: Annotated[
        str, typer.Option(help="IANA time zone of the nightly schedule (FULLTUNE_TIMEZONE).")
    ] = os.environ.get("FULLTUNE_TIMEZONE", "UTC"),
) -> None:
    """Serve the `finetune/nightly` (cron) and `finetune/adhoc` deployments from this machine.

    Anyone who can reach the Prefect API can trigger `adhoc` with their own parameters, so runs
    are confined: data, model and home paths outside the allowed folders, and any tracking store
    but the config's, are refused before anything runs.
    """
    from prefect import serve as prefect_serve

    from flows.deploy import deployments
    from flows.local_server import prefect_api
    from tasks.preflight import ALLOWED_ROOTS_ENV, ALLOWED_TRACKING_ENV

    cfg = _load_config(config, None)
    roots = [p.resolve() for p in allow] if allow else default_roots(cfg)
    os.environ[ALLOWED_ROOTS_ENV] = os.pathsep.join(map(str, roots))
    os.environ[ALLOWED_TRACKING_ENV] = cfg.tracking_uri()
    typer.echo(f"runs confined to: {', '.join(map(str, roots))}")
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # prefect's serve shuts down cleanly on it (as on Ctrl-C)

    signal.signal(signal.SIGTERM, stop)
    try:
        with prefect_api(cfg.home_dir()) as url:
            typer.echo(f"serving on the Prefect API at {url}")
            prefect_serve(*deployments(config, concurrency, timezone))
    except KeyboardInterrupt:  # a stop that arrived before (or after) prefect's serve took it
        pass
    typer.echo("stopped serving")


def default_roots(cfg: RunConfig) -> list[Path]:
    """The served config's home and the folders its local data and model live in."""

    roots = [cfg.home_dir()]
    names = [cfg.data.train, cfg.data.validation, cfg.data.test, cfg.model.name_or_path]
    for name in names:
        if name is None or name.startswith("pkg://"):
            continue
        path = Path(name).expanduser()
        if path.exists():
            roots.append(path.resolve() if path.is_dir() else path.resolve().parent)
    return list(dict.fromkeys(roots))


server_app = typer.Typer(help="The home's local Prefect server, shared by every run.")
app.add_typer(server_app, name="server")
HomeOption = Annotated[Path, typer.Option("--home", help="The fulltune home whose server this is.")]


@server_app.command("start")
def server_start(home: HomeOption = Path(".fulltune")) -> None:
    """Start the home's Prefect server (or find the running one) and print its URLs."""
    from flows.local_server import ServerError, ensure_server

    try:
        info = ensure_server(home.resolve(), stays=True)  # started by hand: stopped by hand
    except ServerError as err:
        _fail(str(err))
    typer.echo(f"Prefect API: {info.url}\nPrefect UI:  {info.ui_url}\npid:         {info.pid}")


@server_app.command("stop")
def server_stop(home: HomeOption = Path(".fulltune")) -> None:
    """Stop the home's Prefect server (its flow runs stay in its database)."""
    from flows.local_server import stop_server

    stopped = stop_server(home.resolve())
    typer.echo(f"stopped pid {stopped.pid}" if stopped else "no server was running")


@server_app.command("list")
def server_list() -> None:
    """Every running fulltune Prefect server of this user: its home, UI, pid and idle time."""
    from flows.local_server import idle_limit_s, running_servers

    servers = running_servers()
    if not servers:
        typer.echo("no fulltune Prefect server is running")
        return
    for s in servers:
        idle = float(s["idle_s"])  # type: ignore[arg-type]
        typer.echo(
            f"{s['home']}  http://127.0.0.1:{s['port']}  pid {s['pid']}  unused {idle / 60:.0f} min"
        )
    limit = idle_limit_s()
    rule = f"after {limit / 60:.0f} min unused" if limit else "never (FULLTUNE_SERVER_IDLE=0)"
    typer.echo(f"(servers started by a run stop themselves {rule}; `server start` ones stay)")


@server_app.command("status")
def server_status(home: HomeOption = Path(".fulltune")) -> None:
    """Print whether the home's Prefect server runs, and where."""
    from flows.local_server import describe

    for key, value in describe(home.resolve()).items():
        typer.echo(f"{key:<10}  {value}")


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
    dpo_steps: Annotated[
        int,
        typer.Option(min=0, help="Steps of each DPO arm on SmolLM2 (fulltune, bare TRL); 0 skips."),
    ] = 0,
    repeats: Annotated[
        int, typer.Option(min=1, help="Repetitions of (a), (b), (c), interleaved; medians shown.")
    ] = 3,
    settings_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="Steps per training-step setting (precision, attention, fused AdamW, "
            "torch.compile, threads, batch order); 0 skips.",
        ),
    ] = 10,
) -> None:
    """Measure training throughput, MFU, memory and overhead against bare HF Trainer recipes."""
    import json

    from flows.bench import benchmark, table

    _setup_logging()
    result = benchmark(
        steps,
        seed_steps,
        overhead,
        sft_steps,
        repeats,
        dpo_steps=dpo_steps,
        settings_steps=settings_steps,
    )
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
        _fail("give either --text (one or more) or --input FILE")
    _use_tracking(tracking_uri)
    try:
        name, version = resolve_model_uri(model)
    except ValueError as err:
        _fail(str(err))
    from tasks.config import EvalConfig

    batch_size = batch_size or EvalConfig().batch_size
    if input_path is not None:
        try:
            frame = read_table(str(input_path)).frame
        except SourceError as err:
            _fail(str(err))
        if frame.empty:
            _fail(f"{input_path}: no rows")
    else:
        frame = pd.DataFrame({"text": text})
    try:
        predictor = load_predictor(name, version, pyfunc=pyfunc)
    except (SourceError, OSError) as err:
        _fail(str(err))
    column = "messages" if predictor.chat and "messages" in frame.columns else text_column
    if input_path is not None and column not in frame.columns:
        _fail(f"{input_path}: no column {column!r} (columns: {list(frame.columns)})")
    inputs = frame[column].tolist() if input_path is not None else list(text or [])

    out = frame.reset_index(drop=True)
    if predictor.chat:  # one conversation per request: a plain text is one user turn
        lines = [predictor.answer(value) for value in inputs]
        out = out.assign(answer=lines)
    elif predictor.task == "text-classification":  # a label and its score per text
        texts = [str(t) for t in inputs]
        predictions = predictor.classify(texts, batch_size)
        out = out.assign(
            label=predictions["label"].to_numpy(), score=predictions["score"].to_numpy()
        )
        rows = zip(out["label"], out["score"], texts, strict=True)
        lines = [f"{label}\t{score:.4f}\t{t}" for label, score, t in rows]
    else:  # a text-generation model: the text continued
        lines = predictor.continue_texts([str(t) for t in inputs], batch_size)
        out = out.assign(generated_text=lines)
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

    _use_tracking(tracking_uri)
    try:
        rows = describe_lineage(model)
    except ValueError as err:
        _fail(str(err))
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

    _use_tracking(tracking_uri)
    gate = PromoteConfig()
    try:
        a, b = resolve_version(model_a), resolve_version(model_b)
        result = compare(a, b, metric, gate.bootstrap_samples, gate.seed, examples)
    except ValueError as err:
        _fail(str(err))
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

    _use_tracking(tracking_uri)
    try:
        name, version = resolve_model_uri(model)
        actor = f"{getpass.getuser()}@{socket.gethostname()} (fulltune promote)"
        previous = move_alias(name, version, to, reason, actor)
    except AlreadyThere as err:
        typer.echo(str(err))  # not an error, and nothing is written
        return
    except ValueError as err:
        _fail(str(err))
    was = f" (was v{previous})" if previous else ""
    typer.echo(f"@{to} -> {name} v{version}{was}")


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


class Split(StrEnum):
    train = "train"
    validation = "validation"
    test = "test"
    unused = "unused"


@app.command()
def pairs(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="models:/NAME@ALIAS: whose mistakes make the pairs."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the pairs go (JSONL).")],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Instruction data with reference answers (the sft formats); default: the "
            "config's data.train.",
        ),
    ] = None,
    split: Annotated[
        Split | None,
        typer.Option(
            help="Only the rows an sft run with this config puts in that split, after its data "
            "contract: `unused` is the training rows outside train.max_train_samples, `test` the "
            "rows its evaluation judges (eval.max_test_samples). Default: every row.",
        ),
    ] = None,
    max_prompts: Annotated[
        int | None, typer.Option(min=1, help="A seeded subset of this many prompts.")
    ] = None,
    share_right: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of the prompts it answers right that still give a pair (its most likely "
            "wrong answer rejected; closed answer sets only).",
        ),
    ] = 0.0,
    config: ConfigOption = None,
    overrides: OverridesOption = None,
) -> None:
    """Preference pairs from a registered model's own mistakes, for a `task: dpo` run: the
    reference answer chosen, the model's wrong answer rejected. Recorded as an MLflow run."""
    import tempfile

    from mlflow import MlflowClient

    from tasks import tracking
    from tasks.kinds.dpo import build_pairs, conversations
    from tasks.kinds.sft import conversations_of, scored_rows
    from tasks.sources import SourceError
    from tasks.split import split_frames

    cfg = _load_config(config, [*(overrides or []), *([f"data.train={data}"] if data else [])])
    if split is not None and cfg.task != "sft":
        _fail(f"--split reads the splits of an sft run; the config's task is {cfg.task!r}")
    uri = _use_tracking(cfg.tracking_uri())
    seed = cfg.train.seed
    try:
        with tempfile.TemporaryDirectory(prefix="fulltune-pairs-") as staging:
            if split is None:
                chats = conversations(cfg.data)
            else:
                validated = _validated(cfg, Path(staging))
                frames = split_frames(validated, cfg.data, cfg.train.max_train_samples, seed)
                chats = conversations_of(frames[split.value])
                if split is Split.test:  # the rows the run's evaluation judged, in its order
                    kept = scored_rows(len(chats), cfg.eval.max_test_samples, seed)
                    chats = [chats[i] for i in kept]
            chats = [chats[i] for i in scored_rows(len(chats), max_prompts, seed)]
            built, pinned = build_pairs(
                model, chats, cfg.data, cfg.model, cfg.eval, Path(staging), share_right, seed
            )
    except (SourceError, OSError) as err:
        _fail(str(err))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        built.write(out)
    except OSError as err:
        _fail(f"--out {out}: cannot be written: {err.strerror or err}")
    # The file is written whole or not at all, and the run recorded once it is there.
    run_id = tracking.start_run(
        cfg,
        {
            "fulltune.task": "pairs",
            "lineage.source_model": pinned,
            "pairs.out": str(out),
            "pairs.share_right": str(share_right),
            "pairs.split": split.value if split else "all",
        },
        f"pairs-{out.stem}",
    )
    tracking.log_metrics(run_id, built.metrics())
    tracking.log_artifact(run_id, out, "pairs")
    tracking.end_run(run_id, "FINISHED")
    experiment = MlflowClient(uri, registry_uri=uri).get_run(run_id).info.experiment_id
    accuracy = built.right / max(built.prompts, 1)
    typer.echo(
        f"wrote {len(built.rows)} pairs from {built.prompts} prompts to {out} ({pinned} answered "
        f"{built.right} right: {accuracy:.1%})"
    )
    served = "" if tracking.ui_base(uri)[1] else " (after `make ui`)"
    typer.echo(f"MLflow run:       {tracking.run_page(uri, experiment, run_id)}{served}")


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

    from flows.stages import validation_length
    from tasks.kinds import get_kind
    from tasks.preflight import check_model, max_positions
    from tasks.sources import SourceError, load_tokenizer, materialize_model
    from tasks.validate import DataValidationError, validate_data

    run_info, cfg = _logged_run(run_id, tracking_uri)
    expected = run_info.data.tags.get("data.fingerprint")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model_cfg = materialize_model(cfg.model, cfg.home_dir() / "cache")
            tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.revision)
            kind = get_kind(cfg.task)
            limit = max_positions(check_model(cfg)[0])
            length = validation_length(cfg.model, limit)
            data = validate_data(cfg.data, Path(tmp), kind, tokenizer, length)
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
