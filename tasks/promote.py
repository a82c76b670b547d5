"""The promotion gate: does the new version replace the champion? Decided on evidence, recorded.

One gate for every kind. The kind supplies per-example evidence (predictions and true labels, or
per-block token losses), the statistic that turns rows into its metric, its direction and the
yardsticks. The challenger is compared with the current champion on the same test rows, with a
paired bootstrap 95% confidence interval of the difference (``scipy.stats.bootstrap``) and, for
accuracy, McNemar's exact test on the rows where the two disagree. The first model becomes champion
only if it beats the kind's two yardsticks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.config import PromoteConfig, TrainConfig
from tasks.metrics import paired_bootstrap, paired_interval
from tasks.results import (
    Decision,
    EvalResult,
    Evidence,
    HarnessResult,
    HarnessTask,
    Prepared,
    RegisteredModel,
)

if TYPE_CHECKING:
    from tasks.kinds import Kind

log = logging.getLogger(__name__)


def mcnemar_p(correct_challenger: np.ndarray, correct_champion: np.ndarray) -> float:
    """McNemar's exact test: are the rows only one model gets right split unevenly?"""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = correct_challenger.astype(bool), correct_champion.astype(bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    return float(mcnemar(table, exact=True).pvalue)


def decide(
    cfg: PromoteConfig,
    version: str,
    evidence: Evidence,
    champion_version: str | None,
    champion: tuple[np.ndarray, ...] | None,
    blocked: str | None = None,
) -> Decision:
    """The pure decision, given every score it needs.

    Args:
        evidence: the challenger's per-example columns, statistic, direction and yardsticks.
        champion: the champion's columns on the same rows as the challenger's.
        blocked: why this version may never be champion (it collapsed; not comparable).
    """
    score = evidence.statistic(*evidence.columns)
    shown = evidence.reported(score)
    base = {
        "version": version,
        "champion_before": champion_version,
        "metric": evidence.metric,
        "challenger_score": shown,
    }
    if blocked:
        return Decision(promoted=False, reason=f"not eligible: {blocked}", **base)
    better = (lambda a, b: a > b) if evidence.higher_is_better else (lambda a, b: a < b)
    if champion is None and evidence.yardstick is not None:
        return first_against_yardstick(cfg, evidence, base)
    if champion is None:
        floors = {name: evidence.reported(value) for name, value in evidence.floors.items()}
        beaten = [
            f"{n} {floors[n]:.4f}" for n, v in evidence.floors.items() if not better(score, v)
        ]
        verdict = (
            "does not beat " + ", ".join(beaten)
            if beaten
            else "beats " + ", ".join(f"{n} {v:.4f}" for n, v in floors.items())
        )
        return Decision(
            promoted=not beaten,
            reason=f"first model: {evidence.metric} {shown:.4f} {verdict}",
            **base,
        )
    delta, low, high = paired_bootstrap(evidence, champion, cfg.bootstrap_samples, cfg.seed)
    champion_score = evidence.reported(evidence.statistic(*champion))
    p_value = None
    if evidence.correct is not None and evidence.metric == "accuracy":
        p_value = mcnemar_p(evidence.correct(*evidence.columns), evidence.correct(*champion))
    significant = (p_value < 0.05 and delta > 0) if p_value is not None else low > 0
    promoted = delta >= cfg.min_delta and (significant or not cfg.require_significant)
    test = f", McNemar p={p_value:.3g}" if p_value is not None else ""
    reason = (
        f"{evidence.metric} {shown:.4f} vs champion v{champion_version} {champion_score:.4f}: "
        f"improvement {delta:+.4f} (95% CI [{low:+.4f}, {high:+.4f}]{test}) "
        f"{'beats' if promoted else 'does not beat'} the margin {cfg.min_delta:.4f}"
        + (" significantly" if cfg.require_significant else "")
    )
    return Decision(
        promoted=promoted,
        reason=reason,
        champion_score=champion_score,
        delta=delta,
        ci_low=low,
        ci_high=high,
        mcnemar_p=p_value,
        **base,
    )


def first_against_yardstick(
    cfg: PromoteConfig, evidence: Evidence, base: dict[str, Any]
) -> Decision:
    """The first model against a yardstick scored on the same rows: the 95% CI of the paired
    improvement must lie above 0, and the point estimate must beat every floor."""
    assert evidence.yardstick is not None
    name, columns = evidence.yardstick
    delta, low, high = paired_bootstrap(evidence, columns, cfg.bootstrap_samples, cfg.seed)
    better = (lambda a, b: a > b) if evidence.higher_is_better else (lambda a, b: a < b)
    score = evidence.statistic(*evidence.columns)
    beaten = [n for n, v in evidence.floors.items() if not better(score, v)]
    promoted = low > 0 and delta >= cfg.min_delta and not beaten
    yardstick = evidence.reported(evidence.statistic(*columns))
    reason = (
        f"first model: {evidence.metric} {base['challenger_score']:.4f} vs {name} "
        f"{yardstick:.4f}: improvement {delta:+.4f} (95% CI [{low:+.4f}, {high:+.4f}]) "
        + ("beats it with a CI above 0" if low > 0 else "does not beat it with a CI above 0")
        + (
            f" but not by the margin {cfg.min_delta:.4f}"
            if low > 0 and delta < cfg.min_delta
            else ""
        )
        + (f"; does not beat {', '.join(beaten)}" if beaten else "")
    )
    return Decision(
        promoted=promoted,
        reason=reason,
        champion_score=yardstick,
        delta=delta,
        ci_low=low,
        ci_high=high,
        **base,
    )


