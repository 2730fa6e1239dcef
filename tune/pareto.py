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

from diffmic.metrics import SCALAR_METRICS, prefixed

COST = "predict_ms_per_image"
POINT = ("sampler", "sample_steps", "num_samples")  # the settings a point is, as pareto.csv names them


class ParetoError(ValueError):
    pass


def check_grid(grid, timesteps: list[int]) -> None:
    """`search.pareto`: a list of {sampler, sample_steps?, num_samples?}; ddim steps must fit every searched T."""
    from diffmic.diffusion import SAMPLERS

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


def measure_trial(checkpoint_uri: str, grid: list[dict]) -> list[dict]:
    """Each grid point's validation metrics and prediction cost for one checkpoint (runs as a Ray task, so on the
    trial's kind of device). A warm-up pass first, so that no point pays the process's one-time costs."""
    import torch

    from diffmic.evaluate import measure
    from tune.results import open_checkpoint

    cfg, data, model, _, _, session = open_checkpoint(checkpoint_uri)
    warm = {**cfg, "diffusion": {**cfg["diffusion"], "sampler": "ddim", "sample_steps": 1, "num_samples": 1}}
    measure(model, torch.utils.data.Subset(data.val, range(min(len(data.val), 8))), warm, session, 0, None)
    rows = []
    for point in grid:
        chosen = settings(point, cfg)
        run = {**cfg, "diffusion": {**cfg["diffusion"], **chosen}}
        # each point gets the τ fitted on validation for its own chains (a DDIM-5 ŷ0 is not the official chain's)
        out = measure(model, data.val, run, session, cfg["seed"], None)
        rows.append({**chosen, "model_kind": kind_of(chosen["sampler"]), "temperature": out["temperature"],
                     **prefixed("val", {k: out[k] for k in SCALAR_METRICS if k in out}),
                     COST: out[COST], "denoiser_calls_per_image": out["denoiser_calls_per_image"],
                     "device": str(session.device)})
    return rows


def measure_trials(search, summary: pd.DataFrame, grid: list[dict] | None = None) -> pd.DataFrame:
    """pareto.csv's rows of one dataset: every checkpointed trial at every grid point (default: search.pareto and
    the DCG-alone point of search.controls), trials measured in parallel as Ray tasks with a trial worker's
    resources."""
    import ray

    from tune.record import CHECKPOINT
    from tune.results import task_resources

    if grid is None:
        grid = with_controls(search.cfg["search"]["pareto"], search.cfg["search"]["controls"])
    if not grid or CHECKPOINT not in summary:
        return pd.DataFrame()
    task = ray.remote(**task_resources(search.cfg))(measure_trial)
    trials = summary[summary[CHECKPOINT].notna()]
    pending = {row["trial_id"]: task.remote(search.record.checkpoint_uri(row), grid) for _, row in trials.iterrows()}
    rows = []
    for trial_id, ref in pending.items():
        try:
            rows += [{"dataset": search.dataset, "trial_id": trial_id, **r} for r in ray.get(ref)]
        except Exception as e:  # noqa: BLE001 (one trial's checkpoint must not cost the search its results)
            print(f"[search] {search.dataset}: trial {trial_id} not measured at the sampler points: "
                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    frame = pd.DataFrame(rows)
    return mark_front(frame, search.cfg["search"]["metric"], search.cfg["search"]["mode"]) if len(frame) else frame


def with_controls(grid: list[dict], controls: list[str]) -> list[dict]:
    """The sampler grid with the DCG-alone point added (search.controls names `dcg`): every trial's own guidance
    network is then a point on the front, at the cost of no denoiser call. An empty grid stays empty: the
    measurement is off, and the trials are exported as they were validated."""
    if grid and "dcg" in controls and not any(p.get("sampler") == "dcg" for p in grid):
        return [*grid, {"sampler": "dcg"}]
    return list(grid)


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
    return points.sort_values([metric, COST], ascending=[mode == "min", True]).iloc[0]


def sampling_of(point: pd.Series | None) -> dict | None:
    """A chosen point as the diffusion.* overrides a test and an export use."""
    if point is None:
        return None
    return {k: (str(point[k]) if k == "sampler" else None if pd.isna(point[k]) else int(point[k])) for k in POINT}


def kind_of(sampler: str) -> str:
    """What a point of a trial is: the diffusion head (a chain) or its DCG read out alone."""
    return "dcg" if sampler == "dcg" else "diffmic"
