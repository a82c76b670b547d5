"""Two registered versions side by side, on the same test rows, as the gate sees them: classifiers
by their predictions, instruction-tuned LMs (sft) by their logged per-row judgments."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from pydantic import BaseModel

from tasks.metrics import gate_statistic, paired_bootstrap
from tasks.results import Evidence

PREDICTIONS = "evaluation/test_predictions.json"


class Comparison(BaseModel):
    """Metrics of A and B on the same rows, B - A with its paired bootstrap CI, disagreements."""

    a: str
    b: str
    rows: int
    metrics: dict[str, tuple[float, float]]  # metric -> (A, B)
    metric: str
    delta: float  # B - A on ``metric``
    ci_low: float
    ci_high: float
    only_a_right: int
    only_b_right: int
    disagreements: list[dict[str, Any]]  # rows only one of them gets right: text, truth, a, b
    per_row: str = "right"  # what only_a_right / only_b_right count: right answers, or lower loss


def logged_predictions(client: MlflowClient, name: str, version: str) -> tuple[Any, dict[str, Any]]:
    """A version and its run's per-row test predictions (labels, y_true, y_pred)."""
    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(str(mv.run_id), PREDICTIONS, tmp)
        except Exception as err:
            raise ValueError(
                f"models:/{name}/{version}: its run logged no per-row test predictions "
                f"({PREDICTIONS}); compare works on text-classification versions"
            ) from err
        return mv, json.loads(Path(path).read_text())


def test_texts(client: MlflowClient, run_id: str) -> list[str] | None:
    """The test split's texts, read from the run's logged test dataset when it is still on disk."""
    import pandas as pd

    inputs = client.get_run(run_id).inputs
    for dataset_input in inputs.dataset_inputs if inputs else []:
        if any(t.key == "mlflow.data.context" and t.value == "test" for t in dataset_input.tags):
            source = json.loads(dataset_input.dataset.source).get("uri", "")
            path = Path(source.removeprefix("file://"))
            if path.is_file():
                return [str(t) for t in pd.read_parquet(path)["text"]]
    return None


ANSWERS = "evaluation/test_answers.json"


def logged_answers(client: MlflowClient, name: str, version: str) -> tuple[Any, dict[str, Any]]:
    """An sft version and its run's per-row judgments, or (version, {}) when it logged none."""
    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(str(mv.run_id), ANSWERS, tmp)
        except Exception:
            return mv, {}
        logged = json.loads(Path(path).read_text())
    return mv, logged if "fine_tuned" in logged else {}


def compare_answers(
    a: tuple[str, str], b: tuple[str, str], metric: str | None, samples: int, seed: int, shown: int
) -> Comparison | None:
    """Two sft versions on the rows both were judged on; None when they are not sft versions.

    The metric defaults to the one B's gate decided on. Rows that changed most: the largest
    differences of per-row answer loss (or, over a closed set, where one picks the right answer).
    """
    from tasks.lm_scoring import metric_columns

    client = MlflowClient()
    mv_a, la = logged_answers(client, *a)
    mv_b, lb = logged_answers(client, *b)
    if not la or not lb:
        return None
    same = ("rows", "generated", "references", "labels")
    if mv_a.tags.get("test.fingerprint") != mv_b.tags.get("test.fingerprint") or any(
        la.get(k) != lb.get(k) for k in same
    ):
        raise ValueError("the two versions were judged on different test rows: not paired")
    if (
        mv_a.tags.get("test.tokenizer") != mv_b.tags.get("test.tokenizer")
        and metric == "answer_loss"
    ):
        raise ValueError("the two versions use different tokenizers: answer losses differ")
    metric = metric or mv_b.tags.get("promotion.metric") or "answer_loss"
    names = ["answer_loss", "exact_match", "rouge_l"]
    names += ["accuracy", "macro_f1"] if la["labels"] else []
    if metric not in names:
        raise ValueError(f"--metric {metric!r} does not fit these versions: use one of {names}")
    metrics = {}
    for m in names:
        (ca, stat, _), (cb, _, _) = (
            metric_columns(la, la["fine_tuned"], m),
            metric_columns(lb, lb["fine_tuned"], m),
        )
        metrics[m] = (stat(*ca), stat(*cb))
    columns_a, statistic, higher = metric_columns(la, la["fine_tuned"], metric)
    columns_b, _, _ = metric_columns(lb, lb["fine_tuned"], metric)
    evidence = Evidence(
        metric=metric, columns=columns_b, statistic=statistic, higher_is_better=higher, floors={}
    )
    delta, low, high = paired_bootstrap(evidence, columns_a, samples, seed)
    if not higher:  # report B - A in the metric's own direction
        delta, low, high = -delta, -high, -low
    sa, ca_ = np.asarray(la["fine_tuned"]["sums"]), np.asarray(la["fine_tuned"]["counts"])
    sb, cb_ = np.asarray(lb["fine_tuned"]["sums"]), np.asarray(lb["fine_tuned"]["counts"])
    loss_a, loss_b = sa / np.maximum(ca_, 1), sb / np.maximum(cb_, 1)
    order = np.argsort(-np.abs(loss_b - loss_a), kind="stable")[:shown]
    better = (loss_b < loss_a).sum(), (loss_a < loss_b).sum()
    changed = [
        {
            "row": int(i),
            "text": la["references"][i],
            "truth": f"answer loss {loss_a[i]:.3f} -> {loss_b[i]:.3f}",
            "a": la["labels"][la["fine_tuned"]["picked"][i]] if la["labels"] else "",
            "b": lb["labels"][lb["fine_tuned"]["picked"][i]] if lb["labels"] else "",
        }
        for i in order
    ]
    return Comparison(
        a=f"{a[0]} v{a[1]}",
        b=f"{b[0]} v{b[1]}",
        rows=len(la["references"]),
        metrics=metrics,
        metric=metric,
        delta=delta,
        ci_low=low,
        ci_high=high,
        only_a_right=int(better[1]),
        only_b_right=int(better[0]),
        disagreements=changed,
        per_row="answer loss",
    )


