"""`python tune/search.py [overrides]`: search DiffMIC hyperparameters per dataset with Ray Tune + Optuna.

    python tune/search.py "datasets=[synthetic]" search.num_samples=8 train.epochs=4 storage=s3 storage.uri=s3://b/p
    ray job submit --working-dir . -- python tune/search.py …

Per dataset: an Optuna (TPE) study sampling `search.space`, ASHA stopping weak trials on the per-epoch validation
metric, each trial a Ray Train run. At the end the best trial (on validation) is tested once and exported, and
`<storage>/<experiment>/{summary,best}.csv` are written. Running again with the same experiment name resumes.
Everything is checked (config, space, data, storage) before any trial starts.
"""

from __future__ import annotations
import os
import sys
from tune.study.plan import plan


def search(cfg: dict, overrides: list[str], own: dict[str, list[str]] | None = None) -> None:
    import time

    import pandas as pd

    from tune.train.distributed import init_ray
    from tune.pages.live import LiveReport
    from tune.study.pool import POOLS, TrialPool
    from tune.record.experiment.experiment import PER_DATASET, Record
    from tune.record.experiment.results import describe
    from tune.study.runner import max_concurrent

    storage, searches = plan(cfg, overrides, own)
    record = Record(storage, cfg["experiment"])
    started = time.time()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter shows the columns chosen below
    init_ray(cfg)
    # Every dataset's search runs at once on the same cluster, sharing search.max_concurrent_trials (tune/study/pool.py).
    pool = POOLS[record.uri] = TrialPool(max_concurrent(cfg))
    print(f"[search] {len(searches)} dataset(s) at once, at most {pool.total} trials at a time", flush=True)
    live = LiveReport(record, searches, started, cfg["report_every_s"], write=cfg["report"]).start()
    if cfg["report"]:
        print(f"[search] live report: {record.uri}/report.html (python tune/report.py {record.uri} --serve)",
              flush=True)
    try:
        outcomes = run_concurrently([lambda s=s: search_dataset(s, cfg["export"], pool, live) for s in searches])
    finally:
        live.close()  # before the final page, which a live one must not overwrite
    tables = {name: pd.concat([o[name] for o in outcomes if len(o[name])], ignore_index=True)
              if any(len(o[name]) for o in outcomes) else pd.DataFrame() for name in PER_DATASET}
    details = {o["dataset"]: o["best"] for o in outcomes if o["best"] is not None}
    record.write_results(tables, details, {s.dataset: describe(s.cfg, s.params) for s in searches}, started,
                         time.time() - started)
    if cfg["export"]:
        from tune.record.experiment.promote import first_current
        for dataset in details:
            print(f"[search] {first_current(record, dataset)}", flush=True)
    report_uri = None
    if cfg["report"]:
        from tune.pages.serve import write_report
        report_uri = write_report(record)
    from tune.pages import tracking
    for s, o in zip(searches, outcomes):  # the trial runs get their checkpoints, the dataset's its model and report
        tracking.finish(s, o["summary"], o["best"], report_uri)
    print_tables(tables["summary"], record.read_table("best"), record, cfg["report"])


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


