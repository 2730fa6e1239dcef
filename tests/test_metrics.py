"""diffmic.metrics: whole-split metrics against hand-computed values."""
import numpy as np
import pytest

from diffmic.metrics import classification_metrics, expected_calibration_error


def test_known_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.7 + 0.1
    m = classification_metrics(labels, probs, dcg_probs=np.eye(3)[labels])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["per_class_recall"] == [0.5, 1.0, 0.5]
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["dcg_accuracy"] == 1.0
    assert 0 < m["macro_f1"] < 1 and -1 <= m["cohen_kappa"] <= 1 and 0.5 < m["auc"] <= 1


def test_whole_split_not_batch_average():
    """Accuracy over 3 + 1 examples is 3/4, not the mean of per-batch accuracies (2/3 and 0 → 1/3)."""
    labels = np.array([0, 1, 1, 0])
    probs = np.eye(2)[[0, 1, 0, 1]]
    probs[2] = [0.4, 0.6]
    assert classification_metrics(labels, probs)["accuracy"] == 0.75


def test_missing_class_and_perfect_calibration():
    labels = np.array([0, 0, 1])
    m = classification_metrics(labels, np.eye(4)[labels])
    assert m["per_class_recall"] == [1.0, 1.0, 0.0, 0.0] and m["accuracy"] == 1.0
    assert expected_calibration_error(labels, np.eye(4)[labels]) == 0.0
    assert np.isnan(classification_metrics(np.array([1, 1]), np.eye(2)[[1, 1]])["auc"])
