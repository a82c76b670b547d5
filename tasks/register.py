"""Log the fine-tuned model with MLflow's transformers flavor and register a new version."""

from __future__ import annotations

from importlib.metadata import version

import mlflow
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from pydantic import BaseModel
from transformers import pipeline

from tasks.config import RegistryConfig

# Inferring requirements makes mlflow import torchvision, which is not a dependency; the model
# needs exactly these packages to load and predict.
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "mlflow")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
)


class RegisteredModel(BaseModel):
    """A registered model version and how to load it."""

    name: str
    version: str
    alias: str
    model_uri: str


def pip_requirements() -> list[str]:
    """The installed versions of what the model needs (local build tags such as +cpu dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def register_model(
    model_dir: str,
    cfg: RegistryConfig,
    run_id: str,
    input_example: list[str],
    version_tags: dict[str, str],
) -> RegisteredModel:
    """Log ``model_dir`` to the run as a text-classification model, register it, set the alias.

    The tokenizer saved beside the model is logged with it, so ``mlflow.pyfunc.load_model``
    returns something that takes raw strings and predicts labels from the declared set.
    """
    # A pipeline object rather than the folder path: mlflow's path-based flavor config does not
    # understand transformers 5's pipeline registry.
    classifier = pipeline("text-classification", model=model_dir, tokenizer=model_dir)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model=classifier,
            name="model",
            task="text-classification",
            registered_model_name=cfg.model_name,
            signature=SIGNATURE,
            input_example=input_example,
            pip_requirements=pip_requirements(),
        )
    version_ = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version_)
    for key, value in version_tags.items():
        client.set_model_version_tag(cfg.model_name, version_, key, value)
    return RegisteredModel(
        name=cfg.model_name,
        version=version_,
        alias=cfg.alias,
        model_uri=f"models:/{cfg.model_name}/{version_}",
    )
