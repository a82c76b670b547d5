"""Task types. Each module here holds what differs between them; the stages ask the kind.

A :class:`Kind` bundles a task type's model class, tokenization, collator, selection metric,
validation-time checks, test evaluation, promotion gate and MLflow pipeline task. The flow and the
shared recipe (``tasks.train``) call these; they never branch on the task name themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


class TrainExtras(BaseModel):
    """Task-specific additions to the shared training recipe."""

    model_config = {"arbitrary_types_allowed": True}

    compute_loss_func: Any = None
    sampler_labels: Any = None  # per-row class ids: draw batches class-balanced
    notes: dict[str, str] = {}  # tags for the run, e.g. the class weights used


class Checked(BaseModel):
    """The selected model's validation scores and what the task's guards found."""

    validation: dict[str, float]
    reference: dict[str, float] = {}  # a yardstick on the same rows (e.g. the majority class)
    collapse: str | None = None  # why the model may never be promoted


@dataclass(frozen=True)
class Kind:
    """One task type: the parts of the pipeline that depend on it."""

    task: str
    pipeline_task: str  # the transformers pipeline and MLflow transformers-flavor task
    signature: Any  # mlflow ModelSignature of the registered model
    headline: str  # the test metric named in version tags and summaries
    selection_metric: str  # Trainer's metric_for_best_model (without the eval_ prefix)
    greater_is_better: bool
    encode: Callable[..., Any]  # (Dataset, tokenizer, labels, ModelConfig) -> Dataset
    setup_model: Callable[..., Any]  # (ModelConfig, labels) -> PreTrainedModel
    collator: Callable[..., Any]  # (tokenizer) -> data collator
    compute_metrics: Callable[..., Any]  # (labels) -> Trainer compute_metrics or None
    train_extras: Callable[..., TrainExtras]  # (TrainConfig, train Dataset, labels)
    check: Callable[..., Checked]  # (Trainer, validation Dataset, labels, train Dataset)
    evaluate: Callable[..., Any]  # (model_dir, tokenized, labels, splits, ModelConfig, EvalConfig,
    #                                TrainConfig, workdir) -> an evaluation result
    promote: Callable[..., Any]  # (registered, evaluation, labels, splits, tokenized, cfg, blocked)
    inference_config: Callable[..., dict[str, Any]] = field(default=lambda eval_cfg: {})


def get_kind(task: str) -> Kind:
    """The kind of a config's ``task``."""
    from tasks.kinds import causal_lm, classification

    kinds = {k.task: k for k in (classification.KIND, causal_lm.KIND)}
    if task not in kinds:
        raise ValueError(f"unknown task {task!r} (known: {sorted(kinds)})")
    return kinds[task]
