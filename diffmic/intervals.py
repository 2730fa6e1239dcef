"""Bootstrap intervals of whole-split metrics: how far a test figure could move by the luck of which images the split
happened to hold (ISIC's test split has ~32 DF images: their recall moves by ±15 points by chance).

Stratified (each resample keeps every class's count, so a rare class never vanishes from a resample), seeded, and
vectorised: each of the B resamples is a row of multiplicities W (B×N), and every metric is computed for all rows at
once from weighted counts — the confusion matrices W @ onehot(true, predicted), weighted Mann-Whitney sums for AUC,
weighted bins for ECE — never by a Python loop over resamples.

The intervals are percentile intervals. For the binned calibration errors (ECE, class-wise ECE) a resample's value is
biased upward (a sum of absolute gaps grows with the noise of resampling), so their interval can lie above the point
estimate: read it as the figure's spread, not as a bound around it.
"""
from __future__ import annotations

import numpy as np

RESAMPLES, LEVEL = 2000, 0.95


def stratified_weights(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """B×N multiplicities: within each class, its n_c images drawn n_c times with replacement."""
    rng = np.random.default_rng(seed)
    w = np.zeros((resamples, len(labels)))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=resamples)
    return w


def _confusions(w: np.ndarray, labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    cells = np.zeros((len(labels), classes * classes))
    cells[np.arange(len(labels)), labels * classes + predicted] = 1
    return (w @ cells).reshape(-1, classes, classes)  # B×C×C, rows = true class


def _kappa(cm: np.ndarray, quadratic: bool) -> np.ndarray:
    total = cm.sum((1, 2))
    support, predicted = cm.sum(2), cm.sum(1)
    c = cm.shape[1]
    i, j = np.meshgrid(np.arange(c), np.arange(c), indexing="ij")
    weights = ((i - j) ** 2).astype(float) if quadratic else (i != j).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = support[:, :, None] * predicted[:, None, :] / total[:, None, None]
        chance = (weights * expected).sum((1, 2))
        return np.where(chance > 0, 1 - (weights * cm).sum((1, 2)) / chance, 1.0)


def _from_confusions(cm: np.ndarray, ordinal: bool = False) -> dict[str, np.ndarray]:
    total = cm.sum((1, 2))
    diag = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(2), cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, diag / support, 0.0)
        precision = np.where(predicted > 0, diag / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = support > 0
    return {"accuracy": diag.sum(1) / total,
            "balanced_accuracy": (recall * present).sum(1) / present.sum(1),
            "macro_f1": f1.mean(1), "cohen_kappa": _kappa(cm, quadratic=False), "per_class_recall": recall,
            **({"qwk": _kappa(cm, quadratic=True)} if ordinal else {})}


def _auc(w: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC for every resample (weighted Mann-Whitney; ties count one half)."""
    scores = []
    for c in np.unique(labels):
        s = probs[:, c]
        order = np.argsort(s, kind="stable")
        s, pos = s[order], (labels[order] == c)
        wp, wn = w[:, order] * pos, w[:, order] * ~pos
        # negatives strictly below each position, plus half of those tied with it
        _, start, counts = np.unique(s, return_index=True, return_counts=True)
        group = np.repeat(np.arange(len(start)), counts)
        neg_group = np.add.reduceat(wn, start, axis=1)
        below = np.cumsum(neg_group, axis=1) - neg_group
        credit = below[:, group] + 0.5 * neg_group[:, group]
        n_pos, n_neg = wp.sum(1), wn.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores.append((wp * credit).sum(1) / (n_pos * n_neg))
    return np.mean(scores, axis=0)


def _ece(w: np.ndarray, labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> np.ndarray:
    confidence, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (lo, hi] bins as the metric has
    member = np.zeros((len(labels), bins))
    member[np.arange(len(labels)), which] = 1
    gap = np.abs(w @ (member * correct[:, None]) - w @ (member * confidence[:, None]))
    return gap.sum(1) / w.sum(1)


def _classwise_ece(w: np.ndarray, labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> np.ndarray:
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for c in range(probs.shape[1]):
        p, hit = probs[:, c], (labels == c).astype(float)
        which = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, bins - 1)
        member = np.zeros((len(labels), bins))
        member[np.arange(len(labels)), which] = 1
        out.append(np.abs(w @ (member * hit[:, None]) - w @ (member * p[:, None])).sum(1) / w.sum(1))
    return np.mean(out, axis=0)


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                        level: float = LEVEL, ordinal: bool = False) -> dict:
    """{metric}_lo / _hi (percentile interval) for accuracy, balanced accuracy, macro-F1, kappa, AUC, ECE,
    class-wise ECE, NLL and Brier score, and
    `per_class_recall_lo/_hi` lists; `resamples` and `level` are returned with them."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        return {}
    w = stratified_weights(labels, resamples, seed)
    values = _from_confusions(_confusions(w, labels, probs.argmax(1), probs.shape[1]), ordinal)
    values["auc"] = _auc(w, labels, probs) if len(np.unique(labels)) > 1 else np.full(resamples, np.nan)
    values["ece"] = _ece(w, labels, probs)
    values["classwise_ece"] = _classwise_ece(w, labels, probs)
    rows = np.arange(len(labels))
    values["nll"] = w @ -np.log(np.clip(probs[rows, labels], 1e-12, None)) / w.sum(1)
    values["brier"] = w @ ((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(1) / w.sum(1)
    tail = 100 * (1 - level) / 2
    out: dict = {"interval_resamples": resamples, "interval_level": level}
    for name, v in values.items():
        lo, hi = np.nanpercentile(v, [tail, 100 - tail], axis=0) if np.isfinite(v).any() else (np.nan, np.nan)
        if name == "per_class_recall":
            out["per_class_recall_lo"], out["per_class_recall_hi"] = lo.tolist(), hi.tolist()
        else:
            out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out
