"""Ray Tune's cost per trial, and what ASHA + TPE buys over random search, with the search's own machinery.

    python bench/bench_tune.py [--part overhead|efficiency|both] [--trials 20] [--samples 8] [--epochs 4]
                               [--image-size 32] [--num-train 200] [--backbone test_resnet] [--random-first]
                               [--json FILE]
                               [-- extra Hydra overrides for both searches of (b)]

(a) Tune overhead per trial: an empty function trainable (it reports once) run `--trials` times, one trial at a
    time, on a local Ray; wall time of `Tuner.fit()` ÷ trials. Twice: Tune's default searcher, and the search's own
    setup (Optuna TPE seeded + ConcurrencyLimiter + ASHA). Target: <= 2 s per trial.
(b) Search efficiency on `synthetic` at an equal trial budget (`--samples` trials of `--epochs` epochs, one at a time):
    `tune/search.py`'s machinery (`plan` + `run_search`: every trial a Ray Train run) with ASHA + TPE (the default) and
    with random search without early stopping. For each: wall time from the search's start until a reported
    validation macro-F1 comes within 1 point (0.01) of the best value either search saw. Target: random ÷ ASHA >= 3.
    With fewer trials than TPE's 10 random start-up trials, TPE samples like random search (its own seed): the
    difference is then ASHA's.

Ray's temporary files go to RAY_TMPDIR (default /tmp); results to a temporary directory, removed afterwards.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: timm would retry its lookups for ~40 s
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

POINT = 0.01  # "within 1 point" of macro-F1


# ------------------------------------------------------------------------------------------- (a) overhead
def _empty(config):
    from ray import tune
    tune.report({"score": config["x"]})


def tune_overhead(trials: int) -> dict:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from tune.study.runner import TRIAL_RESOURCES
    from ray.tune.search.optuna import OptunaSearch

    from tune.study.searcher import DistinctSampler

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("basic", "basic, reuse_actors", "search setup"):
            if name.startswith("basic"):
                config = tune.TuneConfig(num_samples=trials, max_concurrent_trials=1,
                                         reuse_actors=name.endswith("reuse_actors"))
            else:
                searcher = ConcurrencyLimiter(OptunaSearch(sampler=DistinctSampler(optuna.samplers.TPESampler(seed=0))),
                                              max_concurrent=1)
                config = tune.TuneConfig(num_samples=trials, metric="score", mode="max", search_alg=searcher,
                                         scheduler=ASHAScheduler(max_t=1, grace_period=1))
            tuner = tune.Tuner(tune.with_resources(_empty, TRIAL_RESOURCES), param_space={"x": tune.uniform(0, 1)},
                               tune_config=config,
                               run_config=tune.RunConfig(name=name.replace(" ", "-").replace(",", ""),
                                                         storage_path=tmp, verbose=0))
            start = time.perf_counter()
            grid = tuner.fit()
            wall = time.perf_counter() - start
            ok = sum(1 for r in grid if r.error is None and r.metrics.get("score") is not None)
            out[name] = {"trials": trials, "ok": ok, "wall_s": wall, "per_trial_s": wall / trials}
            print(f"[bench] (a) {name}: {trials} empty trials in {wall:.1f} s ({ok} reported)", flush=True)
    return out


# ----------------------------------------------------------------------------------------- (b) efficiency
def run_one(overrides: list[str]) -> dict:
    """One search through tune/search.py's own plan() and run_search(); every reported epoch with its time."""
    from hydra import compose, initialize_config_dir

    from diffmic.cli import CONFIG_DIR, to_plain
    from tune.study.runner import run_search
    from tune.study.plan import plan

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_plain(compose(config_name="search", overrides=overrides))
        _, searches = plan(cfg, overrides)
    search = searches[0]
    start = time.time()
    grid = run_search(search)
    wall = time.time() - start
    events, trials = [], []
    for result in grid:
        df = result.metrics_dataframe
        if df is None or "val_macro_f1" not in df:
            trials.append({"epochs": 0, "best": None, "error": str(result.error) if result.error else None})
            continue
        df = df[df["val_macro_f1"].notna()].sort_values("epoch")
        events += [(float(t) - start, float(v), id(result)) for t, v in zip(df["timestamp"], df["val_macro_f1"])]
        # time_total_s: since the trial started. Its first report = the fixed cost of a trial (Ray Train worker
        # group, data, model, DCG pre-training) + one epoch; later gaps = one epoch (train + validation).
        totals = list(df["time_total_s"])
        trials.append({"epochs": int(df["epoch"].max()), "best": float(df["val_macro_f1"].max()),
                       "first_report_s": totals[0], "epoch_s": [b - a for a, b in zip(totals, totals[1:])],
                       "error": str(result.error) if result.error else None})
    return {"wall_s": wall, "events": sorted(events), "trials": trials,
            "epochs_trained": sum(t["epochs"] for t in trials)}


def time_to(events: list[tuple], target: float) -> tuple[float | None, int | None]:
    """(seconds, epochs trained) from the search's start until a reported value >= target."""
    for n, (t, v, _) in enumerate(events, start=1):
        if v >= target - 1e-12:
            return t, n
    return None, None