def current_champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def record_decision(
    client: MlflowClient, registered: RegisteredModel, decision: Decision, alias: str
) -> Decision:
    """Tag the version with the gate's decision and move ``alias`` to it when it was promoted."""
    for key, value in decision.tags().items():
        client.set_model_version_tag(registered.name, registered.version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(registered.name, alias, registered.version)
    log.info("promotion: %s", decision.reason)
    return decision


def promote(
    registered: RegisteredModel,
    evaluation: EvalResult,
    kind: Kind,
    prepared: Prepared,
    blocked: str | None = None,
) -> Decision:
    """Run the gate for a just-registered version; move the alias and tag the version.

    Args:
        evaluation: its test evaluation, with per-example scores on disk.
        prepared: the run's test split (to score a champion that saw another test set) and its
            settings (``promote``, and ``eval.batch_size`` for scoring the champion again).
        blocked: why this version may never be champion (the collapse guard's finding).
    """
    cfg = prepared.cfg.promote
    client = MlflowClient()
    metric, why = gate_metric(cfg, evaluation, kind)
    evidence = kind.evidence(evaluation, metric)
    champion = current_champion(client, registered.name, cfg.alias)
    columns, rescored = None, False
    if champion is not None and str(champion.version) != registered.version and not blocked:
        columns, blocked, rescored = kind.champion_columns(champion, evaluation, prepared, metric)
    decision = decide(
        cfg,
        registered.version,
        evidence,
        str(champion.version) if champion is not None else None,
        columns,
        blocked,
    ).model_copy(update={"reevaluated_champion": rescored, "metric_reason": why})
    return record_decision(client, registered, decision, cfg.alias)


def gate_metric(cfg: PromoteConfig, evaluation: EvalResult, kind: Kind) -> tuple[str, str]:
    """The metric the gate decides on, and why: ``promote.metric``, else what the data says,
    else the kind's default."""
    if cfg.metric is not None:
        return cfg.metric, "set by promote.metric"
    if evaluation.default_metric is not None:
        return evaluation.default_metric, evaluation.default_metric_reason
    return kind.gate_metrics[0], f"the default of task {kind.task}"


def forgetting(
    evaluation: EvalResult, harness: HarnessResult | None, cfg: PromoteConfig
) -> tuple[dict[str, float], list[str]]:
    """What the fine-tuning cost in general capability, relative to the base model, and where
    it exceeds ``promote.max_forgetting``: (metrics ``forgetting/...``, findings).

    General-text perplexity: its relative rise, with a paired bootstrap CI over blocks. Each
    lm-eval task: the relative drop of its metric, with a paired bootstrap CI over documents. A
    finding is a measure whose CI's upper end exceeds the limit: the evidence does not show the
    loss is within it.
    """
    from tasks.lm_scoring import loss_rise, read_general

    metrics: dict[str, float] = {}
    found: list[str] = []
    limit = cfg.max_forgetting
    if evaluation.general_path:
        after, before = read_general(evaluation.general_path)
        rise, low, high = loss_rise(after, before, cfg.bootstrap_samples, cfg.seed)
        metrics |= {
            "forgetting/general_perplexity_rise": rise,
            "forgetting/general_perplexity_rise_ci_low": low,
            "forgetting/general_perplexity_rise_ci_high": high,
        }
        if limit is not None and high > limit:
            found.append(
                f"general-text perplexity rose {rise:+.1%} (95% CI [{low:+.1%}, {high:+.1%}]; "
                f"{evaluation.general['perplexity_before']:.2f} -> "
                f"{evaluation.general['perplexity_after']:.2f}), more than the "
                f"{limit:.0%} promote.max_forgetting allows"
            )
    for task in harness.tasks if harness else []:
        drop, low, high = relative_drop(task, cfg.bootstrap_samples, cfg.seed)
        key = f"forgetting/lm_eval/{task.name}/{task.metric}"
        metrics |= {f"{key}_drop": drop, f"{key}_drop_ci_low": low, f"{key}_drop_ci_high": high}
        if limit is not None and high > limit:
            found.append(
                f"lm-eval {task.name} {task.metric} fell {drop:+.1%} relative to the base "
                f"({task.before:.4f} -> {task.after:.4f}; 95% CI of the drop [{low:+.1%}, "
                f"{high:+.1%}] over {task.samples} documents), more than the {limit:.0%} "
                "promote.max_forgetting allows"
            )
    return metrics, found


def relative_drop(task: HarnessTask, samples: int, seed: int) -> tuple[float, float, float]:
    """How much worse the fine-tuned model does an lm-eval task, relative to the base score, with
    a paired bootstrap 95% CI over documents: (drop, low, high); negative when it got better."""
    sign = 1.0 if task.higher_is_better else -1.0

    def drop(after: np.ndarray, before: np.ndarray) -> float:
        base = float(np.mean(before))
        return sign * (base - float(np.mean(after))) / (abs(base) or 1.0)

    data = (np.asarray(task.after_docs), np.asarray(task.before_docs))
    return paired_interval(data, drop, samples, seed)


class ModelCollapsed(RuntimeError):
    """The trained model is no better than guessing; the message says what to try."""


def collapse_advice(finding: str, cfg: TrainConfig, learning_rate: float, version: str) -> str:
    """What happened to a collapsed run, where its model went, and what to change."""
    lower = f"{learning_rate / 3:.1e}"
    return (
        f"the model collapsed ({finding}). It was registered as version {version} without an "
        "alias and tagged `collapsed`, for inspection only; no alias moved.\nTry, in order:\n"
        "  - more optimizer steps: train.epochs (or train.time_budget) higher; small data sets "
        "need several epochs\n"
        "  - class weights for skewed labels: train.class_weights=auto (now "
        f"{cfg.class_weights!r}), or train.balanced_sampling=true\n"
        f"  - a lower learning rate: train.learning_rate={lower} "
        f"(this run used {learning_rate:.1e})"
    )


class ModelForgot(RuntimeError):
    """The fine-tuned model lost more general capability than promote.max_forgetting allows."""


def capability_markdown(
    evaluation: EvalResult, harness: HarnessResult | None, metrics: dict[str, float]
) -> str:
    """General capability before and after, for the model card and the summary."""
    lines = []
    general = evaluation.general
    if general:
        rise = metrics.get("forgetting/general_perplexity_rise", general["rise"])
        low = metrics.get("forgetting/general_perplexity_rise_ci_low", rise)
        high = metrics.get("forgetting/general_perplexity_rise_ci_high", rise)
        lines.append(
            f"General-text perplexity ({int(general['blocks'])} blocks): "
            f"{general['perplexity_before']:.3f} base, {general['perplexity_after']:.3f} "
            f"fine-tuned ({rise:+.1%}, 95% CI [{low:+.1%}, {high:+.1%}])."
        )
    if harness is not None and harness.tasks:
        lines += ["", harness.markdown()]
    return "\n".join(lines).strip()


def forgetting_advice(found: list[str], version: str, cfg: PromoteConfig) -> str:
    """The failing run's message: what was forgotten and what to try."""
    return (
        f"version {version} forgot more than it may: " + "; ".join(found) + ". It is registered "
        "for inspection (tag `forgetting`) without an alias. Try fewer steps or epochs, a lower "
        "train.learning_rate, or mixing general text into the training data; or raise "
        f"promote.max_forgetting (now {cfg.max_forgetting}) if this loss is acceptable."
    )


class AlreadyThere(ValueError):
    """The alias already points at the version: a promotion that would change nothing."""


def move_alias(name: str, version: str, alias: str, reason: str, actor: str) -> str | None:
    """Move ``alias`` to a version by hand (a manual promotion or a rollback); the version it left.

    The version must come from a FINISHED run: a failed or killed run's model is never served.
    Who moved it, when, why and from which version are tagged on the version.

    Raises:
        ValueError: the version's run did not finish, or its model collapsed.
    """
    import time

    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name

    try:
        _validate_model_alias_name(alias)
    except MlflowException as err:
        raise ValueError(f"--to {alias!r}: {err.message}") from None
    client = MlflowClient()
    target = client.get_model_version(name, version)
    status = client.get_run(target.run_id).info.status if target.run_id else "unknown"
    if status != "FINISHED":
        raise ValueError(
            f"models:/{name}/{version}: its run {target.run_id} is {status}, not FINISHED; "
            "only a finished run's model can take an alias"
        )
    if target.tags.get("collapsed") == "true":
        raise ValueError(
            f"models:/{name}/{version} collapsed ({target.tags.get('quality.collapse', '')}): "
            "it is kept for inspection and never takes an alias"
        )
    previous = current_champion(client, name, alias)
    if previous is not None and str(previous.version) == str(version):
        raise AlreadyThere(f"@{alias} is already on {name} v{version}; nothing changed")
    client.set_registered_model_alias(name, alias, version)
    tags = {
        f"manual.{alias}.by": actor,
        f"manual.{alias}.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        f"manual.{alias}.reason": reason or "(none given)",
        f"manual.{alias}.previous": str(previous.version) if previous is not None else "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    log.info("@%s moved to %s v%s by %s: %s", alias, name, version, actor, reason)
    return str(previous.version) if previous is not None else None
