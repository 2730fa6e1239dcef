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
from tune.selection.points import COST, kind_of, settings, with_controls
from tune.selection.pareto import mark_front


def measure_trial(checkpoint_uri: str, grid: list[dict]) -> list[dict]:
    """Each grid point's validation metrics and prediction cost for one checkpoint (runs as a Ray task, so on the
    trial's kind of device). A warm-up pass first, so that no point pays the process's one-time costs."""
    import torch

    from diffmic.evaluate import measure
    from tune.stages.checkpoints import open_checkpoint

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

    from tune.record.experiment import CHECKPOINT
    from tune.stages.checkpoints import task_resources

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
