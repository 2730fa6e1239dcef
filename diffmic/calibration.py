"""Class probabilities from the diffusion head's output ŷ0.

ŷ0 lives near the label simplex (a one-hot vector for a confident prediction), so softmax(ŷ0) cannot express
confidence: a perfect one-hot ŷ0 gets a top probability of e/(e+C−1), 0.31 for 7 classes, and ECE would measure that
built-in under-confidence. The probabilities are therefore softmax(ŷ0 / τ), averaged over the S sampled chains, with
one temperature τ fitted on the validation split (lowest negative log-likelihood) and stored with the model. ECE, AUC,
`predict`'s confidence and entropy all use them; the argmax of a single chain does not depend on τ.
"""
from __future__ import annotations

import numpy as np

TEMPERATURE_RANGE = (1e-3, 1e2)


def class_probabilities(samples: np.ndarray, temperature: float) -> np.ndarray:
    """S×N×C chain outputs ŷ0 → N×C probabilities: the mean over chains of softmax(ŷ0 / τ)."""
    z = np.asarray(samples, dtype=np.float64) / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return (z / z.sum(-1, keepdims=True)).mean(0)


def negative_log_likelihood(samples: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probs = class_probabilities(samples, temperature)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(samples: np.ndarray, labels: np.ndarray) -> float:
    """The τ in TEMPERATURE_RANGE with the lowest NLL: a log-spaced scan, then a golden-section refinement."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    grid = np.linspace(lo, hi, 41)
    nll = [negative_log_likelihood(samples, labels, float(np.exp(g))) for g in grid]
    i = int(np.argmin(nll))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(30):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if negative_log_likelihood(samples, labels, float(np.exp(c))) < \
                negative_log_likelihood(samples, labels, float(np.exp(d))):
            b = d
        else:
            a = c
    best = float(np.exp((a + b) / 2))
    return best if negative_log_likelihood(samples, labels, best) <= min(nll) else float(np.exp(grid[i]))
