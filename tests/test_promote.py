import numpy as np
import pytest
from sklearn.metrics import f1_score

from tasks.config import PromoteConfig
from tasks.promote import decide, macro_f1_from_ids, paired_bootstrap

rng = np.random.default_rng(0)
Y = rng.integers(0, 3, 400)


def noisy(accuracy: float, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    wrong = r.random(len(Y)) > accuracy
    return np.where(wrong, (Y + r.integers(1, 3, len(Y))) % 3, Y)


def test_macro_f1_matches_sklearn():
    pred = noisy(0.7, 1)
    assert macro_f1_from_ids(Y, pred, 3) == pytest.approx(f1_score(Y, pred, average="macro"))
    # A class that is never predicted nor present counts as 0, like the reported metrics.
    assert macro_f1_from_ids(np.array([0, 0]), np.array([0, 0]), 2) == pytest.approx(0.5)


def test_bootstrap_of_identical_models_is_zero():
    pred = noisy(0.7, 1)
    assert paired_bootstrap(Y, pred, pred, 3, "macro_f1", 200, 0) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_brackets_a_clear_gain():
    delta, low, high = paired_bootstrap(Y, noisy(0.9, 1), noisy(0.6, 2), 3, "macro_f1", 500, 0)
    assert 0 < low < delta < high


def test_first_model_needs_to_beat_the_floors():
    cfg = PromoteConfig()
    good = decide(cfg, "1", Y, noisy(0.9, 1), 3, {"majority": 0.2, "tf-idf": 0.6}, None, None)
    assert good.promoted and "first model" in good.reason and "beats" in good.reason
    bad = decide(cfg, "1", Y, noisy(0.5, 1), 3, {"majority": 0.2, "tf-idf": 0.6}, None, None)
    assert not bad.promoted and "does not beat tf-idf" in bad.reason


def test_challenger_must_beat_champion_by_the_margin():
    cfg = PromoteConfig(min_delta=0.01)
    better = decide(cfg, "2", Y, noisy(0.9, 1), 3, {}, "1", noisy(0.6, 2))
    assert better.promoted and better.champion_before == "1"
    assert better.ci_low is not None and better.ci_low > 0
    assert better.tags()["promotion.decision"] == "promoted"
    same = decide(cfg, "2", Y, noisy(0.7, 1), 3, {}, "1", noisy(0.7, 1))
    assert not same.promoted and "does not beat the margin" in same.reason
    assert same.tags()["promotion.ci95"] == "[0.0000, 0.0000]"


def test_significance_can_be_required():
    base = noisy(0.70, 4)
    slight = base.copy()
    wrong, right = np.flatnonzero(base != Y)[:6], np.flatnonzero(base == Y)[:4]
    slight[wrong] = Y[wrong]  # 6 rows fixed, 4 broken: a gain, but within the noise
    slight[right] = (Y[right] + 1) % 3
    loose = decide(PromoteConfig(min_delta=0.0), "2", Y, slight, 3, {}, "1", base)
    strict = decide(
        PromoteConfig(min_delta=0.0, require_significant=True), "2", Y, slight, 3, {}, "1", base
    )
    assert strict.ci_low is not None and strict.ci_low <= 0
    assert not strict.promoted
    assert loose.promoted and loose.delta is not None and loose.delta > 0


def test_blocked_model_never_promotes():
    d = decide(PromoteConfig(), "1", Y, noisy(0.99, 1), 3, {}, None, None, blocked="collapsed")
    assert not d.promoted and d.reason == "not eligible: collapsed"
