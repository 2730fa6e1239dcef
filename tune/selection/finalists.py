"""Finalists confirmed over seeds: the best trial of a short search is partly seed luck.

`search.finalists=K search.repeats=R`: after a dataset's search, its K best distinct configurations (on the selection
rule) are trained R more times each, for the full epoch budget: with `search.repeat_mode=seeds`, with seeds other than
the search's and the same data split; with `folds`, with the search's seed and R other stratified carves of the
validation split (`dataset.val_carve` 1..R; the test split does not move, so the one test stays untouched). Each configuration gets the mean and sd of every validation metric over its repeats; the configuration with
the best mean is selected, and its repeat 0 — fixed in advance, so that the exported model's validation figure is not
the maximum of R draws — is the model that is tested (once) and exported. The runs are plain
Ray Train runs named after their configuration and repeat, so a resumed search continues each from its checkpoints.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from diffmic.metrics import SCALAR_METRICS
from diffmic.selection import best, ranked as rank

SEED_STRIDE = 7919  # repeat r trains with seed + (r + 1) * SEED_STRIDE: never the search's own seed
REPEAT_MODES = ("seeds", "folds")


def top_configs(summary: pd.DataFrame, keys: list[str], metric: str, mode: str, k: int) -> list[dict]:
    """The k best distinct configurations among the trials that reported the metric."""
    ranked = summary.iloc[rank(summary.to_dict("records"), metric, mode)] if metric in summary else summary.iloc[0:0]
    seen, out = set(), []
    for _, row in ranked.iterrows():
        params = {key: _plain(row[key]) for key in keys}
        fingerprint = json.dumps(params, sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            out.append(params)
        if len(out) == k:
            break
    return out


def plan_runs(configs: list[dict], repeats: int, seed: int, mode: str = "seeds") -> list[dict]:
    """One entry per (configuration, repeat): its parameters, seed, validation carve and a name that names exactly
    that run (folds runs are named apart from seeds runs: they are other models)."""
    runs = []
    for i, params in enumerate(configs):
        tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        for r in range(repeats):
            if mode == "folds":
                runs.append({"config": i, "params": params, "repeat": r, "seed": seed, "val_carve": r + 1,
                             "name": f"finalist-{tag}-f{r}"})
            else:
                runs.append({"config": i, "params": params, "repeat": r, "seed": seed + (r + 1) * SEED_STRIDE,
                             "val_carve": 0, "name": f"finalist-{tag}-r{r}"})
    return runs


def confirm(search, summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series | None, dict]:
    """(finalists.csv rows of the dataset, the selected run as a summary-like row, {val_<m>_mean, val_<m>_sd} of the
    selected configuration). Nothing when the search has no finalists to confirm."""
    from diffmic.config import split_seed, with_values
    from diffmic.data import build_splits
    from diffmic.remote import localize
    from diffmic.secrets import redact_config
    from tune.train.distributed import build_trainer, write_splits
    from tune.study.runner import max_concurrent
    from tune.storage import open_storage

    s = search.cfg["search"]
    metric, mode, keys = s["metric"], s["mode"], [p.key for p in search.params]
    configs = top_configs(summary, keys, metric, mode, s["finalists"])
    if not configs or not s["repeats"]:
        return pd.DataFrame(), None, {}
    base = redact_config(search.cfg)
    # The split seed stays the search's: a seeds repeat changes the initialisation and the batches, a folds repeat
    # only which training images are validation; neither moves the test split.
    pinned = {"dataset.split_seed": split_seed(search.cfg)}
    storage = open_storage(search.storage.join(search.record.finalists_key(search.dataset)), check=False)
    runs = plan_runs(configs, s["repeats"], int(search.cfg["seed"]), s["repeat_mode"])
    print(f"[search] {search.dataset}: confirming {len(configs)} finalists x {s['repeats']} repeats "
          f"({s['repeat_mode']})", flush=True)

    def train(run: dict) -> dict:
        cfg = with_values(base, {**run["params"], **pinned, "seed": run["seed"],
                                 "dataset.val_carve": run["val_carve"]})
        if run["val_carve"]:  # a folds repeat validates on a carve of its own: its membership beside the run
            local = localize(cfg)["dataset"]  # s3:// data: already in this node's cache (the plan read it)
            write_splits(storage, run["name"], build_splits(local, seed=split_seed(cfg)).membership)
        result = build_trainer(cfg, storage, name=run["name"]).fit()
        if result.error:
            raise result.error
        reported = [m for _, m in (result.best_checkpoints or []) if m.get(metric) is not None]
        top = reported[best(reported, metric, mode)] if reported else {}
        return {"dataset": search.dataset, "config": run["config"], **run["params"], "repeat": run["repeat"],
                "seed": run["seed"], "val_carve": run["val_carve"], "trial_id": run["name"],
                **{f"val_{m}": top.get(f"val_{m}") for m in SCALAR_METRICS},
                "best_epoch": top.get("epoch"),
                "checkpoint_path": result.checkpoint.path if result.checkpoint is not None else None}

    with ThreadPoolExecutor(max_workers=max(1, min(len(runs), max_concurrent(search.cfg)))) as pool:
        frame = pd.DataFrame(list(pool.map(train, runs)))
    means = frame.groupby("config")[metric].mean()
    configs = [{"config": c, metric: m} for c, m in means.items()]  # in rank order: a full tie keeps the better-ranked
    chosen = int(configs[best(configs, metric, mode)]["config"])
    mine = frame[(frame["config"] == chosen) & frame[metric].notna() & frame["checkpoint_path"].notna()]
    if mine.empty:
        return frame, None, {}
    selected = mine.sort_values("repeat").iloc[0]  # repeat 0 (the first with a checkpoint), never the luckiest
    stats = {}
    for m in SCALAR_METRICS:
        values = pd.to_numeric(frame.loc[frame["config"] == chosen, f"val_{m}"], errors="coerce")
        stats[f"val_{m}_mean"] = float(values.mean())
        stats[f"val_{m}_sd"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else float("nan")
    return frame, selected, stats


def _plain(value):
    """A pandas/numpy scalar as the plain Python value a config holds."""
    return value.item() if hasattr(value, "item") else value


def test_spread(search, runs: pd.DataFrame, exported: pd.Series, exported_test: dict, sampling: dict | None,
                test_best, look) -> dict:
    """test_<metric>_repeats_mean/_sd over the exported configuration's repeats at the exported point: how much of
    the one exported model's test figure is its seed. The configuration is already fixed, so this is no selection on
    test; each further repeat's test is a test look (counted in the ledger)."""
    mine = runs[(runs["config"] == exported["config"]) & runs["checkpoint_path"].notna()]
    tests = [exported_test]
    for _, run in mine[mine["trial_id"] != exported["trial_id"]].iterrows():
        tests.append(test_best(search, run, None, sampling, explain=False)["test"])
        search.record.append_test_look(look("search (repeat)", tests[-1], search.dataset, str(run["trial_id"]),
                                            sampling))
    out = {}
    for m in SCALAR_METRICS:
        xs = pd.Series([float(t[m]) for t in tests if isinstance(t.get(m), (int, float))])
        if len(xs):
            out[f"test_{m}_repeats_mean"] = float(xs.mean())
            out[f"test_{m}_repeats_sd"] = float(xs.std(ddof=1)) if len(xs) > 1 else float("nan")
    return out