def search_dataset(s, export: bool, pool, live) -> dict:
    """One dataset, start to end: its Tune experiment, each trial at every sampler point (pareto.csv), the
    finalists' repeats, the selected model tested once and exported. Returns its tables and best.json entry."""
    import pandas as pd

    from diffmic.ledger import look
    from tune import controls, finalists, pareto
    from tune.record.experiment.experiment import best_entry
    from tune.record.experiment.results import best_trial
    from tune.stages.checkpoints import test_best
    from tune.selection.trials import trial_frames
    from tune.study.resume import snapshot
    from tune.study.runner import run_search

    pool.join(s.dataset)
    try:
        grid = run_search(s)
    finally:
        pool.leave(s.dataset)
    summary, history = trial_frames(s, grid)
    live.phase(s.dataset, "measuring the trials at the sampler points")
    out = {"dataset": s.dataset, "summary": summary, "history": history, "pareto": pd.DataFrame(),
           "finalists": pd.DataFrame(), "best": None}
    if not s.cfg["search"]["optuna_storage"] and s.optuna_db().exists():
        s.record.write_study(s.dataset, snapshot(s.optuna_db()))
    knobs = s.cfg["search"]
    metric, mode = knobs["metric"], knobs["mode"]
    best = best_trial(summary, metric, mode)
    if best is None:
        print(f"[search] {s.dataset}: no trial reported {metric}; nothing to test or export", flush=True)
        return out
    out["pareto"] = points = pareto.measure_trials(s, summary)
    control = None
    if "control" in knobs["controls"]:
        live.phase(s.dataset, "training the plain control")
        try:
            control = controls.run_control(s)
        except Exception as e:  # noqa: BLE001 (the search's own results are still written)
            print(f"[search] {s.dataset}: the plain control failed ({type(e).__name__}: {e}); run the same "
                  "command again to retry it", flush=True)
        if control is not None:
            # the control as one more point, of kind `control`: its DCG read-out, measured like every other
            mine = pareto.measure_trials(s, control.to_frame().T, grid=[{"sampler": "dcg"}])
            mine = mine.assign(model_kind="control") if len(mine) else mine
            out["pareto"] = points = pareto.mark_front(pd.concat(
                [p.drop(columns="on_front", errors="ignore") for p in (points, mine) if len(p)], ignore_index=True),
                metric, mode)
    repeats = {}
    if knobs["finalists"]:
        live.phase(s.dataset, "confirming the finalists")
        try:
            out["finalists"], selected, repeats = finalists.confirm(s, summary)
        except Exception as e:  # noqa: BLE001 (the search's own results are still written)
            print(f"[search] {s.dataset}: the finalists failed ({type(e).__name__}: {e}); the search's best trial "
                  "is tested and exported instead; run the same command again to retry them", flush=True)
            selected = None
        if selected is not None:
            best = selected
            # The selected run is measured at the sampler points too: its own point within the cost budget is
            # what it is tested and exported with.
            mine = pareto.measure_trials(s, selected.to_frame().T)
            out["pareto"] = points = pd.concat([p for p in (points, mine) if len(p)], ignore_index=True)
            if len(points):
                points = out["pareto"] = pareto.mark_front(points.drop(columns="on_front"), metric, mode)
    # The default model: the best sampler point within search.max_cost_ms (null: the most accurate), over all
    # trials' points and the controls'; with finalists, over the selected run's points and the control's.
    only = best["trial_id"] if repeats else None
    point = pareto.choose(points, s.dataset, metric, mode, knobs["max_cost_ms"], only)
    if point is None and len(points) and knobs["max_cost_ms"] is not None:
        print(f"[search] {s.dataset}: no sampler point within search.max_cost_ms={knobs['max_cost_ms']}; "
              "exporting the most accurate one", flush=True)
        point = pareto.choose(points, s.dataset, metric, mode, None, only)
    kind = str(point["model_kind"]) if point is not None and "model_kind" in point else "diffmic"
    if kind == "control":
        best = control
    elif point is not None and only is None:
        best = summary[summary["trial_id"].astype(str) == str(point["trial_id"])].iloc[0]
    sampling = pareto.sampling_of(point)
    live.phase(s.dataset, "testing the chosen model" + (" and exporting it" if export else ""))
    tested = test_best(s, best, s.record.best_bundle_uri(s.dataset) if export else None, sampling)
    s.record.append_test_look(look("search", tested["test"], s.dataset, str(best["trial_id"]), tested["sampling"]))
    if repeats and kind == "diffmic":  # the configuration is fixed: its repeats' test spread is no selection on test
        repeats = {**repeats, **finalists.test_spread(s, out["finalists"], best, tested["test"], sampling, test_best,
                                                      look)}
    control_test = None
    if control is not None:  # the control is tested once too, so that best.csv sets the two side by side
        control_test = tested["test"] if kind == "control" else test_best(
            s, control, None, {"sampler": "dcg", "sample_steps": None, "num_samples": 1}, explain=False)["test"]
        if kind != "control":
            s.record.append_test_look(look("search (control)", control_test, s.dataset, "control", "sampler=dcg"))
    if tested.get("explain"):
        s.record.write_explanations(s.dataset, tested["explain"]["items"], tested["explain"]["images"])
    # The point's own validation figure (what it was chosen on) beside its cost; val_* stay the trial's best epoch.
    cost = {f"point_{metric}": float(point[metric]), **{k: float(point[k]) for k in (pareto.COST,
            "denoiser_calls_per_image")}} if point is not None else None
    out["best"] = best_entry(best, [p.key for p in s.params], tested["test"], tested["class_names"],
                             tested["checkpoint_uri"], tested["bundle_uri"], sampling, cost, repeats,
                             model_kind=kind, control=controls.control_columns(control, control_test),
                             val_at_point=tested.get("val"),
                             verdict="" if kind == "diffmic" else controls.beaten_sentence(kind))
    if kind != "diffmic":
        print(f"[search] {s.dataset}: {controls.beaten_sentence(kind)}", flush=True)
    return out


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
