"""What every ``fulltune`` command shares: the app, its options, logging, clean errors (which
file, setting or rule, and a non-zero exit), the tracking store and the run of the flow."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


def setup_logging() -> None:
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
    # transformers imports torchao when it is installed: its GPU kernels that do not load on
    # this machine, and torch's notes on its enums, are not the user's concern.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


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


def named_cause(err: Exception) -> bool:
    """Errors whose message already names the setting, file or rule at fault."""
    from tasks.distributed import DistributedError
    from tasks.fit import MemoryPreflightError
    from tasks.preflight import PreflightError
    from tasks.promote import ModelCollapsed, ModelForgot
    from tasks.sources import SourceError
    from tasks.split import SplitError
    from tasks.validate import DataValidationError

    named = (DataValidationError, PreflightError, SourceError, SplitError, MemoryPreflightError)
    return isinstance(err, (*named, DistributedError, ModelCollapsed, ModelForgot))


@contextmanager
def orchestrated(cfg: RunConfig, command: str) -> Iterator[RunConfig]:
    """The run's log file, its Prefect API (the home's local server unless one is configured),
    and its config as the flow may store it: a tracking URI with credentials travels in the
    environment, never as a flow parameter, so Prefect's database and UI never hold it."""
    from flows.local_server import ServerError, ServerLost, prefect_api
    from tasks.config import redact_uri
    from tasks.preflight import check_home

    for problem in check_home(cfg):  # the log file and the Prefect server live in the home
        fail(f"the run cannot start:\n  {problem}")
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
        fail(f"the local Prefect server: {err}")
    except Exception as err:  # every failure ends here: say what it was, exit non-zero
        logging.getLogger("fulltune").debug("failure", exc_info=True)
        message = str(err) if named_cause(err) else f"{type(err).__name__}: {err}"
        if full := disk_full(err, cfg):
            message = full
        fail(f"{message}\n(full log with tracebacks: {log_path})")


def disk_full(err: BaseException, cfg: RunConfig) -> str | None:
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


def load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    """The validated config, or a clean exit naming the file and field at fault."""
    from tasks.config import ConfigError, load_config

    setup_logging()
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        fail(str(err))


def fail(message: str) -> NoReturn:
    typer.echo(f"fulltune: error: {message}", err=True)
    raise typer.Exit(code=1)


def use_tracking(uri: str | None) -> str:
    """Point MLflow at ``uri``, the environment's store, or the default local store."""
    from tasks import tracking
    from tasks.config import RunConfig

    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI") or RunConfig().tracking_uri()
    tracking.point_at(resolved)
    return resolved


def run_flow(cfg: RunConfig, extra_tags: dict[str, str] | None = None) -> None:
    from flows.local_server import start_early

    start_early(cfg.home_dir())  # a new home's Prefect server boots while the pipeline imports
    # torch, transformers' models, datasets, sklearn and GE load in the stages that need them,
    # inside the flow: its first stage starts without them, and its clock counts them.
    from flows.finetune import finetune, finetune_node
    from tasks import tracking

    if cfg.train.node_rank > 0:  # one more machine of node 0's run: it trains, node 0 registers
        with orchestrated(cfg, "run") as stored:
            node = finetune_node(config=stored)
        typer.echo(
            f"\nNode {node.node_rank} of {node.nnodes}: trained {node.global_step} steps in step "
            f"with node 0 (weights {node.weights_digest[:12]}); node 0 evaluates and registers"
        )
        typer.echo(f"MLflow run id:    {node.mlflow_run_id}\nWorking folder:   {node.workdir}")
        return
    with orchestrated(cfg, "run") as stored:
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


def logged_run(run_id: str, tracking_uri: str | None) -> tuple[Any, RunConfig]:
    """A past run and the config it logged, or a clean exit naming what is missing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.config import RunConfig

    setup_logging()
    use_tracking(tracking_uri)
    client = MlflowClient()
    try:
        run_info = client.get_run(run_id)
        logged = client.download_artifacts(run_id, "config/config.json")
    except MlflowException as err:
        fail(f"run {run_id}: {err.message}")
    return run_info, RunConfig.model_validate_json(Path(logged).read_text())


def check_data(cfg: RunConfig, work: Path) -> ValidatedData:
    """The config's data through its contract as a run's first stage sees it: the preflight, the
    model materialised, its tokenizer, the length the contract measures against. What ``check``
    and ``reproduce`` run.

    Raises:
        PreflightError, SourceError, DataValidationError: each naming the setting, file or rule.
    """
    from tasks.caching import cache_root
    from tasks.kinds import get_kind
    from tasks.preflight import max_positions, preflight
    from tasks.resolve import contract_settings, validation_length
    from tasks.sources import TokenizerSource, materialize_model
    from tasks.validate import validate_data

    facts = preflight(cfg)
    model = materialize_model(cfg.model, cache_root(cfg))
    tokenizer = TokenizerSource.of(model).get()
    length = validation_length(model, max_positions(facts))
    return validate_data(contract_settings(cfg), work, get_kind(cfg.task), tokenizer, length)


def validated(cfg: RunConfig, work: Path) -> ValidatedData:
    """:func:`check_data`, or a clean exit naming every problem."""
    from tasks.preflight import PreflightError
    from tasks.sources import REGISTRY_SCHEME, SourceError
    from tasks.validate import DataValidationError

    if cfg.model.name_or_path.startswith(REGISTRY_SCHEME):  # a registered version: its store
        use_tracking(cfg.tracking_uri())
    try:
        return check_data(cfg, work)
    except (PreflightError, SourceError, DataValidationError) as err:
        fail(str(err))
