"""Training checkpoints: a directory with `state.pt` (everything needed to resume) and `metrics.json`.

States hold only tensors and plain Python values, so they load with `torch.load(weights_only=True)`: a checkpoint
from storage is never unpickled into arbitrary objects.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffmic.errors import DiffmicError

STATE_FILE, METRICS_FILE = "state.pt", "metrics.json"


def to_jsonable(value):
    """Plain JSON (NaN/inf → null), for metrics files that other tools read."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return to_jsonable(value.item())
    return value


def previous(directory: Path) -> Path:
    """Where save_checkpoint keeps the checkpoint before the latest one."""
    return directory.with_name(f"{directory.name}-previous")


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    """Write the checkpoint into a sibling temp dir, then swap it in, so a crash never leaves a half-written one. The
    one it replaces is kept as <directory>-previous: a latest checkpoint damaged later (a disk error, a file cut
    short by a copy) still leaves one to resume from."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_checkpoint_files(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent), state)
    if directory.exists():
        shutil.rmtree(previous(directory), ignore_errors=True)
        os.replace(directory, previous(directory))
    os.replace(tmp, directory)
    return directory


def write_checkpoint_files(directory: str | Path, state: dict) -> Path:
    """Write the checkpoint files into an existing (fresh) directory, e.g. one Ray Train will upload."""
    directory = Path(directory)
    torch.save(state, directory / STATE_FILE)
    last = state["history"][-1] if state.get("history") else {}
    (directory / METRICS_FILE).write_text(json.dumps(to_jsonable({"epoch": state["epoch"], "metrics": last,
                                                                  "best": state.get("best")}), indent=1))
    return directory


def load_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(directory)!r}: no {STATE_FILE} inside (expected a checkpoint "
                                f"directory written by diffmic)")
    import warnings
    try:
        with warnings.catch_warnings():  # torch's own warning about a refused pickle would precede the one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:  # truncated, corrupt, or holding objects weights_only refuses
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}); expected a {STATE_FILE} written by diffmic") from None
    if not isinstance(state, dict) or not {"epoch", "model", "config"} <= set(state):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a diffmic training state (expected a dict with epoch, "
                              "model and config)")
    return state


class CheckpointError(DiffmicError):
    """A checkpoint that cannot be used; one line naming it."""


def evaluation_weights(state: dict) -> dict[str, torch.Tensor]:
    """The weights a checkpoint is evaluated and exported with: those of its best validation epoch (EMA-averaged when
    the run keeps an EMA). A checkpoint whose own epoch is the best stores them as its model + EMA shadow."""
    if state.get("best_weights") is not None:
        return state["best_weights"]
    best_epoch = (state.get("best") or {}).get("epoch", state["epoch"])
    if best_epoch not in (0, state["epoch"]):
        raise ValueError(f"checkpoint of epoch {state['epoch']} lacks the weights of its best epoch {best_epoch}")
    weights = dict(state["model"])
    if state.get("ema"):
        weights.update(state["ema"]["shadow"])
    return weights


def fitted_temperature(state: dict, of: str = "temperature") -> float:
    """The τ of the class probabilities that the best validation epoch fitted (diffmic.calibration); `of`:
    "temperature" (the diffusion head's) or "dcg_temperature" (its DCG's)."""
    return float(((state.get("best") or {}).get("metrics") or {}).get(of, 1.0))


def load_eval_model(state: dict, num_classes: int | None = None):
    """The model a checkpoint state is evaluated and exported with (its config, its best epoch's weights): the one
    way from a checkpoint to an evaluation model (evaluate, the search's test and export, the tests)."""
    from diffmic.defaults import complete
    from diffmic.models import build_model
    cfg = complete(state["config"])  # an older checkpoint's missing keys: from configs/, never a code default
    model = build_model(cfg, num_classes or len(state["class_names"]), cfg["dataset"]["image_size"],
                        initial_weights=False)
    model.load_state_dict(evaluation_weights(state))
    return model
