"""Text classification: a pretrained encoder plus a new head, one label per text.

Selection by validation macro F1, class-weighted cross-entropy on skewed data, a collapse guard,
and a test evaluation against the majority class and TF-IDF + logistic regression.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    Trainer,
)

from tasks.config import ModelConfig, TrainConfig
from tasks.evaluate import EvalResult, evaluate
from tasks.kinds import Checked, Kind, TrainExtras
from tasks.metrics import classification_metrics
from tasks.promote import Decision, promote
from tasks.sources import resolve_model
from tasks.tokenize import encode


def setup_model(cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
    """The pretrained encoder plus a new head sized to ``labels``, every weight trainable."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(cfg.name_or_path),
        revision=cfg.revision,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        # A checkpoint that already has a head of another size gets a new one.
        ignore_mismatched_sizes=True,
    )
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def class_weights(cfg: TrainConfig, label_counts: list[int]) -> list[float] | None:
    """Loss weights per class id. ``auto``: sqrt of inverse frequency, mean weight 1 per row.

    The square root tempers the correction: a 65% majority class still counts, but it no longer
    drowns out the rest. On balanced data every weight is 1, i.e. plain cross-entropy.
    """
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != len(label_counts):
            raise ValueError(
                f"train.class_weights has {len(cfg.class_weights)} weights for "
                f"{len(label_counts)} labels"
            )
        return list(cfg.class_weights)
    counts = np.maximum(np.asarray(label_counts, dtype=float), 1.0)
    raw = np.sqrt(counts.sum() / (len(counts) * counts))
    raw /= (raw * counts).sum() / counts.sum()
    return [round(float(w), 6) for w in raw]


def weighted_loss(weights: list[float]) -> Callable[..., torch.Tensor]:
    """A ``Trainer`` ``compute_loss_func``: class-weighted cross-entropy."""
    weight = torch.tensor(weights)

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"].float()
        w = weight.to(logits.device)
        if num_items_in_batch is None:
            return F.cross_entropy(logits, labels, weight=w)
        # Summed and divided by the batch's item count, so gradient accumulation stays exact.
        return F.cross_entropy(logits, labels, weight=w, reduction="sum") / num_items_in_batch

    return loss


def collapse_check(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], majority: int
) -> tuple[str | None, float]:
    """Why the model is no better than guessing on validation, or None; and the majority's F1."""
    majority_f1 = classification_metrics(y_true, np.full_like(y_true, majority), labels)["macro_f1"]
    model_f1 = classification_metrics(y_true, y_pred, labels)["macro_f1"]
    predicted = np.unique(y_pred)
    if len(predicted) == 1:
        return (
            f"collapsed: every validation prediction is {labels[int(predicted[0])]!r}",
            majority_f1,
        )
    if model_f1 <= majority_f1:
        return (
            f"no better than the majority baseline on validation "
            f"(macro F1 {model_f1:.4f} <= {majority_f1:.4f})",
            majority_f1,
        )
    return None, majority_f1


def encode_kind(dataset: Dataset, tokenizer: Any, labels: list[str], cfg: ModelConfig) -> Dataset:
    """Token ids (truncated at ``max_length``, unpadded), integer labels and lengths."""
    encoded = encode(dataset, tokenizer, labels, cfg.max_length)
    return encoded.map(
        lambda b: {
            "length": [len(x) for x in b["input_ids"]],
            "truncated": [len(x) >= cfg.max_length for x in b["input_ids"]],
        },
        batched=True,
    )


def compute_metrics(labels: list[str]) -> Callable[[EvalPrediction], dict[str, float]]:
    """Validation accuracy and macro F1 for the Trainer (selection uses macro F1)."""

    def metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        y_true = np.asarray(prediction.label_ids)
        scores = classification_metrics(y_true, np.argmax(logits, -1), labels)
        return {k: scores[k] for k in ("accuracy", "macro_f1")}

    return metrics


def train_extras(cfg: TrainConfig, train: Dataset, labels: list[str]) -> TrainExtras:
    """Class weights for the loss (or class-balanced sampling), from the training labels."""
    ids = np.asarray(train["labels"])
    weights = class_weights(cfg, np.bincount(ids, minlength=len(labels)).tolist())
    return TrainExtras(
        compute_loss_func=weighted_loss(weights) if weights else None,
        sampler_labels=ids if cfg.balanced_sampling else None,
        notes={"train.class_weights": str(weights) if weights else "none"},
    )


def check(trainer: Trainer, validation: Dataset, labels: list[str], train: Dataset) -> Checked:
    """The selected model on validation: the numbers selection used, and the collapse guard."""
    prediction = trainer.predict(validation)
    logits = prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    y_val, p_val = np.asarray(prediction.label_ids), np.argmax(logits, -1)
    counts = np.bincount(np.asarray(train["labels"]), minlength=len(labels))
    collapse, majority_f1 = collapse_check(y_val, p_val, labels, int(np.argmax(counts)))
    return Checked(
        validation=classification_metrics(y_val, p_val, labels),
        reference={"majority_macro_f1": majority_f1},
        collapse=collapse,
    )


def evaluate_kind(
    model_dir: str,
    tokenized: Any,
    labels: list[str],
    splits: Any,
    model_cfg: ModelConfig,
    cfg: Any,
    train_cfg: TrainConfig,
    workdir: Path,
) -> EvalResult:
    return evaluate(model_dir, tokenized, labels, splits.train_path, splits.test_path, cfg, workdir)


def promote_kind(
    registered: Any,
    evaluation: EvalResult,
    labels: list[str],
    splits: Any,
    tokenized: Any,
    cfg: Any,
    blocked: str | None,
) -> Decision:
    return promote(registered, evaluation, labels, splits.test_path, cfg, blocked)


KIND = Kind(
    task="text-classification",
    pipeline_task="text-classification",
    signature=ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    ),
    headline="macro_f1",
    selection_metric="macro_f1",
    greater_is_better=True,
    encode=encode_kind,
    setup_model=setup_model,
    collator=DataCollatorWithPadding,
    compute_metrics=compute_metrics,
    train_extras=train_extras,
    check=check,
    evaluate=evaluate_kind,
    promote=promote_kind,
)
