"""Score the fine-tuned model on the held-out test split, next to the majority-class baseline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
from datasets import Dataset, load_from_disk
from pydantic import BaseModel
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from tasks.config import EvalConfig
from tasks.metrics import classification_metrics
from tasks.tokenize import TokenizedData


class EvalResult(BaseModel):
    """Test-split metrics of the model and of the majority baseline, and the plot's path."""

    metrics: dict[str, float]
    baseline: dict[str, float]
    majority_label: str
    test_rows: int
    confusion_matrix: list[list[int]]
    confusion_matrix_png: str


def majority_label(train_label_counts: dict[str, int]) -> str:
    """The most frequent training label (ties go to the first in sorted order)."""
    return max(sorted(train_label_counts), key=lambda label: train_label_counts[label])


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> Path:
    """Write the confusion matrix (rows: true label, columns: predicted) as a PNG."""
    size = max(4.0, 0.9 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=labels).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def predict_ids(model_dir: str, dataset: Dataset, batch_size: int, workdir: Path) -> np.ndarray:
    """Predicted class ids for a tokenized dataset (dynamic padding, no gradients)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(workdir / "predict"),
            per_device_eval_batch_size=batch_size,
            report_to="none",
            disable_tqdm=False,
        ),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    logits = trainer.predict(dataset).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return np.asarray(logits).argmax(-1)


def evaluate(
    model_dir: str,
    tokenized: TokenizedData,
    labels: list[str],
    train_label_counts: dict[str, int],
    cfg: EvalConfig,
    workdir: Path,
    seed: int = 42,
) -> EvalResult:
    """Accuracy, macro P/R/F1, per-class P/R/F1 and a confusion matrix on the test split."""
    test = load_from_disk(tokenized.path)["test"]
    if cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
        test = test.shuffle(seed=seed).select(range(cfg.max_test_samples))
    # Sorted by length, batches hold texts of similar length and padding stays small.
    test = test.sort("length")
    y_true = np.asarray(test["labels"])
    y_pred = predict_ids(model_dir, test, cfg.batch_size, workdir)

    majority = majority_label(train_label_counts)
    baseline_pred = np.full_like(y_true, labels.index(majority))
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    png = plot_confusion(matrix, labels, workdir / "confusion_matrix.png")
    return EvalResult(
        metrics=classification_metrics(y_true, y_pred, labels),
        baseline=classification_metrics(y_true, baseline_pred, labels),
        majority_label=majority,
        test_rows=len(y_true),
        confusion_matrix=matrix.tolist(),
        confusion_matrix_png=str(png),
    )
