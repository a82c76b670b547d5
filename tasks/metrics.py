"""Classification metrics shared by validation during training and the final test evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: list[str]
) -> dict[str, float]:
    """Accuracy, macro P/R/F1 and per-class P/R/F1 (``f1/<label>``), as plain floats.

    Classes that are never predicted score 0 precision rather than raising a warning: a model that
    ignores a class should look bad, not noisy.
    """
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average=None, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
    }
    for i, label in enumerate(labels):
        metrics[f"precision/{label}"] = float(precision[i])
        metrics[f"recall/{label}"] = float(recall[i])
        metrics[f"f1/{label}"] = float(f1[i])
        metrics[f"support/{label}"] = float(support[i])
    return metrics
