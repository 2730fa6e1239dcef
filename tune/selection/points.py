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
from tune.errors import ParetoError


COST = "predict_ms_per_image"


POINT = ("sampler", "sample_steps", "num_samples")  # the settings a point is, as pareto.csv names them




def check_grid(grid, timesteps: list[int]) -> None:
    """`search.pareto`: a list of {sampler, sample_steps?, num_samples?}; ddim steps must fit every searched T."""
    from diffmic.choices import SAMPLERS

    if not isinstance(grid, list):
        raise ParetoError(f"search.pareto={grid!r}: expected a list of sampler settings, e.g. "
                          "[{sampler: official}, {sampler: ddim, sample_steps: 10}] ([] turns it off)")
    for i, point in enumerate(grid):
        where = f"search.pareto[{i}]={point!r}"
        if not isinstance(point, dict) or set(point) - set(POINT) or point.get("sampler") not in SAMPLERS:
            raise ParetoError(f"{where}: expected {{sampler: {'|'.join(SAMPLERS)}, sample_steps: N, num_samples: S}}")
        for key in ("sample_steps", "num_samples"):
            value = point.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ParetoError(f"{where}: {key} must be an integer >= 1")
        steps = point.get("sample_steps")
        if point["sampler"] == "ddim" and steps is not None and steps > min(timesteps):
            raise ParetoError(f"{where}: {steps} DDIM steps exceed the smallest diffusion.timesteps searched "
                              f"({min(timesteps)})")


def settings(point: dict, cfg: dict) -> dict:
    """A grid point as the diffusion.* overrides it stands for on a trial's config (its own T and preset start)."""
    d = cfg["diffusion"]
    sampler = point["sampler"]
    if sampler == "dcg":  # no chain: the DCG alone
        return {"sampler": "dcg", "sample_steps": None, "num_samples": 1}
    if sampler == "ddpm":
        steps = d["timesteps"]  # the whole chain
    elif point.get("sample_steps") is not None:
        steps = point["sample_steps"]
    else:  # official: the preset's start; ddim: the whole chain, respaced to itself
        steps = d["sample_steps"] if sampler == "official" and d["sample_steps"] is not None else (
            d["beta_steps"] or d["timesteps"] if sampler == "official" else d["timesteps"])
    return {"sampler": sampler, "sample_steps": int(steps),
            "num_samples": int(point.get("num_samples") or d["num_samples"])}


def with_controls(grid: list[dict], controls: list[str]) -> list[dict]:
    """The sampler grid with the DCG-alone point added (search.controls names `dcg`): every trial's own guidance
    network is then a point on the front, at the cost of no denoiser call. An empty grid stays empty: the
    measurement is off, and the trials are exported as they were validated."""
    if grid and "dcg" in controls and not any(p.get("sampler") == "dcg" for p in grid):
        return [*grid, {"sampler": "dcg"}]
    return list(grid)


def sampling_of(point: pd.Series | None) -> dict | None:
    """A chosen point as the diffusion.* overrides a test and an export use."""
    if point is None:
        return None
    return {k: (str(point[k]) if k == "sampler" else None if pd.isna(point[k]) else int(point[k])) for k in POINT}


def kind_of(sampler: str) -> str:
    """What a point of a trial is: the diffusion head (a chain) or its DCG read out alone."""
    return "dcg" if sampler == "dcg" else "diffmic"
