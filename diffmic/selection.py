"""The one rule that says which result is better under a metric and a mode (max | min), used wherever something is
picked: the engine's best epoch, a trial's best epoch in Tune's results, the best trial, the finalists' ranking and
choice, the Pareto choice, the plain control's best checkpoint, promotion, the live page's "best so far".

Ties go to the earliest epoch, then to the cheaper prediction (a Pareto point), then to the lowest trial id, then
to the candidate given first; a missing (None or NaN) value is never better than a present one. Ray Train's own
checkpoint scoring ranks by the same metric and mode (train.select_metric/select_mode); its ties are Ray's, which
is why a trial's exported weights are the engine's best epoch, carried by its latest checkpoint.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

MODES = ("max", "min")
TIE_KEYS = ("epoch", "best_epoch", "predict_ms_per_image", "trial_id")  # in this order, the smaller wins


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def better(value: Any, than: Any, mode: str) -> bool:
    """`value` strictly better than `than` under `mode`; equal values are not better (the earlier one stays)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected max or min")
    if missing(value):
        return False
    if missing(than):
        return True
    return value > than if mode == "max" else value < than


def order(candidate: Mapping, metric: str, mode: str) -> tuple:
    """A sort key: the best candidate first under the rule (its value, then the tie keys it has)."""
    value = candidate.get(metric)
    gone = missing(value)
    ties = tuple((missing(candidate.get(k)), str(candidate.get(k)) if k == "trial_id" else candidate.get(k))
                 for k in TIE_KEYS if k in candidate)
    return (gone, 0.0 if gone else (-value if mode == "max" else value), ties)


def ranked(candidates: Iterable[Mapping], metric: str, mode: str) -> list[int]:
    """Positions of the candidates that have the metric, best first."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected max or min")
    items = list(candidates)
    keep = [i for i, c in enumerate(items) if not missing(c.get(metric))]
    return sorted(keep, key=lambda i: order(items[i], metric, mode))  # stable: the first given wins a full tie


def best(candidates: Iterable[Mapping], metric: str, mode: str) -> int | None:
    """Position of the best candidate (None when none has the metric)."""
    order_ = ranked(candidates, metric, mode)
    return order_[0] if order_ else None
