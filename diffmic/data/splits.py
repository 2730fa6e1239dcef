"""Stratified, seeded carving of one split out of another (test out of train, validation out of train)."""
from __future__ import annotations

import numpy as np


def stratified_carve(labels: np.ndarray, fraction: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..n-1 into (keep, carved), both sorted, carved ~ `fraction` of every class.

    The carved total is round(fraction * n), shared out per class by largest remainder. A class with >= 2 examples
    keeps >= 1 in `keep` and gives >= 1 to `carved` (so the carved split sees every class it can); a class with a
    single example stays in `keep`. Deterministic for a given seed (an int or a sequence of ints).
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    room = np.maximum(counts - 1, 0)  # at most this many may leave a class
    take = np.minimum(np.floor(exact).astype(np.int64), room)
    left = int(round(fraction * len(labels))) - int(take.sum())
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if left <= 0:
            break
        if take[i] < room[i]:
            take[i] += 1
            left -= 1
    take[(room > 0) & (take == 0)] = 1
    rng = np.random.default_rng(seed)
    carved = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    carved_idx = np.sort(np.concatenate(carved)) if carved else np.zeros(0, np.int64)
    keep = np.ones(len(labels), bool)
    keep[carved_idx] = False
    return np.flatnonzero(keep), carved_idx.astype(np.int64)
