"""The classification kind's pure parts: encoding, metrics, class weights, the collapse guard."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoTokenizer

from tasks.config import ModelConfig, TrainConfig
from tasks.kinds.classification import (
    Classification,
    class_weights,
    collapse_check,
    majority_label,
    plot_confusion,
    weighted_loss,
)
from tasks.metrics import classification_metrics
from tasks.weights import count_updated, snapshot

from .conftest import LABELS, data_config, prepare


def test_encode_truncates_without_padding(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = Dataset.from_dict({"text": ["short", "a much longer sentence " * 20], "label": ["b", "a"]})
    out = Classification().encode(ds, tokenizer, ["a", "b"], ModelConfig(max_length=16))
    lengths = [len(ids) for ids in out["input_ids"]]
    assert lengths[0] < 16 and lengths[1] == 16  # no padding to max_length
    assert out["labels"] == [1, 0]
    assert out["length"] == lengths
    assert set(out.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert "text" not in out.column_names


def test_classification_metrics_macro_and_per_class():
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 1], ["a", "b", "c"])
    assert m["accuracy"] == 0.5
    assert m["f1/a"] == pytest.approx(2 / 3)
    assert m["f1/b"] == pytest.approx(0.5)
    assert m["f1/c"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert m["support/a"] == 2


def test_majority_label_and_constant_baseline():
    assert majority_label({"neg": 5, "pos": 9, "neu": 9}) == "neu"
    m = classification_metrics([0, 1, 1, 1], [1, 1, 1, 1], ["neg", "pos"])
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((0 + 6 / 7) / 2)


def test_confusion_plot_is_a_png(tmp_path):
    path = plot_confusion(np.array([[3, 1], [0, 4]]), ["neg", "pos"], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_count_updated_sees_each_changed_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    before = snapshot(model)
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    total, updated, tensors, tensors_updated = count_updated(model, before)
    assert (total, updated, tensors, tensors_updated) == (9, 1, 4, 1)


def test_class_weights_auto_none_and_explicit():
    assert class_weights(TrainConfig(), [100, 100, 100]) == [1.0, 1.0, 1.0]
    w = class_weights(TrainConfig(), [650, 200, 150])
    assert w is not None and w[0] < 1 < w[1] < w[2]
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


def test_tokenize_saves_every_split(tiny_csv: Path, tiny_model_dir: Path, tmp_path: Path):
    cfg = data_config(tiny_csv, validation_fraction=0.125, test_fraction=0.125)
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir), max_length=8)
    _, splits, result = prepare(cfg, model_cfg, tmp_path)
    assert result.rows == splits.rows
    assert 0 < result.mean_tokens["test"] <= 8


def test_the_tfidf_yardstick_is_fit_once_per_rows_labels_and_seed(tmp_path, monkeypatch):
    import tasks.metrics
    from tasks.metrics import tfidf_baseline

    train = ["good film", "great fun", "bad film", "awful mess", "fine i guess", "okay then"]
    labels = [2, 2, 0, 0, 1, 1]
    test = ["good fun", "awful film", "okay"]
    fits = []
    fit = tasks.metrics._fit_tfidf
    monkeypatch.setattr(tasks.metrics, "_fit_tfidf", lambda *a: fits.append(a) or fit(*a))
    first = tfidf_baseline(train, labels, test, 0, tmp_path)
    again = tfidf_baseline(train, labels, test, 0, tmp_path)
    assert len(fits) == 1 and again.tolist() == first.tolist()
    assert again.tolist() == fit(train, labels, test, 0).tolist()  # what a fit predicts
    # Other labels, rows or seed are another yardstick.
    tfidf_baseline(train, [0, 0, 2, 2, 1, 1], test, 0, tmp_path)
    tfidf_baseline(train, labels, test[:2], 0, tmp_path)
    tfidf_baseline(train, labels, test, 1, tmp_path)
    assert len(fits) == 4
    assert len(list((tmp_path / "yardstick").iterdir())) == 4


def test_the_gates_macro_f1_is_sklearns():
    from sklearn.metrics import f1_score

    from tasks.metrics import macro_f1

    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 5):
        ids = list(range(n_classes))
        for _ in range(50):
            y = rng.integers(0, n_classes, size=int(rng.integers(1, 40)))
            # -1: a champion's label this test set doesn't know; some classes never predicted
            p = rng.integers(-1, n_classes - 1, size=len(y))
            expected = f1_score(y, p, labels=ids, average="macro", zero_division=0)
            assert macro_f1(y, p, n_classes) == pytest.approx(expected)
