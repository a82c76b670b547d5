"""Label metrics and the classical yardstick, shared by the kinds that predict labels (a
classifier, an instruction-tuned LM answering from a closed set), from sklearn.

sklearn and scipy load in the functions that use them (about a second), not with the module: the
kinds import it, and a run's data contract starts before anything here is needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np

from tasks import caching
from tasks.results import Evidence


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: list[str]
) -> dict[str, float]:
    """Accuracy, macro P/R/F1 and per-class P/R/F1 (``f1/<label>``), as plain floats.

    Classes that are never predicted score 0 precision rather than raising a warning: a model that
    ignores a class should look bad, not noisy.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

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


def gate_statistic(metric: str, n_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """``metric(y_true, y_pred)`` over the declared classes, for the gate's bootstrap.

    A prediction outside the declared set (a champion with another label set predicts -1) is
    simply wrong: it counts against the true class's recall and no class's precision.
    """
    if metric == "accuracy":
        return lambda y, p: float(np.mean(y == p))
    if metric == "macro_f1":
        return lambda y, p: macro_f1(y, p, n_classes)
    raise ValueError(f"promote.metric {metric!r} is not a classification metric")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro F1 over classes ``0..n_classes-1``, as sklearn's ``f1_score(average="macro",
    zero_division=0)`` computes it, from counts: F1 = 2 TP / (predicted + true) per class.

    The gate's bootstrap calls this once per resample and model (2,000 times by default): from
    counts it takes microseconds, where sklearn's input checking took 4.4 s on the demo's 3,764
    rows.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    declared = (y_pred >= 0) & (y_pred < n_classes)
    hits = np.bincount(y_true[declared & (y_true == y_pred)], minlength=n_classes)
    predicted = np.bincount(y_pred[declared], minlength=n_classes)
    actual = np.bincount(y_true, minlength=n_classes)
    both = predicted + actual
    f1 = np.divide(2.0 * hits, both, out=np.zeros(n_classes), where=both > 0)
    return float(f1.mean())


def tfidf_baseline(
    train_texts: list[str],
    train_labels: Sequence[int],
    test_texts: list[str],
    seed: int,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """TF-IDF (word 1-2-grams) + logistic regression, fit on train, predicting test ids.

    The yardstick a fine-tuned transformer has to beat to be worth its compute. Its fit is the
    slowest thing a run does outside forward and backward passes (docs/benchmarks.md), and
    it depends only on the rows, the labels and the seed: with ``cache_dir`` its predictions are
    kept there under a key of exactly those (and this code and sklearn's version), so a run on
    data the home has seen reuses them.
    """
    if cache_dir is None:
        return _fit_tfidf(train_texts, train_labels, test_texts, seed)
    key = caching.digest(
        _texts_digest(train_texts),
        list(map(int, train_labels)),
        _texts_digest(test_texts),
        seed,
        version("scikit-learn"),
        caching.code_version(_fit_tfidf),
    )
    folder = caching.entry(cache_dir, "yardstick", key)
    if caching.is_complete(folder):
        return np.load(folder / "predictions.npy")
    predictions = _fit_tfidf(train_texts, train_labels, test_texts, seed)
    with caching.building(folder) as staging:
        np.save(staging / "predictions.npy", predictions)
    return predictions


def _texts_digest(texts: list[str]) -> str:
    return hashlib.sha256("\x1f".join(texts).encode("utf-8", "surrogatepass")).hexdigest()


def _fit_tfidf(
    train_texts: list[str], train_labels: Sequence[int], test_texts: list[str], seed: int
) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=200_000),
        LogisticRegression(max_iter=2000, C=4.0, random_state=seed),
    )
    model.fit(train_texts, train_labels)
    return np.asarray(model.predict(test_texts))


def paired_bootstrap(
    evidence: Evidence, champion: tuple[np.ndarray, ...], samples: int, seed: int
) -> tuple[float, float, float]:
    """(observed improvement, 2.5th, 97.5th percentile), resampling the same rows for both.

    The improvement is positive when the challenger is better, whatever the metric's direction.
    Both models are scored on the same resampled rows each time, so the interval is about the
    difference between the models rather than the noise of the test set.
    """
    sign = 1.0 if evidence.higher_is_better else -1.0
    k = len(evidence.columns)

    def improvement(*columns: np.ndarray) -> float:
        return sign * (evidence.statistic(*columns[:k]) - evidence.statistic(*columns[k:]))

    return paired_interval((*evidence.columns, *champion), improvement, samples, seed)


def paired_interval(
    data: tuple[np.ndarray, ...], statistic: Callable[..., float], samples: int, seed: int
) -> tuple[float, float, float]:
    """(statistic on all rows, 2.5th, 97.5th percentile) of a paired percentile bootstrap: every
    resample draws the same rows from each column. Fewer than two rows: no interval."""
    from scipy.stats import bootstrap

    observed = statistic(*data)
    if len(data[0]) < 2:
        return observed, observed, observed
    interval = bootstrap(
        data,
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=samples,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return observed, float(interval.low), float(interval.high)
