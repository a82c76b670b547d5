"""Log the fine-tuned model with MLflow's transformers flavor and register a new version."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from tasks.config import RegistryConfig
from tasks.results import RegisteredModel

if TYPE_CHECKING:
    from tasks.kinds import Kind

if TYPE_CHECKING:  # transformers is imported where a model is logged: `lineage` needs neither
    pass

# Inferring requirements makes mlflow import torchvision, which is not a dependency; the model
# needs exactly these packages to load and predict.
PROJECT_DIR = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "mlflow")


def pip_requirements() -> list[str]:
    """The installed versions of what the model needs (local build tags such as +cpu dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def git_commit(path: Path = PROJECT_DIR) -> str | None:
    """The commit of the code that ran (with ``-dirty`` when tracked files changed), if in git:
    MLflow's own git lookup (GitPython), as for its ``mlflow.source.git.commit`` tag."""
    from mlflow.utils.git_utils import get_git_commit

    commit = get_git_commit(str(path))
    if commit is None:
        return None
    try:
        from git import Repo

        dirty = Repo(path, search_parent_directories=True).is_dirty(untracked_files=False)
    except Exception:  # GitPython raises its own errors for a broken or foreign repository
        dirty = False
    return commit + ("-dirty" if dirty else "")


def lineage_tags(run_id: str, flow_run_id: str, data: Any, config_hash: str) -> dict[str, str]:
    """The tags that tie a model version to everything that produced it."""
    tags = {
        "lineage.mlflow_run_id": run_id,
        "lineage.prefect_flow_run_id": flow_run_id,
        "lineage.data_fingerprint": data.fingerprint,
        "lineage.validation": f"runs:/{run_id}/validation/validation.json",
        "lineage.validation_success": "true",
        "lineage.config_hash": config_hash,
        "lineage.config": f"runs:/{run_id}/config/config.json",
    }
    commit = git_commit()
    if commit:
        tags["lineage.git_commit"] = commit
    return tags


def describe_lineage(model_uri: str) -> list[tuple[str, str]]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the lineage chain, as rows."""
    name, version = resolve_model_uri(model_uri)
    client = MlflowClient()
    mv = client.get_model_version(name, version)
    if not mv.run_id:
        raise ValueError(f"{model_uri}: the version has no MLflow run")
    run = client.get_run(mv.run_id)
    rows = [
        ("model", f"{name} version {mv.version} (aliases: {', '.join(mv.aliases) or 'none'})"),
        ("mlflow run", f"{mv.run_id} ({run.info.status}, experiment {run.info.experiment_id})"),
    ]
    state = mv.tags.get(REGISTRATION_TAG, "complete")
    if state != "complete":
        rows.append(("registration", f"{state.upper()}: no model card or gate decision"))
    for key in sorted(mv.tags):
        if key.startswith(("lineage.", "promotion.", "test.")) and key != "lineage.mlflow_run_id":
            rows.append((key, mv.tags[key]))
    task = run.data.tags.get("fulltune.task", "text-classification")
    from tasks.kinds import get_kind

    metric = mv.tags.get("promotion.metric") or get_kind(task).gate_metrics[0]
    for key in sorted(run.data.metrics):
        if key.startswith(("test/", "yardstick/")) and key.endswith(f"/{metric}"):
            rows.append((f"metric {key}", f"{run.data.metrics[key]:.4f}"))
    rows.append(("chain", " <- ".join(lineage_chain(client, mv))))
    return rows


def lineage_chain(client: MlflowClient, mv: Any) -> list[str]:
    """This version, the version it started from, that one's parent, … down to the base model."""
    chain, seen = [f"models:/{mv.name}/{mv.version}"], set()
    while (parent := mv.tags.get("lineage.parent_model")) and parent not in seen:
        seen.add(parent)
        name, _, version = parent.removeprefix("models:/").partition("/")
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            chain.append(f"{parent} (deleted)")
            return chain
        chain.append(parent)
    run = client.get_run(mv.run_id) if mv.run_id else None
    base = run.data.params.get("model.name_or_path") if run else None
    chain.append(base or "base model unknown")
    return chain


def describe_version(registered: RegisteredModel, facts: CardFacts, decision: str) -> None:
    """Put the gate's decision into the version's model card (its description)."""
    MlflowClient().update_model_version(
        registered.name, registered.version, description=model_card(facts, decision)
    )


def resolve_model_uri(model_uri: str) -> tuple[str, str]:
    """(name, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Raises:
        ValueError: the URI is malformed, or the alias or version does not exist.
    """
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    ref = model_uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = ref.partition("/")
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as err:
        raise ValueError(f"{model_uri}: no such registered model version ({err.message})") from err


LOGGED_MODEL = "model"


class CardFacts(BaseModel):
    """What a model card says about one version (see :func:`model_card`)."""

    task: str
    base_model: str  # as the user named it (hub id, folder, pkg:// or .gguf), not a work path
    data: str
    data_fingerprint: str
    rows: dict[str, int]
    labels: list[str]
    metrics_table: str  # the test metrics beside the task's yardsticks (Markdown)
    test_rows: int
    collapse: str | None = None
    license: str | None = None  # the base model's (see :func:`base_license`)
    capability: str = ""  # general capability before and after (Markdown), when measured
    forgetting: list[str] = []  # what it forgot beyond promote.max_forgetting: never a candidate


def base_license(base_model: str) -> str | None:
    """The base model's license, from its own model card (README front matter) when it has one."""
    from huggingface_hub import ModelCard

    from tasks.sources import SourceError, resolve_local

    try:
        path = resolve_local(base_model.removesuffix(".gguf"))
    except SourceError:
        return None
    candidates = [path / "README.md", path.parent / "README.md"] if path else []
    for readme in candidates:
        if readme.is_file():
            try:
                return ModelCard.load(readme).data.license
            except Exception:  # a README without card metadata: no license stated
                return None
    return None


def model_card(facts: CardFacts, decision: str | None = None) -> str:
    """The version's model card (Markdown): base model and license, data, results, limits."""
    lines = [
        f"# {facts.task} model fine-tuned by fulltune",
        "",
        f"- **Base model**: `{facts.base_model}` (license: {facts.license or 'not stated'})",
        "- **Training**: full-parameter fine-tuning (every weight updated)",
        f"- **Data**: `{facts.data}`, fingerprint `{facts.data_fingerprint}`; rows "
        + ", ".join(f"{split} {n}" for split, n in facts.rows.items()),
    ]
    if facts.labels:
        lines.append(f"- **Labels**: {', '.join(facts.labels)}")
    lines += ["", f"## Results on {facts.test_rows} held-out test rows", "", facts.metrics_table]
    if facts.capability:
        lines += ["", "## General capability (what the fine-tuning cost)", "", facts.capability]
        verdict = (
            "**Forgot too much**: " + "; ".join(facts.forgetting) + ". Not for production."
            if facts.forgetting
            else "Within `promote.max_forgetting`."
        )
        lines += ["", verdict]
    if decision:
        lines += ["", "## Promotion gate", "", decision]
    lines += [
        "",
        "## Limits",
        "",
        "- Measured on the test split of the data above only: other text (another domain, "
        "language or time) may score lower.",
        "- The base model's biases and license carry over to this model.",
    ]
    if facts.collapse:
        lines.append(f"- The collapse guard fired: {facts.collapse}. Not for production.")
    return "\n".join(lines) + "\n"


def logged_model_uri(client: MlflowClient, run_id: str) -> str | None:
    """The model this run logged completely (READY) in an earlier attempt, if any."""
    from mlflow.entities import LoggedModelStatus

    experiment = client.get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{run_id}' AND name = '{LOGGED_MODEL}'",
        output_format="list",
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None


REGISTRATION_TAG = "fulltune.registration"  # incomplete, complete or interrupted


def complete_registration(registered: RegisteredModel) -> None:
    """The version has its card, tags and the gate's decision: mark it complete."""
    MlflowClient().set_model_version_tag(
        registered.name, registered.version, REGISTRATION_TAG, "complete"
    )


def mark_interrupted_versions(client: MlflowClient, model_name: str) -> list[str]:
    """Versions whose registration was cut short (their run ended before marking them complete):
    tagged ``interrupted`` and described as such, never left looking whole. Their versions."""
    try:
        versions = client.search_model_versions(
            f"name = '{model_name}' and tags.`{REGISTRATION_TAG}` = 'incomplete'"
        )
    except MlflowException:
        return []
    marked = []
    for mv in versions:
        status = client.get_run(mv.run_id).info.status if mv.run_id else "gone"
        if status == "RUNNING":
            continue  # still being registered, by its own run (or its resume)
        client.set_model_version_tag(model_name, mv.version, REGISTRATION_TAG, "interrupted")
        client.update_model_version(
            model_name,
            mv.version,
            description=f"**Incomplete version.** Its registration was interrupted: its run "
            f"`{mv.run_id}` ended {status} before the model card and the gate's decision were "
            "written. It is not a candidate for promotion; rerun the config to register a whole "
            "version.\n\n" + (mv.description or ""),
        )
        marked.append(str(mv.version))
    return marked


def register_model(
    model_dir: str,
    cfg: RegistryConfig,
    run_id: str,
    kind: Kind,
    input_example: Any,
    version_tags: dict[str, str],
    inference_config: dict[str, Any] | None = None,
    card: CardFacts | None = None,
) -> RegisteredModel:
    """Log ``model_dir`` to the run as the kind's pipeline, register it, set the alias.

    The flavor's task is the kind's ``mlflow_task``: the pipeline's own, or ``llm/v1/chat`` for a
    chat model (pyfunc then takes OpenAI-style ``messages`` and applies the saved chat template).

    The tokenizer saved beside the model is logged with it, so ``mlflow.pyfunc.load_model``
    returns something that takes raw strings: a classifier predicts labels from the declared set,
    a text-generation model continues the text (with ``inference_config``'s generation settings).

    Idempotent, so a retry after a failure part-way (a lost connection) finishes the job instead of
    repeating it: a model the run already logged completely is reused, a version already
    registered from the run is reused, and a version is created with its tags in the same call,
    so no version ever exists without them.
    """
    client = MlflowClient()
    model_uri = logged_model_uri(client, run_id)
    if model_uri is None:
        from transformers import pipeline

        # A pipeline object rather than the folder path: mlflow's path-based flavor config does
        # not understand transformers 5's pipeline registry.
        model = pipeline(kind.pipeline_task, model=model_dir, tokenizer=model_dir)  # type: ignore[call-overload]
        hub_card = None
        if card is not None:
            from huggingface_hub import ModelCard, ModelCardData

            # The flavor records the model's name as its source: the base model, not a work
            # folder; the card (README.md, and the LICENSE note) comes from us, not the hub.
            model.model.config._name_or_path = card.base_model
            data = ModelCardData(license=card.license, base_model=card.base_model)
            hub_card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{model_card(card)}")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(
                transformers_model=model,
                name=LOGGED_MODEL,
                task=kind.mlflow_task,
                signature=kind.signature(),
                input_example=input_example,
                pip_requirements=pip_requirements(),
                model_config=inference_config or None,
                model_card=hub_card,
            )
        model_uri = info.model_uri
        # log_model ran inside `start_run`, whose exit marked the run FINISHED: it is not yet.
        client.update_run(run_id, status="RUNNING")
    mark_interrupted_versions(client, cfg.model_name)
    existing = client.search_model_versions(f"name = '{cfg.model_name}' and run_id = '{run_id}'")
    tags = version_tags | {REGISTRATION_TAG: "incomplete"}  # until the gate has spoken
    if existing:
        version_ = str(existing[0].version)
        for key, value in tags.items():
            client.set_model_version_tag(cfg.model_name, version_, key, value)
    else:
        version_ = str(mlflow.register_model(model_uri, cfg.model_name, tags=tags).version)
    if card is not None:
        client.update_model_version(cfg.model_name, version_, description=model_card(card))
        registered = client.get_registered_model(cfg.model_name)
        if not registered.description:
            client.update_registered_model(
                cfg.model_name,
                description=f"{card.task} models fully fine-tuned from `{card.base_model}` by "
                "fulltune. `@champion` is the version the promotion gate chose (what production "
                "loads); `@challenger` is the newest. Each version's description is its model "
                "card; its tags hold its lineage and the gate's decision.",
            )
    never = card is not None and (card.collapse or card.forgetting)
    alias = None if never else cfg.alias
    if alias is not None:  # a collapsed or forgetful model is kept for inspection only
        client.set_registered_model_alias(cfg.model_name, alias, version_)
    return RegisteredModel(
        name=cfg.model_name,
        version=version_,
        alias=alias,
        model_uri=f"models:/{cfg.model_name}/{version_}",
    )
