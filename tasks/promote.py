"""The promotion gate: does the new version replace the champion? Decided on evidence, recorded.

The challenger is compared with the current champion on the same frozen test rows. When the test
split the champion was scored on differs from today's (its fingerprint is recorded on the version),
the champion is scored again on today's rows. The primary metric's difference comes with a paired
bootstrap 95% confidence interval. The first model becomes champion only if it beats the majority
and the TF-IDF baselines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from tasks.config import PromoteConfig

log = logging.getLogger(__name__)


class Decision(BaseModel):
    """The gate's verdict for one model version."""

    promoted: bool
    reason: str
    version: str
    champion_before: str | None
    metric: str
    challenger_score: float
    champion_score: float | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    reevaluated_champion: bool = False

    def tags(self) -> dict[str, str]:
        """The decision as model-version tags."""
        tags = {
            "promotion.decision": "promoted" if self.promoted else "kept",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.compared_to": self.champion_before or "none",
        }
        if self.delta is not None:
            tags |= {
                "promotion.delta": f"{self.delta:.4f}",
                "promotion.ci95": f"[{self.ci_low:.4f}, {self.ci_high:.4f}]",
            }
        return tags


def macro_f1_from_ids(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro F1 from integer ids (classes absent from both count as 0, as in the metrics)."""
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(
        n_classes, n_classes
    )
    tp = np.diag(confusion).astype(float)
    denom = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def accuracy_from_ids(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    return float((y_true == y_pred).mean())


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "macro_f1": macro_f1_from_ids,
    "accuracy": accuracy_from_ids,
}


def paired_bootstrap(
    y_true: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray,
    n_classes: int,
    metric: str,
    samples: int,
    seed: int,
) -> tuple[float, float, float]:
    """(observed difference, 2.5th percentile, 97.5th percentile) of metric(challenger - champion).

    Both models are scored on the same resampled rows each time, so the interval reflects the
    difference between the models rather than the noise of the test set.
    """
    score = METRICS[metric]
    observed = score(y_true, challenger, n_classes) - score(y_true, champion, n_classes)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    deltas = np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, n)
        deltas[b] = score(y_true[idx], challenger[idx], n_classes) - score(
            y_true[idx], champion[idx], n_classes
        )
    low, high = np.percentile(deltas, [2.5, 97.5])
    return observed, float(low), float(high)


def decide(
    cfg: PromoteConfig,
    version: str,
    y_true: np.ndarray,
    challenger: np.ndarray,
    n_classes: int,
    floors: dict[str, float],
    champion_version: str | None,
    champion: np.ndarray | None,
    blocked: str | None = None,
) -> Decision:
    """The pure decision, given every prediction it needs.

    Args:
        floors: baseline scores the first champion must beat, e.g. {"majority": 0.2, "tf-idf": 0.5}.
        champion: the champion's predictions on the same rows as ``challenger``.
        blocked: a reason this version may never be champion (e.g. it collapsed to one class).
    """
    score = METRICS[cfg.metric](y_true, challenger, n_classes)
    base = {
        "version": version,
        "champion_before": champion_version,
        "metric": cfg.metric,
        "challenger_score": score,
    }
    if blocked:
        return Decision(promoted=False, reason=f"not eligible: {blocked}", **base)
    if champion is None:
        beaten = [f"{name} {value:.4f}" for name, value in floors.items() if score <= value]
        if beaten:
            return Decision(
                promoted=False,
                reason=f"first model: {cfg.metric} {score:.4f} does not beat " + ", ".join(beaten),
                **base,
            )
        floor_text = ", ".join(f"{name} {value:.4f}" for name, value in floors.items())
        return Decision(
            promoted=True,
            reason=f"first model: {cfg.metric} {score:.4f} beats {floor_text}",
            **base,
        )
    delta, low, high = paired_bootstrap(
        y_true, challenger, champion, n_classes, cfg.metric, cfg.bootstrap_samples, cfg.seed
    )
    champion_score = score - delta
    promoted = delta >= cfg.min_delta and (low > 0 or not cfg.require_significant)
    verdict = "beats" if promoted else "does not beat"
    reason = (
        f"{cfg.metric} {score:.4f} vs champion v{champion_version} {champion_score:.4f}: "
        f"delta {delta:+.4f} (95% CI [{low:+.4f}, {high:+.4f}]) {verdict} the margin "
        f"{cfg.min_delta:.4f}" + (" with a CI above 0" if cfg.require_significant else "")
    )
    return Decision(
        promoted=promoted,
        reason=reason,
        champion_score=champion_score,
        delta=delta,
        ci_low=low,
        ci_high=high,
        **base,
    )


def champion_predictions(
    client: MlflowClient,
    name: str,
    champion: Any,
    test_fingerprint: str,
    labels: list[str],
    test_texts: list[str],
) -> tuple[np.ndarray, bool]:
    """The champion's test predictions: its logged ones when it saw the same test rows, else new.

    Returns the predictions and whether the champion had to be scored again.
    """
    if champion.tags.get("test.fingerprint") == test_fingerprint:
        path = client.download_artifacts(champion.run_id, "evaluation/test_predictions.json")
        with open(path) as f:
            logged = json.load(f)
        if logged["labels"] == labels:
            return np.asarray(logged["y_pred"]), False
    import mlflow.pyfunc

    log.info("champion v%s saw another test set: scoring it on this one", champion.version)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{champion.version}")
    predicted = model.predict(test_texts)["label"].tolist()
    index = {label: i for i, label in enumerate(labels)}
    # A champion with another label set can predict a label this test set doesn't know: wrong.
    return np.asarray([index.get(p, -1) for p in predicted]), True


def current_champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def record_decision(
    client: MlflowClient, registered: Any, decision: Decision, alias: str
) -> Decision:
    """Tag the version with the gate's decision and move ``alias`` to it when it was promoted."""
    for key, value in decision.tags().items():
        client.set_model_version_tag(registered.name, registered.version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(registered.name, alias, registered.version)
    log.info("promotion: %s", decision.reason)
    return decision


def promote(
    registered: Any,
    evaluation: Any,
    labels: list[str],
    test_path: str,
    cfg: PromoteConfig,
    blocked: str | None = None,
) -> Decision:
    """Run the gate for a just-registered version; move the alias and tag the version.

    Args:
        registered: the new version (``RegisteredModel``).
        evaluation: its test evaluation (``EvalResult``), with per-row predictions on disk.
        test_path: the test split, to score a champion that saw another test set.
        blocked: why this version may never be champion (the collapse guard's finding).
    """
    import pandas as pd

    client = MlflowClient()
    with open(evaluation.predictions_path) as f:
        logged = json.load(f)
    y_true, y_pred = np.asarray(logged["y_true"]), np.asarray(logged["y_pred"])
    champion = current_champion(client, registered.name, cfg.alias)
    champion_pred, reevaluated = None, False
    if champion is not None and str(champion.version) != registered.version:
        texts = pd.read_parquet(test_path)["text"].tolist()
        if len(texts) != len(y_true):
            raise ValueError("the gate needs the whole test split (eval.max_test_samples unset)")
        champion_pred, reevaluated = champion_predictions(
            client, registered.name, champion, evaluation.test_fingerprint, labels, texts
        )
    floors = {
        "majority baseline": evaluation.baseline[cfg.metric],
        "TF-IDF + logistic regression": evaluation.classical[cfg.metric],
    }
    decision = decide(
        cfg,
        registered.version,
        y_true,
        y_pred,
        len(labels),
        floors,
        str(champion.version) if champion is not None else None,
        champion_pred,
        blocked,
    ).model_copy(update={"reevaluated_champion": reevaluated})
    return record_decision(client, registered, decision, cfg.alias)
