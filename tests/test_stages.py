"""The stages after the trials (tune/stages/steps.py) write their artefacts as they complete, and a resumed search
continues at the first missing one. Pure code: a real local record, the Ray measurement replaced by a recorder.
The whole path (a search killed after its points stage, resumed) runs in tests/test_search.py."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from tune.record.experiment import Record
from tune.stages import measure, steps
from tune.storage import open_storage

KNOBS = {"metric": "val_macro_f1", "mode": "max", "max_cost_ms": None, "controls": ["dcg"], "finalists": 0}


class Live:
    def phase(self, dataset, text):
        pass


def a_search(tmp_path):
    record = Record(open_storage(str(tmp_path / "res")), "e")
    return SimpleNamespace(dataset="d", record=record, cfg={"search": dict(KNOBS)}, params=[])


def summary(*ids):
    return pd.DataFrame([{"dataset": "d", "trial_id": i, "val_macro_f1": 0.5, "checkpoint_path": f"/x/{i}"}
                         for i in ids])


@pytest.fixture
def measured(monkeypatch):
    """measure_trials replaced: each model gets two points (the chain and its DCG); the calls are recorded."""
    calls = []

    def fake(search, frame, grid=None):
        calls.append(list(frame["trial_id"]))
        return pd.DataFrame([{"dataset": "d", "trial_id": t, "sampler": s, "sample_steps": 10 if s == "ddim" else None,
                              "num_samples": 1, "model_kind": "dcg" if s == "dcg" else "diffmic",
                              "val_macro_f1": 0.6 + 0.1 * (s == "ddim") + 0.01 * k, "predict_ms_per_image": 5.0 - k,
                              "denoiser_calls_per_image": 10 if s == "ddim" else 0, "temperature": 1.0}
                             for k, t in enumerate(frame["trial_id"]) for s in ("ddim", "dcg")])
    monkeypatch.setattr(measure, "measure_trials", fake)
    return calls


def test_the_points_stage_measures_each_model_once_and_writes_at_once(tmp_path, measured):
    s = a_search(tmp_path)
    points = steps.points_stage(s, summary("a", "b"), None, None, Live())
    assert measured == [["a", "b"]] and len(points) == 4
    written = s.record.read_rows("pareto", "d")
    assert len(written) == 4 and written["on_front"].any()  # in the record as soon as the stage ends
    csv = (tmp_path / "res" / "e" / "pareto.csv").read_bytes()
    again = steps.points_stage(s, summary("a", "b"), None, None, Live())  # a resumed search
    assert measured == [["a", "b"]] and len(again) == 4
    assert (tmp_path / "res" / "e" / "pareto.csv").read_bytes() == csv  # nothing measured, nothing rewritten
    steps.points_stage(s, summary("a", "b", "c"), None, None, Live())  # a search grown by one trial
    assert measured == [["a", "b"], ["c"]] and len(s.record.read_rows("pareto", "d")) == 6


def test_other_datasets_rows_are_kept(tmp_path, measured):
    s = a_search(tmp_path)
    other = SimpleNamespace(**{**vars(s), "dataset": "o"})
    s.record.write_rows("pareto", "o", pd.DataFrame([{"dataset": "o", "trial_id": "z", "val_macro_f1": 0.1}]))
    steps.points_stage(s, summary("a"), None, None, Live())
    assert set(s.record.read_table("pareto")["dataset"]) == {"d", "o"} and other.dataset == "o"


def test_the_choice_is_an_artefact_and_the_test_is_not_repeated(tmp_path, measured, monkeypatch):
    s = a_search(tmp_path)
    points = steps.points_stage(s, summary("a", "b"), None, None, Live())
    choice = steps.choice_stage(s, points, summary("a").iloc[0], None, {})
    assert choice == s.record.read_stage("d", "choice")
    assert choice["trial_id"] == "b" and choice["sampling"]["sampler"] == "ddim"  # the best point wins
    s.cfg["search"]["max_cost_ms"] = 4.5  # a budget only trial b's points meet
    assert steps.choice_stage(s, points, summary("a").iloc[0], None, {})["trial_id"] == "b"

    tests = []

    def test_best(search, model, export_uri, sampling, explain=True):
        tests.append(model["trial_id"])
        return {"test": {"accuracy": 0.9, "macro_f1": 0.8}, "val": {}, "class_names": ["x", "y"],
                "sampling": sampling, "explain": None, "checkpoint_uri": "/x", "bundle_uri": export_uri}
    import tune.stages.checkpoints as checkpoints
    monkeypatch.setattr(checkpoints, "test_best", test_best)
    model = summary("b").iloc[0]
    entry = steps.test_stage(s, choice, model, None, pd.DataFrame(), {}, False, Live())
    assert tests == ["b"] and s.record.read_best()["d"]["trial_id"] == "b" and entry["test"]["macro_f1"] == 0.8
    assert len(s.record.read_test_looks()) == 1
    steps.test_stage(s, choice, model, None, pd.DataFrame(), {}, False, Live())  # resumed: already tested
    assert tests == ["b"] and len(s.record.read_test_looks()) == 1


def test_the_choice_stage_reruns_alone_from_the_command_line(tmp_path, measured, capsys):
    """`python -m tune.cli.choose EXPERIMENT --max-cost-ms MS`: a new budget, a new choice.json, nothing measured."""
    from tune.cli.choose import main

    s = a_search(tmp_path)
    s.record.add_searches({"d": {"metric": "val_macro_f1", "mode": "max", "space": {}}}, started=0.0)
    s.record.write_rows("summary", "d", summary("a", "b"))
    points = steps.points_stage(s, summary("a", "b"), None, None, Live())
    steps.choice_stage(s, points, summary("a").iloc[0], None, {})
    main([str(tmp_path / "res" / "e"), "--max-cost-ms", "4.5"])
    assert s.record.read_stage("d", "choice")["max_cost_ms"] == 4.5 and measured == [["a", "b"]]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "res" / "e"), "--max-cost-ms", "-1"])
    assert "--max-cost-ms -1.0: expected a positive number" in capsys.readouterr().err


def test_a_pickled_study_opens_on_a_new_head_whose_predecessor_disk_is_gone(tmp_path, monkeypatch):
    """Issue 23: Tune pickles the searcher (tuner.pkl, searcher-state) with its Optuna storage; a study on the lost
    head's disk must not be opened by path on the new head. Its storage is pickled by the study's name under the
    node's cache and reopened from the new head's own copy (tune/study/runner.py:local_study puts it there)."""
    import pickle
    import shutil

    import optuna

    from tune.study.resume import study_path
    from tune.study.runner import optuna_searcher
    from tune.study.searcher import ResumableOptunaSearch

    old, new = tmp_path / "dead-head-cache", tmp_path / "new-head-cache"
    monkeypatch.setenv("DIFFMIC_CACHE", str(old))
    search = SimpleNamespace(cfg={"search": {"sampler": "tpe", "seed": 0, "optuna_storage": None,
                                             "max_concurrent_trials": 1}, "train": {"epochs": 2}},
                             experiment="e", dataset="d", study_rel="root/e/d.db",
                             optuna_db=lambda: study_path("root/e/d.db"), record=SimpleNamespace(uri="u"))
    limiter = optuna_searcher(search)
    searcher = limiter.searcher
    assert isinstance(searcher, ResumableOptunaSearch)
    optuna.create_study(study_name="e-d", storage=searcher._storage)  # the study exists on the dead head
    blob = pickle.dumps(searcher._storage)
    copy = tmp_path / "stored.db"
    shutil.copy(study_path("root/e/d.db"), copy)  # the record's copy of the study
    shutil.rmtree(old)  # the head is lost with its disk
    monkeypatch.setenv("DIFFMIC_CACHE", str(new))
    study_path("root/e/d.db").parent.mkdir(parents=True)
    shutil.copy(copy, study_path("root/e/d.db"))  # as local_study restores it on the new head
    storage = pickle.loads(blob)
    assert [s.study_name for s in optuna.study.get_all_study_summaries(storage=storage)] == ["e-d"]
    assert str(new) in storage.url
    assert not old.exists()
