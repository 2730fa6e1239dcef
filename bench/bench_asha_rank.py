#!/usr/bin/env python
"""bench/bench_asha_rank.py [--trials 8] [--dataset synthetic] [--history FILE]: does a trial's rank at an early epoch
predict its final rank? ASHA stops trials at its first rung (`search.grace_period` epochs), so the grace period should
be the first epoch whose ranking already agrees with the final one.

Runs one search with ASHA off (`search.scheduler=none`, every trial its full epochs; the dataset's search preset
otherwise) on a local Ray instance, or reads the history.csv of one given with `--history`, and prints, for each epoch
e, Spearman's rho between the trials' validation metric at e and their best over all epochs, for the head and for its
DCG (`val_dcg_*`), and the grace period it suggests: the first epoch with rho >= --min-rho.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spearman(a, b) -> float:
    import pandas as pd
    return float(pd.Series(list(a)).rank().corr(pd.Series(list(b)).rank()))


def ranks(history, metric: str) -> list[tuple[int, float]]:
    """(epoch, rho of the trials' metric at that epoch against their best) for every epoch all trials reached."""
    best = history.groupby("trial_id")[metric].max()
    out = []
    for epoch, rows in history.groupby("epoch"):
        at = rows.set_index("trial_id")[metric]
        if len(at) == len(best):
            out.append((int(epoch), spearman(at.loc[best.index], best)))
    return out


def main() -> None:
    import pandas as pd

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--metric", default="val_macro_f1")
    p.add_argument("--min-rho", type=float, default=0.8)
    p.add_argument("--history", type=Path, help="a search's history.csv (no search is run)")
    a = p.parse_args()
    if a.history is None:
        out = Path(tempfile.mkdtemp(prefix="asha-rank-"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "tune/search.py", f"datasets=[{a.dataset}]", "experiment=rank",
                        f"storage.uri={out}", "search.scheduler=none", f"search.num_samples={a.trials}",
                        "search.controls=[]", "search.pareto=[]", "export=false", "report=false"],
                       cwd=ROOT, env=env, check=True)
        a.history = out / "rank" / "history.csv"
    history = pd.read_csv(a.history, dtype={"trial_id": str})
    metric = a.metric
    dcg = "val_dcg_" + metric.removeprefix("val_")
    print(f"{history['trial_id'].nunique()} trials, {history['epoch'].max()} epochs; Spearman rho of the rank at "
          f"each epoch against the final rank ({metric}):")
    head = ranks(history, metric)
    guide = dict(ranks(history, dcg)) if dcg in history else {}
    for epoch, rho in head:
        print(f"  epoch {epoch}: head {rho:+.2f}" + (f", its DCG {guide[epoch]:+.2f}" if epoch in guide else ""))
    grace = next((e for e, rho in head if rho >= a.min_rho), None)
    print(f"suggested search.grace_period: {grace if grace is not None else 'none reached rho >= ' + str(a.min_rho)}")


if __name__ == "__main__":
    main()
