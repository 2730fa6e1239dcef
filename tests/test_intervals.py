"""diffmic.intervals: the vectorised stratified bootstrap agrees with the metrics computed on each resample, covers
the point estimate and narrows as the split grows."""
import numpy as np
import pytest

from diffmic import intervals
from diffmic.metrics import classification_metrics


def _data(n: int, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def test_every_resample_equals_the_metrics_of_that_resample():
    labels, probs = _data(60)
    w = intervals.stratified_weights(labels, 5, seed=3)
    assert (w.sum(1) == len(labels)).all()
    for c in np.unique(labels):  # stratified: each class keeps its count
        assert (w[:, labels == c].sum(1) == (labels == c).sum()).all()
    cm = intervals._confusions(w, labels, probs.argmax(1), 3)
    fast = intervals._from_confusions(cm)
    auc, ece = intervals._auc(w, labels, probs), intervals._ece(w, labels, probs)
    for b in range(5):
        idx = np.repeat(np.arange(len(labels)), w[b].astype(int))
        slow = classification_metrics(labels[idx], probs[idx])
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa"):
            assert fast[k][b] == pytest.approx(slow[k], abs=1e-9), k
        assert auc[b] == pytest.approx(slow["auc"], abs=1e-9)
        assert ece[b] == pytest.approx(slow["ece"], abs=1e-9)
        assert intervals._classwise_ece(w, labels, probs)[b] == pytest.approx(slow["classwise_ece"], abs=1e-9)
        assert fast["per_class_recall"][b] == pytest.approx(slow["per_class_recall"], abs=1e-9)


def test_intervals_cover_the_estimate_and_shrink_with_n():
    widths = []
    for n in (120, 1200):
        labels, probs = _data(n, seed=n)
        point = classification_metrics(labels, probs)
        ci = intervals.bootstrap_intervals(labels, probs, resamples=1000, seed=0)
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "auc", "nll", "brier"):
            assert ci[f"{k}_lo"] <= point[k] + 1e-9 and point[k] - 1e-9 <= ci[f"{k}_hi"], k
        for k in ("ece", "classwise_ece"):  # binned |gaps| grow under resampling: ordered, not always covering
            assert 0 <= ci[f"{k}_lo"] <= ci[f"{k}_hi"]
        assert len(ci["per_class_recall_lo"]) == 3 and ci["interval_resamples"] == 1000
        widths.append(ci["accuracy_hi"] - ci["accuracy_lo"])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(10) in theory
    again = intervals.bootstrap_intervals(*_data(120, seed=120), resamples=1000, seed=0)
    assert again["accuracy_lo"] == intervals.bootstrap_intervals(*_data(120, seed=120), resamples=1000,
                                                                  seed=0)["accuracy_lo"]  # seeded


def test_kappa_is_cohens_and_ordinal_tasks_add_the_quadratic_one():
    """Issue 22: QWK depends on the class order, meaningless for nominal diagnoses; the column name says which."""
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    predicted = np.array([0, 2, 1, 0, 2, 1, 2, 1])  # the two confusions 0<->2 are far apart in the order
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    nominal, ordinal = classification_metrics(labels, probs), classification_metrics(labels, probs, ordinal=True)
    assert "qwk" not in nominal and nominal["cohen_kappa"] == ordinal["cohen_kappa"]
    assert ordinal["qwk"] != pytest.approx(ordinal["cohen_kappa"], abs=1e-3)
    swapped = np.array([1, 0, 2])  # the same diagnoses in another order: Cohen's kappa stays, QWK moves
    again = classification_metrics(swapped[labels], probs[:, np.argsort(swapped)], ordinal=True)
    assert again["cohen_kappa"] == pytest.approx(ordinal["cohen_kappa"]) and again["qwk"] != pytest.approx(ordinal["qwk"])
    w = intervals.stratified_weights(labels, 3, seed=0)
    fast = intervals._from_confusions(intervals._confusions(w, labels, predicted, 3), ordinal=True)
    for b in range(3):
        idx = np.repeat(np.arange(len(labels)), w[b].astype(int))
        slow = classification_metrics(labels[idx], probs[idx], ordinal=True)
        assert fast["qwk"][b] == pytest.approx(slow["qwk"]) and fast["cohen_kappa"][b] == pytest.approx(slow["cohen_kappa"])
