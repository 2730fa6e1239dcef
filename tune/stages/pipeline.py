"""`python tune/search.py [overrides]`, from plan to report: plan (every check, before Ray), then per dataset at once
its trials (a Ray Tune experiment, Optuna sampling, ASHA stopping) and the stages after them (tune/stages/steps.py:
control, finalists, points, choice, test and export), each writing its artefact into the record as it completes;
then the promotion of a first best model, the report and the tracking servers' final entries.

Running again with the same experiment name resumes: Tune restores the trials, and each stage after them whose
artefact is in the record is not run again.
"""
from __future__ import annotations

import os
import sys

from tune.study.plan import plan


def search(cfg: dict, overrides: list[str], own: dict[str, list[str]] | None = None) -> None:
    import time

    storage, searches = plan(cfg, overrides, own)  # every check, before Ray, Tune or torch is imported
    from tune.pages.live import LiveReport
    from tune.record.experiment import Record
    from tune.record.results import describe
    from tune.study.pool import POOLS, TrialPool
    from tune.study.runner import max_concurrent
    from tune.train.distributed import init_ray

    record = Record(storage, cfg["experiment"])
    started = time.time()
    described = {s.dataset: describe(s.cfg, s.params) for s in searches}
    record.add_searches(described, started)  # the record reads (report, live page) from the first stage on
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter shows the columns chosen below
    init_ray(cfg)
    # Every dataset's search runs at once on the same cluster, sharing search.max_concurrent_trials (tune/study/pool.py).
    pool = POOLS[record.uri] = TrialPool(max_concurrent(cfg))
    trials = f"{pool.total} trial{'s' if pool.total != 1 else ''}"
    print(f"[search] {len(searches)} dataset(s) at once, at most {trials} at a time", flush=True)
    live = LiveReport(record, searches, started, cfg["report_every_s"], write=cfg["report"]).start()
    if cfg["report"]:
        print(f"[search] live report: {record.uri}/report.html (python tune/report.py {record.uri} --serve)",
              flush=True)
    try:
        outcomes = run_concurrently([lambda s=s: search_dataset(s, cfg["export"], pool, live) for s in searches])
    finally:
        live.close()  # before the final page, which a live one must not overwrite
    record.add_searches(described, started, time.time() - started)
    if cfg["export"]:
        from tune.record.promote import first_current
        for s, best in zip(searches, outcomes):
            if best is not None:
                print(f"[search] {first_current(record, s.dataset)}", flush=True)
    report_uri = None
    if cfg["report"]:
        from tune.pages.serve import write_report
        report_uri = write_report(record)
    from tune.pages import tracking
    for s, best in zip(searches, outcomes):  # the trial runs get their checkpoints, the dataset's its model and report
        tracking.finish(s, record.read_rows("summary", s.dataset), best, report_uri)
    print_tables(record.read_table("summary"), record.read_table("best"), record, cfg["report"])


def run_concurrently(jobs: list) -> list:
    """Run the jobs in threads (each dataset's Tuner.fit blocks its caller) and return their results in order; the
    first error is raised once all have ended. One job runs in this thread, which keeps Tune's own Ctrl-C handling
    (it saves the experiment's state before it stops); with several, Ctrl-C ends the process, and the state saved
    as the search went is what the same command resumes from."""
    import threading

    if len(jobs) == 1:
        return [jobs[0]()]
    results, errors = [None] * len(jobs), [None] * len(jobs)

    def work(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        print("[search] interrupted: run the same command again to resume", file=sys.stderr, flush=True)
        os._exit(130)
    for e in errors:
        if e is not None:
            raise e
    return results


def search_dataset(s, export: bool, pool, live) -> dict | None:
    """One dataset, start to end: its Tune experiment (summary.csv, history.csv as soon as its trials end), then the
    stages after the trials (tune/stages/steps.py). Returns its best.json entry (None: nothing to test)."""
    from tune.record.results import best_trial
    from tune.selection.trials import trial_frames
    from tune.stages import steps
    from tune.study.resume import snapshot
    from tune.study.runner import run_search

    pool.join(s.dataset)
    try:
        grid = run_search(s)
    finally:
        pool.leave(s.dataset)
    summary, history = trial_frames(s, grid)
    s.record.write_rows("summary", s.dataset, summary)
    s.record.write_rows("history", s.dataset, history)
    if not s.cfg["search"]["optuna_storage"] and s.optuna_db().exists():
        s.record.write_study(s.dataset, snapshot(s.optuna_db()))
    metric, mode = s.cfg["search"]["metric"], s.cfg["search"]["mode"]
    best = best_trial(summary, metric, mode)
    if best is None:
        print(f"[search] {s.dataset}: no trial reported {metric}; nothing to test or export", flush=True)
        return None
    summary = summary.assign(trial_id=summary["trial_id"].astype(str))
    control = steps.control_stage(s, live)
    runs, selected, repeats = steps.finalists_stage(s, summary, live)
    points = steps.points_stage(s, summary, control, selected, live)
    choice = steps.choice_stage(s, points, best, selected, repeats)
    models = {str(r["trial_id"]): r for r in [*(row for _, row in summary.iterrows()), selected, control]
              if r is not None}
    return steps.test_stage(s, choice, models[choice["trial_id"]], control, runs, repeats, export, live)


def print_tables(summary, best, record, report: bool) -> None:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        cols = [c for c in summary.columns if c not in ("checkpoint_path", "started_at", "ended_at")]
        shown = [c for c in cols if not c.startswith("val_") or c in ("val_macro_f1", "val_accuracy",
                                                                       "val_dcg_macro_f1", "val_gain_macro_f1")]
        print(f"\n== trials ({len(summary)}) ==\n{summary[shown].to_string(index=False)}")
        if len(best):
            keep = [c for c in best.columns if not c.startswith(("val_", "test_", "control_")) or c in
                    ("val_macro_f1", "val_accuracy", "val_macro_f1_mean", "val_macro_f1_sd", "test_macro_f1",
                     "test_accuracy", "test_balanced_accuracy", "test_cohen_kappa", "test_auc", "test_dcg_macro_f1",
                     "test_dcg_accuracy", "test_dcg_auc", "test_gain_macro_f1", "control_test_macro_f1",
                     "control_test_accuracy", "control_test_auc", "control_wall_time_s")]
            print(f"\n== best model per dataset (chosen on validation, tested once) ==\n{best[keep].T.to_string(header=False)}")
    where = f"\nresults: {record.uri}/{{summary,best}}.csv"
    print(where + (f", report: {record.uri}/report.html" if report else ""), flush=True)
