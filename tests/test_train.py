"""The training recipe's pure parts, and the Trainer run on a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.config import DataConfig, ModelConfig, TrainConfig
from tasks.kinds.classification import class_weights, collapse_check, weighted_loss
from tasks.train import auto_schedule, train

from .conftest import LABELS, data_config, make_rows, prepare


def test_auto_schedule_scales_with_data_and_model():
    cfg = TrainConfig()
    assert auto_schedule(cfg, 600, 22_700_000)[0] == 10  # 19 steps/epoch: the cap
    assert auto_schedule(cfg, 35_000, 22_700_000)[0] == 2  # 1,094 steps/epoch: the floor
    assert auto_schedule(cfg, 3_200, 22_700_000)[0] == 3  # 100 steps/epoch
    assert auto_schedule(cfg, 600, 22_700_000)[1] == pytest.approx(1.049e-4, rel=1e-3)
    assert auto_schedule(cfg, 600, 110_000_000)[1] == pytest.approx(4.77e-5, rel=1e-2)
    explicit = TrainConfig(epochs=1.5, learning_rate=3e-5)
    assert auto_schedule(explicit, 600, 22_700_000) == (1.5, 3e-5)


def test_class_weights_auto_none_and_explicit():
    assert class_weights(TrainConfig(), [100, 100, 100]) == [1.0, 1.0, 1.0]
    w = class_weights(TrainConfig(), [650, 200, 150])
    assert w[0] < 1 < w[1] < w[2]
    assert np.dot(w, [650, 200, 150]) / 1000 == pytest.approx(1.0)  # mean weight per row is 1
    assert class_weights(TrainConfig(class_weights="none"), [650, 350]) is None
    assert class_weights(TrainConfig(class_weights=[1.0, 3.0]), [650, 350]) == [1.0, 3.0]
    with pytest.raises(ValueError, match="2 weights for 3 labels"):
        class_weights(TrainConfig(class_weights=[1.0, 3.0]), [1, 2, 3])


def test_weighted_loss_is_weighted_cross_entropy():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 0, 1])
    loss = weighted_loss([0.5, 2.0, 1.0])
    expected = F.cross_entropy(logits, labels, weight=torch.tensor([0.5, 2.0, 1.0]))
    assert loss({"logits": logits}, labels) == pytest.approx(expected.item())
    summed = F.cross_entropy(logits, labels, weight=torch.tensor([0.5, 2.0, 1.0]), reduction="sum")
    assert loss({"logits": logits}, labels, 6) == pytest.approx(summed.item() / 6)


def test_collapse_guard():
    y = np.array([0, 0, 0, 1, 2, 1])
    reason, majority_f1 = collapse_check(y, np.zeros(6, dtype=int), LABELS, majority=0)
    assert reason == "collapsed: every validation prediction is 'negative'"
    worse, _ = collapse_check(y, np.array([1, 2, 1, 0, 0, 0]), LABELS, majority=0)
    assert worse is not None and "no better than the majority baseline" in worse
    assert collapse_check(y, y, LABELS, majority=0)[0] is None
    assert majority_f1 == pytest.approx((2 * 3 / (3 + 6)) / 3)


@pytest.fixture(scope="module")
def tokenized(tiny_model_dir: Path, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    path = work / "rows.csv"
    make_rows(90).to_csv(path, index=False)
    cfg = data_config(path, validation_fraction=0.2, test_fraction=0.1)
    return prepare(cfg, ModelConfig(name_or_path=str(tiny_model_dir), max_length=32), work)[2]


def run(tokenized, tiny_model_dir: Path, tmp_path: Path, **overrides):
    cfg = TrainConfig(batch_size=8, logging_steps=1, warmup_fraction=0.0, **overrides)
    return train(
        tokenized,
        LABELS,
        ModelConfig(name_or_path=str(tiny_model_dir), max_length=32),
        cfg,
        tmp_path,
    )


def test_early_stopping_stops(tokenized, tiny_model_dir: Path, tmp_path: Path):
    # A learning rate this small cannot move validation F1: patience runs out.
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        learning_rate=1e-9,
        epochs=10,
        eval_steps=2,
        early_stopping_patience=2,
    )
    assert result.stopped_early
    assert result.global_step < 10 * 8  # 63 rows / batch 8 = 8 steps per epoch
    assert len(result.validation_curve) == result.global_step // 2


def test_selection_keeps_the_best_validation_checkpoint(tokenized, tiny_model_dir, tmp_path):
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        learning_rate=3e-3,
        epochs=4,
        eval_steps=4,
        early_stopping_patience=None,
    )
    curve = result.validation_curve
    best = max(curve, key=lambda point: point["macro_f1"])  # the first of equal maxima wins
    assert result.best_step == best["step"]
    # The saved model is that checkpoint: its validation macro F1 is the best one of the curve.
    assert result.validation["macro_f1"] == pytest.approx(best["macro_f1"])


def test_collapse_guard_fires_on_a_one_class_model(tokenized, tiny_model_dir, tmp_path):
    # Weights that make every class but the first worthless teach the model one answer.
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        learning_rate=3e-3,
        max_steps=24,
        class_weights=[1.0, 1e-4, 1e-4],
        select_best=False,
    )
    assert result.collapse is not None and result.collapse.startswith("collapsed")


def test_balanced_sampler_evens_out_classes_and_repeats_per_epoch():
    from tasks.train import EpochSeededBalancedSampler

    labels = np.array([0] * 900 + [1] * 100)
    sampler = EpochSeededBalancedSampler(labels, seed=3)
    first = list(sampler)
    assert len(first) == 1000
    share = np.mean(labels[first] == 1)
    assert 0.45 < share < 0.55  # 10% of the rows, half of the draws
    assert list(sampler) == first  # same epoch, same order: a resumed run sees the same batches
    sampler.set_epoch(1)
    assert list(sampler) != first


@pytest.mark.slow
def test_class_weights_move_predictions_off_the_majority_class(tmp_path: Path):
    """The shipped MiniLM on 600 tweets of the demo corpus, 65% negative (data/imbalanced)."""
    from tasks.evaluate import predict_ids

    root = Path(__file__).resolve().parent.parent / "data" / "imbalanced"
    cfg = DataConfig(
        train=str(root / "train.csv"),
        test=str(root / "test.csv"),
        text_column="text",
        label_column="sentiment",
        labels=["negative", "neutral", "positive"],
    )
    model_cfg = ModelConfig(max_length=64)
    data, _, tokenized = prepare(cfg, model_cfg, tmp_path)
    from datasets import load_from_disk

    test = load_from_disk(tokenized.path)["test"].select(range(600))
    majority_share = {}
    for weights in ("none", "auto"):
        train_cfg = TrainConfig(
            epochs=2,
            learning_rate=1e-4,
            class_weights=weights,
            select_best=False,
            early_stopping_patience=None,
        )
        result = train(tokenized, data.labels, model_cfg, train_cfg, tmp_path / weights)
        predicted = predict_ids(result.model_dir, test, 64, tmp_path / weights)
        majority_share[weights] = float(np.mean(predicted == 0))
    assert majority_share["auto"] < majority_share["none"], majority_share
