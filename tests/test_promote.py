"""The one promotion gate: paired bootstrap, McNemar, floors, margins and blocks."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tasks.config import PromoteConfig
from tasks.metrics import gate_statistic, paired_bootstrap
from tasks.promote import decide, mcnemar_p
from tasks.results import Evidence

rng = np.random.default_rng(0)
Y = rng.integers(0, 3, 400)


def noisy(accuracy: float, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    wrong = r.random(len(Y)) > accuracy
    return np.where(wrong, (Y + r.integers(1, 3, len(Y))) % 3, Y)


def evidence(pred: np.ndarray, floors=None, metric: str = "macro_f1") -> Evidence:
    return Evidence(
        metric=metric,
        columns=(Y, pred),
        statistic=gate_statistic(metric, 3),
        higher_is_better=True,
        floors=floors or {},
        correct=lambda y, p: y == p,
    )


def test_gate_statistic_is_sklearn_and_counts_unknown_labels_as_wrong():
    pred = noisy(0.7, 1)
    assert gate_statistic("macro_f1", 3)(Y, pred) == pytest.approx(
        f1_score(Y, pred, average="macro")
    )
    # A champion with another label set predicts -1: simply wrong, never an error.
    f1 = gate_statistic("macro_f1", 3)
    assert f1(np.array([1, 2]), np.array([-1, 2])) == pytest.approx(1 / 3)
    assert f1(np.array([0, 2]), np.array([-1, 2])) == pytest.approx(1 / 3)
    assert gate_statistic("accuracy", 3)(np.array([0, 1]), np.array([0, -1])) == 0.5


def test_bootstrap_of_identical_models_is_zero():
    pred = noisy(0.7, 1)
    assert paired_bootstrap(evidence(pred), (Y, pred), 200, 0) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_brackets_a_clear_gain():
    delta, low, high = paired_bootstrap(evidence(noisy(0.9, 1)), (Y, noisy(0.6, 2)), 200, 0)
    assert 0 < low < delta < high


def test_lower_is_better_metrics_turn_the_sign():
    lower = Evidence(
        metric="loss",
        columns=(np.full(40, 2.0),),
        statistic=lambda x: float(x.mean()),
        higher_is_better=False,
        floors={},
    )
    delta, low, _ = paired_bootstrap(lower, (np.full(40, 2.5),), 200, 0)
    assert delta == pytest.approx(0.5) and low == pytest.approx(0.5)


def test_mcnemar_counts_only_the_disagreements():
    a = np.array([1] * 30 + [0] * 10 + [1] * 60)
    b = np.array([0] * 30 + [1] * 10 + [1] * 60)
    assert mcnemar_p(a, b) < 0.01  # 30 vs 10 discordant rows
    assert mcnemar_p(a, a) == 1.0


def test_first_model_needs_to_beat_the_floors():
    cfg = PromoteConfig()
    floors = {"majority": 0.2, "tf-idf": 0.6}
    good = decide(cfg, "1", evidence(noisy(0.9, 1), floors), None, None)
    assert good.promoted and "first model" in good.reason and "beats" in good.reason
    bad = decide(cfg, "1", evidence(noisy(0.5, 1), floors), None, None)
    assert not bad.promoted and "does not beat tf-idf" in bad.reason


def test_challenger_must_beat_champion_by_the_margin():
    cfg = PromoteConfig(min_delta=0.01, bootstrap_samples=200)
    better = decide(cfg, "2", evidence(noisy(0.9, 1)), "1", (Y, noisy(0.6, 2)))
    assert better.promoted and better.champion_before == "1"
    assert better.ci_low is not None and better.ci_low > 0
    assert better.tags()["promotion.decision"] == "promoted"
    same = decide(cfg, "2", evidence(noisy(0.7, 1)), "1", (Y, noisy(0.7, 1)))
    assert not same.promoted and "does not beat the margin" in same.reason
    assert same.tags()["promotion.ci95"] == "[0.0000, 0.0000]"


def test_significance_can_be_required():
    base = noisy(0.70, 4)
    slight = base.copy()
    wrong, right = np.flatnonzero(base != Y)[:6], np.flatnonzero(base == Y)[:4]
    slight[wrong] = Y[wrong]  # 6 rows fixed, 4 broken: a gain, but within the noise
    slight[right] = (Y[right] + 1) % 3
    loose = decide(
        PromoteConfig(min_delta=0.0, bootstrap_samples=200), "2", evidence(slight), "1", (Y, base)
    )
    strict_cfg = PromoteConfig(min_delta=0.0, require_significant=True, bootstrap_samples=200)
    strict = decide(strict_cfg, "2", evidence(slight), "1", (Y, base))
    assert strict.ci_low is not None and strict.ci_low <= 0
    assert not strict.promoted
    assert loose.promoted and loose.delta is not None and loose.delta > 0
    # For accuracy, McNemar's test on the 10 discordant rows decides significance.
    accuracy = decide(strict_cfg, "2", evidence(slight, metric="accuracy"), "1", (Y, base))
    assert accuracy.mcnemar_p is not None and accuracy.mcnemar_p > 0.05
    assert not accuracy.promoted and "McNemar" in accuracy.reason
    assert "promotion.mcnemar_p" in accuracy.tags()


def test_blocked_model_never_promotes():
    d = decide(PromoteConfig(), "1", evidence(noisy(0.99, 1)), None, None, blocked="collapsed")
    assert not d.promoted and d.reason == "not eligible: collapsed"


def test_a_first_model_with_a_row_by_row_yardstick_needs_a_ci_above_zero():
    """SFT's first version faces the zero-shot model on the same prompts: a CI, not a point."""
    good, zero_shot = noisy(0.9, 1), noisy(0.4, 2)
    with_yardstick = Evidence(
        metric="accuracy",
        columns=(Y, good),
        statistic=gate_statistic("accuracy", 3),
        higher_is_better=True,
        floors={},
        yardstick=("zero-shot model", (Y, zero_shot)),
    )
    first = decide(PromoteConfig(bootstrap_samples=200), "1", with_yardstick, None, None)
    assert first.promoted and "zero-shot model" in first.reason and first.ci_low > 0
    tie = Evidence(**{**with_yardstick.__dict__, "yardstick": ("zero-shot model", (Y, good))})
    same = decide(PromoteConfig(bootstrap_samples=200), "1", tie, None, None)
    assert not same.promoted and "does not beat it" in same.reason
