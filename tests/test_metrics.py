import numpy as np
import pytest

from tasks.evaluate import majority_label, plot_confusion
from tasks.metrics import classification_metrics
from tasks.train import count_updated, snapshot


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
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    before = snapshot(model)
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    total, updated, tensors, tensors_updated = count_updated(model, before)
    assert (total, updated, tensors, tensors_updated) == (9, 1, 4, 1)
