"""Everything about a run that can be known before it starts, checked before anything starts.

The flow calls :func:`preflight` before it creates an MLflow run or loads a model. Each problem
names the setting at fault and what was found; all problems are reported at once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tasks.config import RunConfig, redact_uri
from tasks.sources import (
    PKG_SCHEME,
    REGISTRY_SCHEME,
    SourceError,
    gguf_source,
    header_columns,
    refuse_special,
    registered_artifacts,
    registered_source,
    resolve_local,
    separator_hint,
    weights_in,
)

log = logging.getLogger(__name__)

# A served deployment sets these (``fulltune serve --allow``): the only folders a triggered run may
# read data from or write its home in, and the only tracking stores it may write to.
ALLOWED_ROOTS_ENV = "FULLTUNE_ALLOWED_ROOTS"
ALLOWED_TRACKING_ENV = "FULLTUNE_ALLOWED_TRACKING_URIS"


class PreflightError(ValueError):
    """One or more settings that would make the run fail; each line names its setting."""


def preflight(cfg: RunConfig) -> dict[str, Any]:
    """Check the run's settings; return the facts learned (the model's config).

    Raises:
        PreflightError: listing every problem found, each with its setting.
    """
    problems: list[str] = []
    refused = check_allowed(cfg)
    problems += refused
    problems += check_home(cfg)
    data_problems = check_data(cfg)
    problems += data_problems
    if not data_problems and not refused:
        problems += check_columns(cfg)
    problems += check_registry(cfg)
    problems += check_gate_metric(cfg)
    problems += check_training(cfg)
    if not any(p.startswith("eval.") for p in refused):  # never read a file outside the list
        problems += check_evaluation(cfg)
    model_config, model_problems = check_model(cfg)
    problems += model_problems
    if not problems:  # a store check on a home that cannot be written would only repeat it
        problems += check_tracking(cfg)
    if problems:
        raise PreflightError("the run cannot start:\n" + "\n".join(f"  {p}" for p in problems))
    return model_config


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be created, and a file can be written in it.

    Tried for real (create the folder, write and delete a probe): permission bits say nothing
    for root, and nothing about read-only mounts or a parent that is a file.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_home(cfg: RunConfig) -> list[str]:
    home = cfg.home_dir()
    if home.exists() and not home.is_dir():
        return [f"home: {home} exists and is not a folder"]
    if not _writable(home):
        return [f"home: {home} cannot be created or written (check the path and permissions)"]
    return []


def check_data(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.data.train is None:
        problems.append(
            "data.train: no training data given. Name a file (--set data.train=reviews.csv, "
            "with data.text_column and data.label_column), or run the demo's config "
            "(--config configs/demo.yaml)"
        )
    for setting in ("train", "validation", "test"):
        name = getattr(cfg.data, setting)
        if name is None:
            continue
        try:
            path = resolve_local(name)
        except SourceError as err:
            problems.append(f"data.{setting}: {err}")
            continue
        if path is None:  # a hub dataset id: read (and checked) by validation
            continue
        if not os.access(path, os.R_OK):
            problems.append(f"data.{setting}: {path} is not readable (check its permissions)")
        elif not path.is_dir() and not path.is_file():
            try:
                refuse_special(path)
            except SourceError as err:
                problems.append(f"data.{setting}: {err}")
        elif path.is_dir() and not _is_saved_dataset(path):
            problems.append(
                f"data.{setting}: {path} is a folder, but not one saved by HF datasets "
                "(save_to_disk); give a CSV, TSV, JSONL, Parquet or .txt file"
            )
    return problems


def check_columns(cfg: RunConfig) -> list[str]:
    """The configured columns are in each local table's header, checked before any run starts;
    a missing one is named with the columns found and the nearest of them."""
    import difflib

    from tasks.kinds import get_kind

    kind = get_kind(cfg.task)
    problems = []
    for split in ("train", "validation", "test"):
        name = getattr(cfg.data, split)
        try:
            path = resolve_local(name) if name else None
        except SourceError:
            continue  # reported by check_data
        found = header_columns(path) if path is not None and path.is_file() else None
        if not found:
            continue
        for setting, column in kind.columns(found, cfg.data).items():
            if column in found:
                continue
            near = difflib.get_close_matches(column, found, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r} (--set {setting}={near[0]})?" if near else ""
            problems.append(
                f"{setting}: required column {column!r} is not in {path} (columns found: "
                f"{found}{separator_hint(found)}){hint}"
            )
    return problems


def check_gate_metric(cfg: RunConfig) -> list[str]:
    """``promote.metric`` is one the task's kind can be judged by."""
    from tasks.kinds import get_kind

    metrics = get_kind(cfg.task).gate_metrics
    if cfg.promote.metric is None or cfg.promote.metric in metrics:
        return []
    return [
        f"promote.metric {cfg.promote.metric!r} does not fit task {cfg.task!r}: use "
        + " or ".join(metrics)
    ]