def compare(
    a: tuple[str, str], b: tuple[str, str], metric: str | None, samples: int, seed: int, shown: int
) -> Comparison:
    """Compare version ``a`` and ``b`` (name, version) on the test rows both were scored on.

    Raises:
        ValueError: a version has no logged predictions, or the two saw different test rows or
            label sets (their scores would not be paired).
    """
    answers = compare_answers(a, b, metric, samples, seed, shown)
    if answers is not None:
        return answers
    metric = metric or "macro_f1"
    client = MlflowClient()
    mv_a, pa = logged_predictions(client, *a)
    mv_b, pb = logged_predictions(client, *b)
    fingerprints = (mv_a.tags.get("test.fingerprint"), mv_b.tags.get("test.fingerprint"))
    if fingerprints[0] != fingerprints[1] or pa["y_true"] != pb["y_true"]:
        raise ValueError(
            f"the two versions were scored on different test rows (fingerprints {fingerprints[0]} "
            f"and {fingerprints[1]}): their scores are not paired"
        )
    if pa["labels"] != pb["labels"]:
        raise ValueError(f"different label sets: {pa['labels']} and {pb['labels']}")
    y = np.asarray(pa["y_true"])
    ya, yb = np.asarray(pa["y_pred"]), np.asarray(pb["y_pred"])
    n_classes = len(pa["labels"])
    metrics = {
        m: (gate_statistic(m, n_classes)(y, ya), gate_statistic(m, n_classes)(y, yb))
        for m in ("accuracy", "macro_f1")
    }
    evidence = Evidence(
        metric=metric,
        columns=(y, yb),
        statistic=gate_statistic(metric, n_classes),
        higher_is_better=True,
        floors={},
        correct=lambda truth, pred: truth == pred,
    )
    delta, low, high = paired_bootstrap(evidence, (y, ya), samples, seed)
    texts = test_texts(client, str(mv_a.run_id))
    labels = pa["labels"]
    differ = np.flatnonzero((ya == y) != (yb == y))
    disagreements = [
        {
            "row": int(i),
            "text": texts[i] if texts and i < len(texts) else None,
            "truth": labels[y[i]],
            "a": labels[ya[i]] if ya[i] >= 0 else "(outside the label set)",
            "b": labels[yb[i]] if yb[i] >= 0 else "(outside the label set)",
        }
        for i in differ[:shown]
    ]
    return Comparison(
        a=f"{a[0]} v{a[1]}",
        b=f"{b[0]} v{b[1]}",
        rows=len(y),
        metrics=metrics,
        metric=metric,
        delta=delta,
        ci_low=low,
        ci_high=high,
        only_a_right=int(np.sum((ya == y) & (yb != y))),
        only_b_right=int(np.sum((yb == y) & (ya != y))),
        disagreements=disagreements,
    )


def render(c: Comparison) -> str:
    """The comparison as the terminal shows it."""
    lines = [
        f"{c.rows} test rows, the same for both",
        "",
        f"| metric | A: {c.a} | B: {c.b} | B - A |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {a:.4f} | {b:.4f} | {b - a:+.4f} |" for m, (a, b) in c.metrics.items()]
    lines += [
        "",
        f"B - A on {c.metric}: {c.delta:+.4f}, paired bootstrap 95% CI "
        f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
        + (" (excludes 0)" if c.ci_low > 0 or c.ci_high < 0 else " (includes 0)"),
        f"rows only A gets right: {c.only_a_right}; only B: {c.only_b_right}"
        if c.per_row == "right"
        else f"rows where A's answer loss is lower: {c.only_a_right}; B's: {c.only_b_right}",
    ]
    if c.disagreements and c.per_row != "right":
        lines += ["", "the rows that changed most:"]
        for d in c.disagreements:
            picks = f", A {d['a']}, B {d['b']}" if d["a"] else ""
            lines.append(f"  row {d['row']}: {d['truth']}{picks}  reference {d['text'][:80]!r}")
    elif c.disagreements:
        lines += ["", "where they disagree (one right, one wrong):"]
        for d in c.disagreements:
            text = (d["text"] or "")[:100]
            lines.append(f"  row {d['row']}: truth {d['truth']}, A {d['a']}, B {d['b']}  {text!r}")
    return "\n".join(lines)
