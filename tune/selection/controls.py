"""The controls every search runs beside its trials (`search.controls`), so that the diffusion head has to earn its
place: a search that cannot beat them says so and exports the control instead.

- `dcg`: each trial's own guidance network read out alone (`diffusion.sampler=dcg`, no denoiser call), a point of
  pareto.csv beside the trial's chains (tune/selection/pareto.py adds it to the grid).
- `control`: a plain classifier, the DCG's global backbone with a linear head (its 1x1-convolution classifier over
  the average-pooled map, the global stream alone: `fusion_weight=1`, `top_t=1`), trained with the DCG's optimiser
  on the same splits, augmentation, image size and epochs as a trial (`train.denoiser=false`: the diffusion epochs
  train the DCG alone). One Ray Train run per dataset, measured on validation as a pareto.csv point of kind
  `control` and chosen among the trials' points by the search's one rule.
"""
from __future__ import annotations

import time

import pandas as pd
from diffmic.selection import best as best_of

CONTROLS = ("dcg", "control")
# A trial's config with these values is the plain classifier (see the module's docstring).
CONTROL_OVERRIDES = {"train.denoiser": False, "train.joint_dcg": True, "train.mmd_weight": 0.0,
                     "model.dcg.fusion_weight": 1.0, "model.dcg.top_t": 1.0, "diffusion.sampler": "dcg", "diffusion.sample_steps": None,
                     "diffusion.num_samples": 1}
CONTROL_RUN = "control"  # its Ray Train run's name, under the dataset's finalists folder; its trial_id


def check_controls(value) -> None:
    from tune.study.space import SearchError

    if not isinstance(value, list) or any(c not in CONTROLS for c in value):
        raise SearchError(f"search.controls={value!r}: expected a list of {', '.join(CONTROLS)} ([] runs none)")


def run_control(search) -> pd.Series | None:
    """Train the dataset's plain classifier (resumed from its checkpoints when the search is resumed) and return it
    as a summary-like row: trial_id `control`, its best epoch's validation figures, checkpoint and wall time."""
    from diffmic.config import split_seed, with_values
    from diffmic.metrics import SCALAR_METRICS
    from diffmic.secrets import redact_config
    from tune.train.distributed import build_trainer
    from tune.storage import open_storage

    metric, mode = search.cfg["search"]["metric"], search.cfg["search"]["mode"]
    cfg = with_values(redact_config(search.cfg), {**CONTROL_OVERRIDES, "dataset.split_seed": split_seed(search.cfg)})
    storage = open_storage(search.storage.join(search.record.finalists_key(search.dataset)), check=False)
    print(f"[search] {search.dataset}: training the plain control (the DCG's global backbone + linear head)",
          flush=True)
    started = time.time()
    result = build_trainer(cfg, storage, name=CONTROL_RUN).fit()
    if result.error:
        raise result.error
    reported = [m for _, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    if not reported or result.checkpoint is None:
        return None
    best = reported[best_of(reported, metric, mode)]
    return pd.Series({"dataset": search.dataset, "trial_id": CONTROL_RUN,
                      **{f"val_{m}": best.get(f"val_{m}") for m in SCALAR_METRICS},
                      "best_epoch": best.get("epoch"), "wall_time_s": time.time() - started,
                      "checkpoint_path": result.checkpoint.path})


def beaten_sentence(kind: str) -> str:
    """The one sentence a search that did not beat its controls says (the console, the report)."""
    what = "its own DCG read out alone" if kind == "dcg" else "a plain classifier (the DCG's backbone + linear head)"
    return (f"at this budget the diffusion head did not beat {what}: the exported model is that {kind} "
            f"(model_kind={kind})")


def control_columns(control: pd.Series | None, test: dict | None) -> dict:
    """best.csv's control_* columns: the control's validation (best epoch) and test figures and its wall time."""
    if control is None:
        return {}
    from diffmic.metrics import HEAD_METRICS
    out = {f"control_val_{m}": control.get(f"val_{m}") for m in HEAD_METRICS}
    out.update({f"control_test_{m}": (test or {}).get(m) for m in HEAD_METRICS})
    out["control_wall_time_s"] = control.get("wall_time_s")
    return out