def check_evaluation(cfg: RunConfig) -> list[str]:
    """The general text and the lm-eval task folder are there before anything trains."""
    from tasks.lm_scoring import read_general_texts

    problems = []
    if cfg.eval.general_text:
        try:
            read_general_texts(cfg.eval.general_text, cfg.eval.general_text_column)
        except (SourceError, ValueError) as err:
            message = str(err)
            prefix = "" if message.startswith("eval.general_text") else "eval.general_text: "
            problems.append(prefix + message)
    include = cfg.eval.lm_eval.include_path
    if include and not Path(include).expanduser().is_dir():
        problems.append(f"eval.lm_eval.include_path: {include} is not a folder of task YAMLs")
    return problems


def check_training(cfg: RunConfig) -> list[str]:
    """Training settings that need a package this environment lacks."""
    if cfg.train.optim == "adamw_torch_8bit" and importlib.util.find_spec("torchao") is None:
        return [
            "train.optim: adamw_torch_8bit needs torchao, which is not installed "
            "(`pip install torchao`, or `pip install 'fulltune[lowmem]'`); or use adamw_torch"
        ]
    return []


def _is_saved_dataset(path: Path) -> bool:
    return any(
        (path / marker).exists()
        for marker in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def check_registry(cfg: RunConfig) -> list[str]:
    """Names MLflow would refuse, checked with MLflow's own validators."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_experiment_name,
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    checks = [
        ("registry.experiment", _validate_experiment_name, cfg.registry.experiment),
        ("registry.model_name", _validate_model_name, cfg.registry.model_name),
        ("registry.alias", _validate_model_alias_name, cfg.registry.alias),
        ("registry.alias", _validate_model_alias_name_reserved, cfg.registry.alias),
        ("promote.alias", _validate_model_alias_name, cfg.promote.alias),
        ("promote.alias", _validate_model_alias_name_reserved, cfg.promote.alias),
    ]
    problems = []
    for setting, validate, value in checks:
        try:
            validate(value)
        except MlflowException as err:
            problems.append(f"{setting}: {err.message}")
    if cfg.promote.enabled and cfg.registry.alias == cfg.promote.alias:
        problems.append(
            f"registry.alias: {cfg.registry.alias!r} is also promote.alias; the new version's "
            "alias and the champion's must differ"
        )
    return problems


def check_model(cfg: RunConfig) -> tuple[dict[str, Any], list[str]]:
    """The model's config as a dict (read without loading weights), and problems found.

    A local folder's ``config.json`` is read as JSON: transformers' ``AutoConfig`` would import
    torch (seconds) before the run's first stage, which needs neither. A GGUF file's metadata and
    a hub model's config go through ``AutoConfig`` (which downloads, or reads the local cache).
    """
    model = cfg.model
    setting = "model.name_or_path"
    try:
        if model.name_or_path.startswith(REGISTRY_SCHEME):  # a registered version: it resolves
            return registered_config(model.name_or_path), []
        gguf = gguf_source(model.name_or_path, model.gguf_file)
        path = resolve_local(model.name_or_path) if gguf is None else None
        if gguf is not None:
            folder, file_name = gguf
            local = Path(folder) / file_name
            if Path(folder).exists() and not local.is_file():
                return {}, [f"model.gguf_file: {file_name!r} is not in {folder}"]
            facts = _auto_config(folder, gguf_file=file_name)
        elif path is not None:
            if not (path / "config.json").is_file():
                return {}, [f"{setting}: {path} has no config.json (not a model folder)"]
            try:
                facts = json.loads((path / "config.json").read_text("utf-8"))
            except ValueError as err:
                return {}, [f"{setting}: {path / 'config.json'} is not valid JSON: {err}"]
            if not isinstance(facts, dict):
                return {}, [f"{setting}: {path / 'config.json'} is not a JSON object"]
        else:
            facts = _auto_config(model.name_or_path, revision=model.revision)
    except SourceError as err:
        return {}, [str(err) if str(err).startswith("model.") else f"{setting}: {err}"]
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {}, [
            f"{setting}: {model.name_or_path!r} is neither a local model folder nor a model the "
            f"Hugging Face hub (or its local cache, when offline) could provide: {first}"
        ]
    limit = max_positions(facts)
    problems = []
    if limit is not None and model.max_length != "auto" and model.max_length > limit:
        problems.append(
            f"model.max_length: {model.max_length} is more than the {limit} positions "
            f"{model.name_or_path} was trained with (max_position_embeddings); use at most {limit}"
        )
    return facts, problems


def registered_config(uri: str) -> dict[str, Any]:
    """The model config of the registered version ``uri`` names (read in place from a local
    store; a remote store's config is read when the run gathers the version)."""
    import tempfile

    source = registered_source(uri)
    with tempfile.TemporaryDirectory() as staging:
        root = registered_artifacts(source.name, source.version, Path(staging))
        model_dir, _ = weights_in(root, source.pinned)
        facts: dict[str, Any] = json.loads((model_dir / "config.json").read_text("utf-8"))
    return facts


def _auto_config(name_or_path: str, **kwargs: Any) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    facts: dict[str, Any] = json.loads(config.to_json_string())
    return facts


def warn_lost_store(cfg: RunConfig, database: Path) -> None:
    """Say so, loudly, when a home holds earlier runs' models but its tracking database is gone:
    a new, empty registry is about to be created and versions start again at 1."""
    artifacts = cfg.home_dir() / "mlartifacts"
    models = list(artifacts.glob("**/MLmodel")) if artifacts.is_dir() else []
    if models:
        log.warning(
            "NO TRACKING DATABASE at %s, but %s holds %d model(s) of earlier runs: a new, empty "
            "registry is created and versions restart at 1. If the database was moved or "
            "deleted by mistake, stop now (Ctrl-C) and restore it, or point "
            "registry.tracking_uri at it.",
            database,
            artifacts,
            len(models),
        )


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest input a model's position embeddings cover, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_tracking(cfg: RunConfig) -> list[str]:
    """The tracking store can be written (a local file) or answers (a server)."""
    uri = cfg.tracking_uri()
    setting = (
        "MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else ("registry.tracking_uri" if cfg.registry.tracking_uri else "home (its mlflow.db)")
    )
    shown = redact_uri(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("sqlite", "file", ""):
        raw = uri.removeprefix("sqlite:///") if parsed.scheme == "sqlite" else parsed.path or uri
        path = Path(urllib.parse.unquote(raw))
        if parsed.scheme == "sqlite" and path.is_dir():
            return [f"{setting}: {shown}: {path} is a folder, not a database file"]
        if not _writable(path.parent if parsed.scheme == "sqlite" else path):
            return [f"{setting}: {shown}: {path} cannot be created or written"]
        if parsed.scheme == "sqlite" and path.exists() and not os.access(path, os.W_OK):
            return [f"{setting}: {shown}: {path} is read-only"]
        if parsed.scheme == "sqlite" and not path.exists():
            warn_lost_store(cfg, path)
        return []
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=15):
                return []
        except OSError as err:
            return [f"{setting}: the MLflow server at {shown} does not answer ({err})"]
    return []  # a database URI: MLflow connects on first use and names it if it cannot


def check_allowed(cfg: RunConfig) -> list[str]:
    """Under a served deployment's allow-list: every local path and the store must be on it.

    Each path-like setting is judged by the file it really reaches (``~``, ``..`` and symlinks
    followed, see :func:`local_paths`); a ``pkg://`` path is held inside its package instead.
    """
    roots_env = os.environ.get(ALLOWED_ROOTS_ENV)
    uris_env = os.environ.get(ALLOWED_TRACKING_ENV)
    problems = []
    if roots_env:
        roots = [Path(r).expanduser().resolve() for r in roots_env.split(os.pathsep) if r]
        for setting, path in local_paths(cfg).items():
            if not any(path.is_relative_to(root) for root in roots):
                problems.append(
                    f"{setting}: {path} is outside the deployment's allowed folders "
                    f"({', '.join(map(str, roots))}; {ALLOWED_ROOTS_ENV})"
                )
    if uris_env:
        allowed = [u for u in uris_env.split(" ") if u]
        if cfg.tracking_uri() not in allowed:
            problems.append(
                f"registry.tracking_uri: {redact_uri(cfg.tracking_uri())} is not one of the "
                f"deployment's tracking stores ({ALLOWED_TRACKING_ENV})"
            )
    return problems


def local_paths(cfg: RunConfig) -> dict[str, Path]:
    """Every path-like setting that names a local file or folder, as the real path it reaches.

    Not here: a hub id (no such local path, no ``.``, ``/`` or ``~`` prefix), a ``pkg://`` path
    (confined to its installed package by :func:`resolve_package_path`) and ``model.gguf_file``
    (confined to ``model.name_or_path`` by :func:`gguf_source`).
    """
    values = {
        "home": cfg.home,
        "data.train": cfg.data.train,
        "data.validation": cfg.data.validation,
        "data.test": cfg.data.test,
        "model.name_or_path": cfg.model.name_or_path,
        "eval.general_text": cfg.eval.general_text,
        "eval.lm_eval.include_path": cfg.eval.lm_eval.include_path,
    }
    paths: dict[str, Path] = {}
    for setting, value in values.items():
        if value is None or value.startswith(PKG_SCHEME):
            continue
        path = Path(value).expanduser()
        if setting == "home" or path.exists() or value.startswith((".", "/", "~")):
            paths[setting] = path.resolve()
    return paths
