"""The search as it runs: a progress line per dataset in the output, and report.html rewritten in the record.

A search runs for days; its final page comes at the end. `LiveReport` (one per search, in the driver) keeps what
every dataset's trials have reported so far and, from a thread of its own, renders the page of tune/pages/page.py with a
"running: N of M trials finished, ETA …" header per dataset into `<experiment>/report.html`: when the search starts,
after each trial that ends (at most once every `report_every_s`), and, while long trials run, at most every
5 x `report_every_s` with their latest epochs. Trials never wait on it: Tune's callbacks only hand it results.

`Progress` is the Tune callback that feeds it. Ray pickles callbacks into tuner.pkl with the experiment, so it holds
only the search's record URI and the dataset, and finds the live report of this driver by that name (LIVE).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import pandas as pd
from ray import tune

from diffmic.secrets import redact, redact_url
from tune.pages.parts import describe_progress
from diffmic.selection import better

LIVE: dict[str, "LiveReport"] = {}  # record URI -> the live report of the search running in this driver
LAZY = 5  # without a trial ending, the page is rewritten at most every LAZY x report_every_s (fresh curves)
DONE = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that has ended


@dataclass
class TrialView:
    """What the driver has seen of one trial: its sampled values, its per-epoch results, its Tune status."""
    config: dict
    status: str = "PENDING"
    started_at: float = math.nan
    ended_at: float = math.nan
    results: list[dict] = field(default_factory=list)


class LiveReport:
    def __init__(self, record, searches: list, started: float, every_s: float = 60.0, write: bool = True) -> None:
        from tune.record.results import describe

        self.record, self.started, self.every_s, self.write = record, started, float(every_s), write
        self.searches = {s.dataset: s for s in searches}
        self.described = {s.dataset: describe(s.cfg, s.params) for s in searches}
        self.trials: dict[str, dict[str, TrialView]] = {d: {} for d in self.searches}
        self.phases = {d: "searching" for d in self.searches}
        self.studies = {d: study_location(s) for d, s in self.searches.items()}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._urgent, self._fresh, self._last = True, False, 0.0  # the first page goes out at once
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="live-report", daemon=True)

    # ------------------------------------------------------------ fed by Progress (Tune's driver thread)
    def start(self) -> LiveReport:
        LIVE[self.record.uri] = self
        for dataset, where in self.studies.items():
            print(f"[search] {dataset}: the study, live: optuna-dashboard {where}", flush=True)
        if self.write:
            self._thread.start()
        return self

    def seen(self, dataset: str, trials) -> None:
        """Tune's trial list of the dataset (restored ones included): statuses and configs, nothing waits."""
        now = time.time()
        with self._lock:
            views = self.trials[dataset]
            for t in trials:
                view = views.get(t.trial_id)
                if view is None:
                    view = views[t.trial_id] = TrialView(dict(t.config))
                    if t.status in DONE and t.last_result:  # ended before this driver started (a resumed search)
                        view.results.append(dict(t.last_result))
                if t.status == "RUNNING" and math.isnan(view.started_at):
                    view.started_at = now
                view.status = t.status

    def trial_started(self, dataset: str, trial_id: str) -> None:
        with self._lock:
            view = self.trials[dataset].get(trial_id)
            if view is not None:
                view.started_at, view.ended_at = time.time(), math.nan  # a restarted trial runs again from here

    def result(self, dataset: str, trial_id: str, result: dict) -> None:
        with self._lock:
            view = self.trials[dataset].get(trial_id)
            if view is not None:
                view.results.append({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
                self._fresh = True
        self._wake.set()

    def ended(self, dataset: str, trial_id: str, status: str) -> None:
        with self._lock:
            view = self.trials[dataset].get(trial_id)
            if view is not None:
                view.status, view.ended_at = status, time.time()
            self._urgent = True
        print(f"[search] {self.line(dataset)}", flush=True)
        self._wake.set()

    def phase(self, dataset: str, text: str) -> None:
        """What a dataset does after its trials: measuring sampler points, confirming finalists, testing."""
        with self._lock:
            self.phases[dataset] = text
            self._urgent = True
        self._wake.set()

    def close(self) -> None:
        """Stop rewriting the page (the final one is written next, and must not be overwritten by a live one)."""
        with self._lock:
            self._closed = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if LIVE.get(self.record.uri) is self:
            del LIVE[self.record.uri]

    # ------------------------------------------------------------ what is shown
    def progress(self, dataset: str) -> dict:
        """Counts, best so far and an estimate of the time left, for the dataset's trials."""
        d = self.described[dataset]
        metric, total, now = d["metric"], int(d["num_samples"]), time.time()
        with self._lock:
            views = dict(self.trials[dataset])
            values = [(i, r.get(metric)) for i, v in views.items() for r in v.results]
            phase = self.phases[dataset]
        done = [v for v in views.values() if v.status in DONE]
        running = [v for v in views.values() if v.status == "RUNNING"]
        stopped = sum(1 for v in done if v.status == "TERMINATED" and last_epoch(v) < d["epochs_per_trial"])
        best, best_trial = None, None
        for trial_id, value in values:
            if isinstance(value, (int, float)) and math.isfinite(value) and better(value, best, d["mode"]):
                best, best_trial = value, trial_id
        # Time left: the trials not yet ended, at the mean duration of those that have, shared by the slots in use.
        durations = [v.ended_at - v.started_at for v in done if math.isfinite(v.ended_at - v.started_at)]
        eta = math.nan
        if durations:
            mean = sum(durations) / len(durations)
            left = (total - len(done) - len(running)) * mean + sum(
                max(0.0, mean - (now - v.started_at)) for v in running if math.isfinite(v.started_at))
            eta = left / max(1, len(running))
        budget = self.searches[dataset].cfg["search"]["time_budget_s"]
        if budget:
            eta = min(eta, max(0.0, self.started + budget - now)) if math.isfinite(eta) else eta
        return {"finished": len(done), "stopped": stopped, "errors": sum(v.status == "ERROR" for v in done),
                "running": len(running), "pending": max(0, total - len(done) - len(running)), "total": total,
                "metric": metric, "best": best, "best_trial": best_trial, "eta_s": eta,
                "phase": phase, "study": self.studies[dataset]}

    def line(self, dataset: str) -> str:
        p = self.progress(dataset)
        return f"{dataset}: {describe_progress(p)}"

    def results(self):
        """The record so far as tune/pages/page.py reads it: the trials' rows and curves, no best model yet."""
        from tune.record.results import Results
        from tune.selection.trials import trial_row

        summary, history = [], []
        with self._lock:
            snapshot = {d: {i: (v.config, v.status, v.started_at, v.ended_at, list(v.results))
                            for i, v in views.items()} for d, views in self.trials.items()}
        for dataset, views in snapshot.items():
            search = self.searches[dataset]
            for trial_id, (config, status, started_at, ended_at, results) in views.items():
                frame = pd.DataFrame(results)
                row, hist = trial_row(search, trial_id, config, frame, status == "ERROR")
                row.update({k: v for k, v in (("started_at", started_at), ("ended_at", ended_at)) if math.isfinite(v)})
                if status not in DONE:
                    row["status"] = status  # RUNNING or PENDING (tune/pages/page.py draws them grey)
                summary.append(row)
                if hist is not None:
                    history.append(hist)
        meta = {"format": 1, "experiment": self.record.experiment, "datasets": self.described,
                "started": self.started, "wall_time_s": time.time() - self.started}
        # the columns a finished trial has, so that every section can read them before any trial has ended
        columns = ["dataset", "trial_id", "status", "best_epoch", "epochs_run", "stopped_early", "wall_time_s",
                   "cpu_hours", "gpu_hours"]
        frame = pd.DataFrame(summary)
        frame = frame.reindex(columns=[*frame.columns, *(c for c in columns if c not in frame)])
        return Results(self.record, meta, frame,
                       pd.concat(history, ignore_index=True) if history else pd.DataFrame(), {},
                       live={d: self.progress(d) for d in self.searches})

    # ------------------------------------------------------------ the writer thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                since = time.time() - self._last
                due = self._last == 0.0 or (self._urgent and since >= self.every_s) or (
                    self._fresh and since >= LAZY * self.every_s)
                wait = None  # nothing to show: sleep until a result comes
                if due:
                    self._urgent = self._fresh = False
                elif self._urgent:
                    wait = self.every_s - since
                elif self._fresh:
                    wait = LAZY * self.every_s - since
            if due:
                self._write()
                continue
            self._wake.wait(timeout=wait)
            self._wake.clear()

    def _write(self) -> None:
        from tune.pages.page import render

        self._last = time.time()
        try:
            page = render(self.results())
            with self._lock:
                if self._closed:  # the final page may already be there
                    return
                self.record.write_report(page)
        except Exception as e:  # noqa: BLE001 (a page that cannot be written must not stop the search)
            if not self._warned:
                self._warned = True
                print(f"[search] the live report could not be written ({type(e).__name__}: "
                      f"{redact(str(e))[:300]}); the final one is written at the end", flush=True)


def last_epoch(view: TrialView) -> int:
    epochs = [r.get("epoch") for r in view.results if isinstance(r.get("epoch"), (int, float))]
    return int(max(epochs)) if epochs else 0


def study_location(search) -> str:
    """Where optuna-dashboard opens the dataset's study while the search runs: the database URL of
    search.optuna_storage (its password masked), else the driver's SQLite file (copied into the record as it goes)."""
    url = search.cfg["search"]["optuna_storage"]
    if url:
        return redact(redact_url(url))
    return f"sqlite:///{search.optuna_db()}"


class Progress(tune.Callback):
    """Hands one dataset's trial events to the driver's LiveReport (found by the record's URI: see the module)."""

    def __init__(self, record_uri: str, dataset: str) -> None:
        self.record_uri, self.dataset = record_uri, dataset

    def _live(self, trials) -> LiveReport | None:
        live = LIVE.get(self.record_uri)
        if live is not None and self.dataset in live.trials:
            live.seen(self.dataset, trials)
            return live
        return None

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        live = self._live(trials)
        if live is not None:
            live.trial_started(self.dataset, trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        live = self._live(trials)
        if live is not None:
            live.result(self.dataset, trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        live = self._live(trials)
        if live is not None:
            live.ended(self.dataset, trial.trial_id, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        live = self._live(trials)
        if live is not None:
            live.ended(self.dataset, trial.trial_id, "ERROR")
