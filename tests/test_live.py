"""tune/pages/live.py as pure code: the live report fed by fake Tune trials (no Ray cluster). The same on a real search,
in a browser: tests/test_dashboards.py."""
from __future__ import annotations

import time
from types import SimpleNamespace


from helpers import compose
from tune.pages.live import LIVE, LiveReport, Progress, describe_progress
from tune.study.dataset import DatasetSearch
from tune.study.space import Param
from tune.storage import open_storage

PARAMS = [Param("roi_count", "model.dcg.roi_count", "choice", (1, 2))]


def a_search(tmp_path, **search) -> DatasetSearch:
    cfg = compose(["train.epochs=3"], config_name="search")
    cfg["search"].update(num_samples=4, **search)
    return DatasetSearch("synthetic", cfg, PARAMS, open_storage(str(tmp_path / "results")), "exp")


def trial(i: int, status: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i}", status=status, config={"model.dcg.roi_count": 1 + i % 2},
                           last_result={})


def epoch(e: int, f1: float) -> dict:
    return {"epoch": e, "val_macro_f1": f1, "train_loss": 1.0 / e, "time_total_s": 10.0 * e,
            "timestamp": time.time(), "time_this_iter_s": 10.0}


def test_progress_counts_best_and_eta_then_the_page_says_running(tmp_path):
    s = a_search(tmp_path)
    live = LiveReport(s.record, [s], started=time.time(), every_s=60, write=False).start()
    try:
        callback = Progress(s.record.uri, "synthetic")
        trials = [trial(0, "RUNNING"), trial(1, "RUNNING")]
        callback.on_trial_start(1, trials, trials[0])
        for e, f1 in ((1, 0.5), (2, 0.7)):
            callback.on_trial_result(1, trials, trials[0], epoch(e, f1))
        callback.on_trial_result(1, trials, trials[1], epoch(1, 0.4))
        p = live.progress("synthetic")
        assert (p["finished"], p["running"], p["pending"], p["total"]) == (0, 2, 2, 4)
        assert p["best"] == 0.7 and p["best_trial"] == "t0" and p["eta_s"] != p["eta_s"]  # no trial ended: NaN
        assert "ETA unknown until a trial ends" in describe_progress(p)

        live.trials["synthetic"]["t1"].started_at -= 30  # t1 ran 30 s and is stopped by ASHA after one epoch
        trials[1].status = "TERMINATED"
        callback.on_trial_complete(1, trials, trials[1])
        p = live.progress("synthetic")
        assert (p["finished"], p["stopped"], p["running"], p["pending"]) == (1, 1, 1, 2)
        assert 0 < p["eta_s"] < 200  # 2 pending + what t0 has left, at ~30 s a trial, over 1 slot in use
        line = describe_progress(p)
        assert line.startswith("running: 1 of 4 trials finished (1 stopped early), 1 running, 2 pending; "
                               "best val_macro_f1 0.7 (trial t0); ETA 0:")

        res = live.results()
        assert sorted(res.summary["status"]) == ["RUNNING", "STOPPED_EARLY"]
        assert len(res.history) == 3 and set(res.history["trial_id"]) == {"t0", "t1"}
        from tune.pages.page import render
        page = render(res)
        assert 'id=live-status' in page and "running: 1 of 4 trials finished" in page
        assert "<meta http-equiv=refresh content=60>" in page
        assert f"optuna-dashboard sqlite:///{s.optuna_db()}" in page
    finally:
        live.close()
    assert s.record.uri not in LIVE


def test_the_page_is_written_at_start_and_after_a_trial_ends_at_most_once_per_interval(tmp_path):
    s = a_search(tmp_path)
    path = tmp_path / "results" / "exp" / "report.html"
    live = LiveReport(s.record, [s], started=time.time(), every_s=1.0).start()
    try:
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert "0 of 4 trials finished" in path.read_text()  # the first page: at once
        first = path.stat().st_mtime_ns
        callback, trials = Progress(s.record.uri, "synthetic"), [trial(0, "RUNNING")]
        callback.on_trial_start(1, trials, trials[0])
        callback.on_trial_result(1, trials, trials[0], epoch(1, 0.6))
        trials[0].status = "TERMINATED"
        callback.on_trial_complete(1, trials, trials[0])
        while "1 of 4 trials finished" not in path.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert "1 of 4 trials finished" in path.read_text() and path.stat().st_mtime_ns > first
        written = path.stat().st_mtime_ns
        live.phase("synthetic", "testing the chosen model")
        time.sleep(0.3)
        assert path.stat().st_mtime_ns == written  # not within the interval of the last write
    finally:
        live.close()
    # closed: no live page can come after the final one
    path.write_text("final")
    live._wake.set()
    time.sleep(1.2)
    assert path.read_text() == "final"


def test_a_database_study_is_shown_without_its_password(tmp_path):
    s = a_search(tmp_path, optuna_storage="postgresql://optuna:hunter2@db.internal:5432/studies")
    live = LiveReport(s.record, [s], started=time.time(), write=False)
    assert live.studies["synthetic"] == "postgresql://optuna:***@db.internal:5432/studies"
    assert "hunter2" not in repr(live.progress("synthetic"))


def test_a_callback_without_its_live_report_does_nothing(tmp_path):
    """Pickled into tuner.pkl, a callback is restored in a driver with no live report under its name (say, a
    restore from Python): it must not fail the search."""
    import pickle

    callback = pickle.loads(pickle.dumps(Progress("mem://nowhere", "synthetic")))
    t = trial(0, "RUNNING")
    callback.on_trial_result(1, [t], t, epoch(1, 0.5))  # would raise if it looked for its report
    callback.on_trial_complete(1, [t], t)
    assert "mem://nowhere" not in LIVE  # and none was made up for it
