"""The stages after a dataset's trials, each reading only the record's artefacts of the stages before it and writing
its own as soon as it completes (tune/record/experiment.py names them):

    control    stages/<d>/control.json     the plain control's Ray Train run, as a summary-like row
    finalists  finalists.csv, stages/<d>/finalists.json   the finalists' runs; the selected run and its statistics
    points     pareto.csv                  every model at every sampler point on validation (each measured once)
    choice     stages/<d>/choice.json      the point the one rule picks within search.max_cost_ms
    test       best.json, best.csv, the bundle, test-looks.csv   the chosen model tested once and exported

A stage whose artefact is there is not run again: a search resumed after its driver was lost continues at the first
missing one (the points stage measures only the models that have no row yet). The points come after the finalists
so that the selected finalist run is measured in the same stage as the trials, and every row is written once.
"""
from __future__ import annotations

import pandas as pd

from diffmic.checkpoint import to_jsonable
from diffmic.ledger import look
from tune.record.experiment import best_entry
from tune.selection import controls, finalists, pareto
from tune.selection.points import COST, sampling_of

CONTROL, FINALISTS, CHOICE = "control", "finalists", "choice"


def row_of(value: dict | None) -> pd.Series | None:
    return None if value is None else pd.Series(value)


def control_stage(s, live) -> pd.Series | None:
    """The plain control, trained once per experiment; a failed one leaves no artefact and is tried again."""
    if CONTROL not in s.cfg["search"]["controls"]:
        return None
    done = s.record.read_stage(s.dataset, CONTROL)
    if done is not None:
        return row_of(done.get("row"))
    live.phase(s.dataset, "training the plain control")
    try:
        control = controls.run_control(s)
    except Exception as e:  # noqa: BLE001 (the search's own results are still written)
        print(f"[search] {s.dataset}: the plain control failed ({type(e).__name__}: {e}); run the same command "
              "again to retry it", flush=True)
        return None
    s.record.write_stage(s.dataset, CONTROL, {"row": None if control is None else to_jsonable(control.to_dict())})
    return control


def finalists_stage(s, summary: pd.DataFrame, live) -> tuple[pd.DataFrame, pd.Series | None, dict]:
    """(the finalists' runs, the selected run, its repeats' statistics); nothing when search.finalists is 0."""
    if not s.cfg["search"]["finalists"]:
        return pd.DataFrame(), None, {}
    done = s.record.read_stage(s.dataset, FINALISTS)
    if done is not None:
        return s.record.read_rows("finalists", s.dataset), row_of(done.get("selected")), done.get("repeats") or {}
    live.phase(s.dataset, "confirming the finalists")
    try:
        runs, selected, repeats = finalists.confirm(s, summary)
    except Exception as e:  # noqa: BLE001 (the search's own results are still written)
        print(f"[search] {s.dataset}: the finalists failed ({type(e).__name__}: {e}); the search's best trial is "
              "tested and exported instead; run the same command again to retry them", flush=True)
        return pd.DataFrame(), None, {}
    s.record.write_rows("finalists", s.dataset, runs)
    s.record.write_stage(s.dataset, FINALISTS, {"selected": None if selected is None else to_jsonable(
        selected.to_dict()), "repeats": repeats})
    return runs, selected, repeats


def points_stage(s, summary: pd.DataFrame, control: pd.Series | None, selected: pd.Series | None,
                 live) -> pd.DataFrame:
    """pareto.csv's rows of the dataset: each trial, the selected finalist run and the control (its DCG read-out)
    at the sampler points; a model that already has rows is not measured again, and nothing new writes nothing."""
    from tune.stages.measure import measure_trials

    have = s.record.read_rows("pareto", s.dataset)
    measured = set(have["trial_id"]) if len(have) else set()
    todo = [(summary[~summary["trial_id"].astype(str).isin(measured)], None, None)]
    if selected is not None and str(selected["trial_id"]) not in measured:
        todo.append((selected.to_frame().T, None, None))
    if control is not None and str(control["trial_id"]) not in measured:
        todo.append((control.to_frame().T, [{"sampler": "dcg"}], "control"))
    todo = [t for t in todo if len(t[0])]
    if not todo:
        return have
    live.phase(s.dataset, "measuring the models at the sampler points")
    new = []
    for frame, grid, kind in todo:
        rows = measure_trials(s, frame, grid=grid)
        new.append(rows.assign(model_kind=kind) if kind and len(rows) else rows)
    new = [f.drop(columns="on_front", errors="ignore") for f in (have, *new) if len(f)]
    if not new:
        return have
    knobs = s.cfg["search"]
    points = pareto.mark_front(pd.concat(new, ignore_index=True), knobs["metric"], knobs["mode"])
    s.record.write_rows("pareto", s.dataset, points)
    return points


