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


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    """Write the checkpoint into a sibling temp dir, then swap it in, so a crash never leaves a half-written one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_checkpoint_files(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent), state)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
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
    return torch.load(path, map_location="cpu", weights_only=True)
