"""Whole-split classification metrics (never averaged over batches)."""
from __future__ import annotations

import warnings

import numpy as np

# sklearn is imported where a metric is computed, not here: config validation reads the names below, and every
# command line that stops on bad input would otherwise spend ~2 s importing it first.

# The figures every evaluation reports for the diffusion head, for its own DCG alone (`dcg_<metric>`, same split and
# rule, the DCG's own fitted temperature) and for the difference (`gain_<metric>` = head − DCG; for ECE a negative
# gain is the better). The search may optimise any of them (prefixed val_ / test_).
HEAD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "auc", "ece", "classwise_ece", "nll",
                "brier")
BINS = 15  # calibration bins (ECE, class-wise ECE, the reliability diagram)
# Ordinal tasks (dataset.ordinal: graded severity) also get the quadratic-weighted kappa, `qwk`; `cohen_kappa` is
# Cohen's unweighted kappa for every task (weights would depend on an arbitrary class order for nominal diagnoses).
ORDINAL_METRICS = ("qwk",)
SCALAR_METRICS = tuple(f"{p}{m}" for p in ("", "dcg_", "gain_") for m in HEAD_METRICS + ORDINAL_METRICS)


def prefixed(prefix: str, metrics: dict) -> dict:
    """{"accuracy": 0.9, "confusion_matrix": [...]} -> {"<prefix>_accuracy": 0.9}: the scalar metrics of one split
    as the columns of a history row, a Ray report or a results table."""
    return {f"{prefix}_{k}": v for k, v in metrics.items() if not isinstance(v, (list, dict))}


def unprefixed(prefix: str, row: dict) -> dict:
    """The inverse of prefixed() for one split's columns of a row."""
    return {k[len(prefix) + 1:]: v for k, v in row.items() if k.startswith(f"{prefix}_")}


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs((predicted[inside] == labels[inside]).mean() - confidence[inside].mean())
    return float(ece)


def classwise_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = BINS) -> float:
    """Mean over classes of the binned gap between p_c and the frequency of class c (every class's probability,
    not only the top one's: a model can be right in its argmax and wrong about the rest)."""
    edges = np.linspace(0, 1, bins + 1)
    gaps = []
    for c in range(probs.shape[1]):
        p, hit = probs[:, c], (labels == c)
        which = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, bins - 1)
        gap = sum(abs(hit[which == b].sum() - p[which == b].sum()) for b in range(bins) if (which == b).any())
        gaps.append(gap / max(len(labels), 1))
    return float(np.mean(gaps)) if gaps else 0.0


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = BINS) -> dict:
    """The reliability diagram's data: per bin of top-label confidence, its mean confidence, accuracy and count."""
    confidence, right = probs.max(1), probs.argmax(1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        inside = which == b
        if inside.any():
            out["confidence"].append(float(confidence[inside].mean()))
            out["accuracy"].append(float(right[inside].mean()))
            out["count"].append(int(inside.sum()))
    return out


def one_vs_rest_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present in `labels` (NaN when fewer than two are present)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
    return float(np.mean(scores))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, dcg_probs: np.ndarray | None = None,
                           ordinal: bool = False) -> dict:
    """Scalar metrics plus per-class recall and the confusion matrix (rows = true class); with `dcg_probs`, the same
    scalars of the DCG alone (`dcg_*`) and the head's gain over it (`gain_*`)."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, confusion_matrix,
                                 f1_score, recall_score)

    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1]
    predicted = probs.argmax(1)
    classes = list(range(num_classes))
    with warnings.catch_warnings():  # classes absent from a small split are expected, not an error
        warnings.simplefilter("ignore")
        out = {
            "accuracy": float(accuracy_score(labels, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
            "cohen_kappa": float(cohen_kappa_score(labels, predicted, labels=classes)),
            "auc": one_vs_rest_auc(labels, probs),
            "ece": expected_calibration_error(labels, probs),
            "classwise_ece": classwise_calibration_error(labels, probs),
            "nll": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
            if len(labels) else 0.0,
            "brier": float(((probs - np.eye(num_classes)[labels]) ** 2).sum(1).mean()) if len(labels) else 0.0,
            "reliability": reliability(labels, probs),
            "per_class_recall": recall_score(labels, predicted, labels=classes, average=None,
                                             zero_division=0).tolist(),
            "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        }
        if ordinal:
            out["qwk"] = float(cohen_kappa_score(labels, predicted, labels=classes, weights="quadratic"))
    for k in ("cohen_kappa", "qwk"):  # sklearn gives NaN when both raters use one class; agreement is then perfect or nil
        if k in out and np.isnan(out[k]):
            out[k] = float(out["accuracy"] == 1.0)
    if dcg_probs is not None:
        dcg = classification_metrics(labels, dcg_probs, ordinal=ordinal)
        for m in HEAD_METRICS + (ORDINAL_METRICS if ordinal else ()):
            out[f"dcg_{m}"] = dcg[m]
            out[f"gain_{m}"] = out[m] - dcg[m]
        out["dcg_per_class_recall"] = dcg["per_class_recall"]
    return out
