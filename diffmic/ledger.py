"""The ledger of test looks. Every evaluation on a test split adds one line to `test-looks.csv` — beside the run for
a training run or `diffmic.evaluate`, under the experiment for a search and `tune.export` — so that a reader can see
how often the test set was consulted: a figure picked after many looks is a validation figure in disguise.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

LEDGER = "test-looks.csv"
FIELDS = ("time", "command", "dataset", "trial", "point", "images", "accuracy", "macro_f1", "auc")


def look(command: str, metrics: dict, dataset: str = "", trial: str = "", point: dict | str | None = None) -> dict:
    """One line: when, which command, which model and sampler point, and the headline figures it saw."""
    if isinstance(point, dict):
        point = " ".join(f"{k}={v}" for k, v in point.items() if v is not None)
    cm = metrics.get("confusion_matrix")
    images = metrics.get("images", sum(map(sum, cm)) if cm else "")
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "dataset": dataset,
            "trial": trial, "point": point or "", "images": images,
            **{k: metrics.get(k, "") for k in ("accuracy", "macro_f1", "auc")}}


def lines(rows: list[dict], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def append(directory: str | Path, row: dict) -> Path:
    """Add one line to the ledger in `directory` (created with its header when new)."""
    path = Path(directory) / LEDGER
    new = not path.exists()
    with path.open("a", newline="") as f:
        f.write(lines([row], header=new))
    return path
