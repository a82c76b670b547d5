"""Score the fine-tuned model on the held-out test split, next to the majority-class baseline."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from datasets import Dataset, load_from_disk
from pydantic import BaseModel
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix
from sklearn.pipeline import make_pipeline
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from tasks.config import EvalConfig
from tasks.metrics import classification_metrics
from tasks.sources import fingerprint
from tasks.tokenize import TokenizedData


class EvalResult(BaseModel):
    """Test-split metrics of the model and of both baselines, and where the details are."""

    metrics: dict[str, float]
    baseline: dict[str, float]
    classical: dict[str, float]
    majority_label: str
    test_rows: int
    test_fingerprint: str
    confusion_matrix: list[list[int]]
    confusion_matrix_png: str
    predictions_path: str

    headline_keys: tuple[str, ...] = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
    baseline_names: tuple[str, str] = ("majority baseline", "TF-IDF + LR")

    def artifacts(self) -> list[str]:
        return [self.confusion_matrix_png, self.predictions_path]

    def version_tags(self) -> dict[str, str]:
        return {
            "test.fingerprint": self.test_fingerprint,
            "test.macro_f1": f"{self.metrics['macro_f1']:.4f}",
        }

    def tables(self) -> dict[str, list[dict[str, str]]]:
        return {}

    def details_markdown(self) -> str:
        return f"Majority label: `{self.majority_label}`"


def classical_baseline(
    train_texts: list[str], train_labels: list[int], test_texts: list[str], seed: int = 42
) -> np.ndarray:
    """TF-IDF (word 1-2-grams) + logistic regression, fit on train, predicting test ids.

    The yardstick a fine-tuned transformer has to beat to be worth its compute.
    """
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=200_000),
        LogisticRegression(max_iter=2000, C=4.0, random_state=seed),
    )
    model.fit(train_texts, train_labels)
    return model.predict(test_texts)


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
    train_path: str,
    test_path: str,
    cfg: EvalConfig,
    workdir: Path,
    seed: int = 42,
) -> EvalResult:
    """Accuracy, macro P/R/F1, per-class P/R/F1 and a confusion matrix on the test split.

    The same rows are scored by the majority-class and the TF-IDF baselines, and the per-row
    predictions are saved so that a later model can be compared with this one row by row.
    """
    test = load_from_disk(tokenized.path)["test"].add_column(
        "row", list(range(tokenized.rows["test"]))
    )
    if cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
        test = test.shuffle(seed=seed).select(range(cfg.max_test_samples)).sort("row")
    rows = np.asarray(test["row"])
    y_true = np.asarray(test["labels"])
    # Sorted by length, batches hold texts of similar length and padding stays small.
    by_length = np.argsort(np.asarray(test["length"]), kind="stable")
    y_pred = np.empty_like(y_true)
    y_pred[by_length] = predict_ids(model_dir, test.select(by_length), cfg.batch_size, workdir)

    train_frame = pd.read_parquet(train_path)
    test_frame = pd.read_parquet(test_path).iloc[rows]
    label_ids = {label: i for i, label in enumerate(labels)}
    classical_pred = classical_baseline(
        train_frame["text"].tolist(),
        [label_ids[v] for v in train_frame["label"]],
        test_frame["text"].tolist(),
        seed,
    )
    train_label_counts = train_frame["label"].value_counts().to_dict()

    majority = majority_label(train_label_counts)
    baseline_pred = np.full_like(y_true, labels.index(majority))
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    png = plot_confusion(matrix, labels, workdir / "confusion_matrix.png")
    predictions_path = workdir / "test_predictions.json"
    predictions_path.write_text(
        json.dumps({"labels": labels, "y_true": y_true.tolist(), "y_pred": y_pred.tolist()})
    )
    return EvalResult(
        metrics=classification_metrics(y_true, y_pred, labels),
        baseline=classification_metrics(y_true, baseline_pred, labels),
        classical=classification_metrics(y_true, classical_pred, labels),
        majority_label=majority,
        test_rows=len(y_true),
        test_fingerprint=fingerprint(test_frame.reset_index(drop=True)),
        confusion_matrix=matrix.tolist(),
        confusion_matrix_png=str(png),
        predictions_path=str(predictions_path),
    )
