"""Accuracy against prediction cost, chosen after the search.

The sampler and its number of reverse steps do not change training; they only decide what a prediction costs (the
official code pays 250 denoiser steps per image). So after a dataset's search, each trial's best checkpoint is
measured on validation at every point of `search.pareto` (a grid of sampler settings), on the kind of device the
trial trained on. The rows go to `<experiment>/pareto.csv`; the points no other point beats on both the selection
metric and the milliseconds per image are the dataset's front (`on_front`). The exported model is the best point
within `search.max_cost_ms` (null: the most accurate one).
"""

from __future__ import annotations
import pandas as pd
from tune.selection.points import COST
from diffmic.selection import best


def mark_front(frame: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """`on_front`: no other point of the same dataset is at least as good on the metric and at least as cheap, and
    strictly better on one of them."""
    sign = 1.0 if mode == "max" else -1.0
    on = []
    for _, p in frame.iterrows():
        same = frame[frame["dataset"] == p["dataset"]]
        good, cost = sign * same[metric], same[COST]
        mine = sign * p[metric]
        beaten = ((good >= mine) & (cost <= p[COST]) & ((good > mine) | (cost < p[COST]))).any()
        on.append(bool(pd.notna(p[metric]) and not beaten))
    return frame.assign(on_front=on)


def choose(frame: pd.DataFrame, dataset: str, metric: str, mode: str, max_cost_ms: float | None,
           trial_id: str | None = None) -> pd.Series | None:
    """The dataset's best point within the cost budget (ties: the cheaper), among one trial's points and the
    control's if a trial is given."""
    points = frame[(frame["dataset"] == dataset) & frame[metric].notna()] if len(frame) else frame
    if trial_id is not None and len(points):
        control = points["model_kind"] == "control" if "model_kind" in points else False
        points = points[(points["trial_id"].astype(str) == str(trial_id)) | control]
    if max_cost_ms is not None and len(points):
        points = points[points[COST] <= max_cost_ms]
    if not len(points):
        return None
    return points.iloc[best(points.to_dict("records"), metric, mode)]  # ties: the cheaper, then the lower trial id
