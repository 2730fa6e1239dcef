"""After a dataset's search: the per-trial summary, the best trial (chosen on validation), its one test
evaluation and its exported bundle."""

from __future__ import annotations
import math
from pathlib import Path
import pandas as pd
from typing import TYPE_CHECKING
from tune.record.experiment import CHECKPOINT
from diffmic.selection import best as best_of
if TYPE_CHECKING:
    from tune.study.dataset import DatasetSearch


def trial_frames(search: DatasetSearch, grid) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per trial, history: one row per reported epoch) for one dataset's ResultGrid."""
    rows, history = [], []
    for result in grid:
        df = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        row, hist = trial_row(search, trial_id, result.config, df, result.error is not None)
        rows.append(row)
        if hist is not None:
            history.append(hist)
    return pd.DataFrame(rows), (pd.concat(history, ignore_index=True) if history else pd.DataFrame())


def trial_row(search: DatasetSearch, trial_id: str, config: dict, df: pd.DataFrame, error: bool
              ) -> tuple[dict, pd.DataFrame | None]:
    """A trial's summary row and its history rows, from its reported results (one row per report, as Tune's
    metrics_dataframe); the live report (tune/pages/live.py) builds them the same way from what it has seen so far."""
    s, t, scaling = search.cfg["search"], search.cfg["train"], search.cfg["scaling"]
    metric, mode = s["metric"], s["mode"]
    workers = max(1, scaling["num_workers"])
    per_worker = dict(scaling["resources_per_worker"] or {})
    cpus = per_worker.get("CPU", 1) * workers
    gpus = (per_worker.get("GPU", 1) if scaling["use_gpu"] else 0) * workers
    wall = float(df["time_total_s"].max()) if "time_total_s" in df else math.nan
    if "epoch" in df:  # a run restarted after its last epoch reports that epoch again (engine.train): keep the
        df = df.drop_duplicates("epoch", keep="first").reset_index(drop=True)  # first, it carries the checkpoint
    params = {p.key: config.get(p.key) for p in search.params}
    row = {"dataset": search.dataset, "trial_id": trial_id, **params, **interval(df)}
    if metric in df.columns and df[metric].notna().any():
        # The first epoch of the best value, as the engine picks it (ties go to the earlier epoch).
        best = df.iloc[best_of(df.to_dict("records"), metric, mode)]
        # The trial's latest checkpoint: Ray Train always keeps it (num_to_keep drops only others, and may drop
        # the best epoch's own when scores tie), and it carries the weights of the best epoch so far.
        with_ckpt = df[df[CHECKPOINT].notna()] if CHECKPOINT in df else df.iloc[0:0]
        checkpoint = with_ckpt[CHECKPOINT].iloc[-1] if len(with_ckpt) else None
        epochs = int(df["epoch"].max())
        row.update({c: best[c] for c in df.columns if c.startswith("val_") and not isinstance(best[c], list)})
        row.update(best_epoch=int(best["epoch"]), epochs_run=epochs, checkpoint_path=checkpoint,
                   wall_time_s=wall, cpu_hours=wall * cpus / 3600, gpu_hours=wall * gpus / 3600)
        stopped = not error and epochs < t["epochs"]
        row["stopped_early"] = stopped
        row["status"] = "ERROR" if error else ("STOPPED_EARLY" if stopped else "COMPLETED")
        keep = [c for c in df.columns if c in ("epoch", "time_total_s") or c.startswith(("val_", "train_"))]
        return row, df[keep].assign(dataset=search.dataset, trial_id=trial_id)
    row.update(status="ERROR" if error else "NO_RESULT", epochs_run=0, stopped_early=False)
    return row, None


def interval(df: pd.DataFrame) -> dict:
    """When a trial ran, in epoch seconds: from its first result's timestamp less that result's own duration (the
    time since the trial started) to its last result's timestamp."""
    if "timestamp" not in df or df["timestamp"].isna().all():
        return {"started_at": math.nan, "ended_at": math.nan}
    first = df.loc[df["timestamp"].idxmin()]
    return {"started_at": float(first["timestamp"]) - float(first.get("time_this_iter_s", 0.0) or 0.0),
            "ended_at": float(df["timestamp"].max())}