def choice_stage(s, points: pd.DataFrame, best: pd.Series, selected: pd.Series | None, repeats: dict) -> dict:
    """The exported model: the best point within search.max_cost_ms (null: the most accurate) over all points (the
    trials', their DCGs' and the control's); with finalists, over the selected run's and the control's. No point
    (search.pareto=[]): the best trial as it was validated."""
    knobs = s.cfg["search"]
    metric, mode = knobs["metric"], knobs["mode"]
    if selected is not None:
        best = selected
    only = str(best["trial_id"]) if repeats else None
    point = pareto.choose(points, s.dataset, metric, mode, knobs["max_cost_ms"], only) if len(points) else None
    if point is None and len(points) and knobs["max_cost_ms"] is not None:
        print(f"[search] {s.dataset}: no sampler point within search.max_cost_ms={knobs['max_cost_ms']}; "
              "exporting the most accurate one", flush=True)
        point = pareto.choose(points, s.dataset, metric, mode, None, only)
    kind = str(point["model_kind"]) if point is not None and "model_kind" in point else "diffmic"
    trial = str(point["trial_id"]) if point is not None and only is None else str(best["trial_id"])
    choice = {"trial_id": "control" if kind == "control" else trial, "model_kind": kind,
              "sampling": sampling_of(point), "max_cost_ms": knobs["max_cost_ms"],
              # the point's own validation figure (what it was chosen on) beside its cost
              "point": None if point is None else {f"point_{metric}": float(point[metric]),
                                                   **{k: float(point[k]) for k in (COST, "denoiser_calls_per_image")}}}
    if s.record.read_stage(s.dataset, CHOICE) != to_jsonable(choice):
        s.record.write_stage(s.dataset, CHOICE, choice)
    return choice


def test_stage(s, choice: dict, model: pd.Series, control: pd.Series | None, runs: pd.DataFrame, repeats: dict,
               export: bool, live) -> dict:
    """The chosen model tested once (and exported), its best.json entry written at once; a resumed search whose
    entry already holds this choice does not look at the test split again."""
    from tune.stages.checkpoints import test_best

    done = s.record.read_best().get(s.dataset)
    if done and str(done.get("trial_id")) == choice["trial_id"] and done.get("model_kind") == choice["model_kind"] \
            and (done.get("sampling") or {}) == (choice["sampling"] or {}):
        return done
    kind, sampling = choice["model_kind"], choice["sampling"]
    live.phase(s.dataset, "testing the chosen model" + (" and exporting it" if export else ""))
    tested = test_best(s, model, s.record.best_bundle_uri(s.dataset) if export else None, sampling)
    s.record.append_test_look(look("search", tested["test"], s.dataset, str(model["trial_id"]), tested["sampling"]))
    if repeats and kind == "diffmic":  # the configuration is fixed: its repeats' test spread is no selection on test
        repeats = {**repeats, **finalists.test_spread(s, runs, model, tested["test"], sampling, test_best, look)}
    control_test = None
    if control is not None:  # the control is tested once too, so that best.csv sets the two side by side
        control_test = tested["test"] if kind == "control" else test_best(
            s, control, None, {"sampler": "dcg", "sample_steps": None, "num_samples": 1}, explain=False)["test"]
        if kind != "control":
            s.record.append_test_look(look("search (control)", control_test, s.dataset, "control", "sampler=dcg"))
    if tested.get("explain"):
        s.record.write_explanations(s.dataset, tested["explain"]["items"], tested["explain"]["images"])
    entry = best_entry(model, [p.key for p in s.params], tested["test"], tested["class_names"],
                       tested["checkpoint_uri"], tested["bundle_uri"], sampling, choice["point"], repeats,
                       model_kind=kind, control=controls.control_columns(control, control_test),
                       val_at_point=tested.get("val"),
                       verdict="" if kind == "diffmic" else controls.beaten_sentence(kind))
    s.record.write_best_entry(s.dataset, entry)
    if kind != "diffmic":
        print(f"[search] {s.dataset}: {controls.beaten_sentence(kind)}", flush=True)
    return entry