def search_efficiency(args, storage: Path) -> dict:
    from tune.train.distributed import init_ray

    common = [f"storage.uri={storage}", "datasets=[synthetic]", f"search.num_samples={args.samples}",
              "search.max_concurrent_trials=1", f"train.epochs={args.epochs}", "train.dcg_pretrain_epochs=1",
              f"dataset.image_size={args.image_size}", f"dataset.num_train={args.num_train}", "dataset.num_test=32",
              f"model.dcg.backbone={args.backbone}", f"model.denoiser.encoder={args.backbone}",
              "model.denoiser.feature_dim=64", "diffusion.sample_steps=5", "train.eval_batch_size=64",
              "scaling.max_failures=0", "report=false", "export=false"]
    if args.image_size < 48:  # a 2x2 CAM holds at most 4 ROIs
        common.append("search.space.roi_count.choice=[1,2,4]")
    common += args.overrides
    init_ray({})
    runs = {}
    order = [("asha+tpe", ["search.scheduler=asha", "search.sampler=tpe"]),
             ("random, no early stopping", ["search.scheduler=none", "search.sampler=random"])]
    for name, extra in (order[::-1] if args.random_first else order):  # other work on the machine: try both orders
        print(f"[bench] (b) {name}: {args.samples} trials x {args.epochs} epochs", flush=True)
        runs[name] = run_one([*common, *extra, f"experiment=bench-{'asha' if 'asha' in name else 'random'}"])
    best = max((e[1] for r in runs.values() for e in r["events"]), default=None)
    out = {"settings": common, "best_seen": best, "runs": {}}
    for name, r in runs.items():
        reached, epochs = time_to(r["events"], best - POINT) if best is not None else (None, None)
        firsts = [t["first_report_s"] for t in r["trials"] if t.get("first_report_s") is not None]
        gaps = [g for t in r["trials"] for g in t.get("epoch_s", [])]
        out["runs"][name] = {"wall_s": r["wall_s"], "epochs_trained": r["epochs_trained"], "trials": r["trials"],
                             "best": max((e[1] for e in r["events"]), default=None), "time_to_target_s": reached,
                             "epochs_to_target": epochs, "events": [e[:2] for e in r["events"]],
                             "median_first_report_s": statistics.median(firsts) if firsts else None,
                             "median_epoch_s": statistics.median(gaps) if gaps else None}
    a, b = (out["runs"][k] for k in ("asha+tpe", "random, no early stopping"))
    out["speedup"] = (b["time_to_target_s"] / a["time_to_target_s"]) if a["time_to_target_s"] and b["time_to_target_s"] else None
    out["epoch_speedup"] = (b["epochs_to_target"] / a["epochs_to_target"]) if a["epochs_to_target"] and b["epochs_to_target"] else None
    out["wall_ratio"] = out["runs"]["random, no early stopping"]["wall_s"] / out["runs"]["asha+tpe"]["wall_s"]
    return out


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("overhead", "efficiency", "both"), default="both")
    parser.add_argument("--trials", type=int, default=20, help="(a) empty trials")
    parser.add_argument("--samples", type=int, default=8, help="(b) trials per search")
    parser.add_argument("--epochs", type=int, default=4, help="(b) epochs per trial")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--backbone", default="test_resnet", help="timm name for the DCG and the denoiser encoder")
    parser.add_argument("--random-first", action="store_true", help="(b) run the random search first")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both searches of (b)")
    args = parser.parse_args(argv)

    import ray

    from tune.train.distributed import init_ray

    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "ray": ray.__version__, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DIFFMIC_CACHE"] = str(Path(tmp) / "cache")  # a fresh Optuna study per run
        start = time.perf_counter()
        init_ray({})
        report["ray_init_s"] = time.perf_counter() - start
        if args.part in ("overhead", "both"):
            report["overhead"] = tune_overhead(args.trials)
        if args.part in ("efficiency", "both"):
            report["efficiency"] = search_efficiency(args, Path(tmp) / "results")
    report["load_after"] = os.getloadavg()

    print(f"\n== bench_tune ({report['cpus']} CPUs, ray {report['ray']}, load {report['load_before'][0]:.1f} -> "
          f"{report['load_after'][0]:.1f}; ray.init {report['ray_init_s']:.1f} s, not counted) ==")
    if "overhead" in report:
        for name, o in report["overhead"].items():
            print(f"(a) Tune overhead per trial, empty trainable, {name}: {o['per_trial_s']:.2f} s "
                  f"({o['trials']} trials one at a time in {o['wall_s']:.1f} s; target <= 2 s)")
    if "efficiency" in report:
        e = report["efficiency"]
        print(f"(b) best validation macro-F1 seen: {e['best_seen']:.3f}; target: >= {e['best_seen'] - POINT:.3f}")
        for name, r in e["runs"].items():
            reached = f"{r['time_to_target_s']:.0f} s" if r["time_to_target_s"] is not None else "never"
            print(f"(b) {name}: within 1 point after {reached} ({r['epochs_to_target']} epochs trained); best "
                  f"{r['best']:.3f}; {r['epochs_trained']} epochs in all; whole search {r['wall_s']:.0f} s; per "
                  f"trial: start to first report {r['median_first_report_s']:.1f} s, then "
                  f"{(r['median_epoch_s'] or 0):.1f} s per epoch (medians)")
        speed = f"{e['speedup']:.2f}" if e["speedup"] else "n/a (a search never came within 1 point)"
        print(f"(b) time to within 1 point of the best, random / ASHA+TPE: {speed} (target >= 3)")
        if e["epoch_speedup"]:
            print(f"(b) epochs trained until within 1 point, random / ASHA+TPE: {e['epoch_speedup']:.2f}")
        print(f"(b) whole-search wall time, random / ASHA+TPE: {e['wall_ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    ray.shutdown()
    return report


if __name__ == "__main__":
    main()
