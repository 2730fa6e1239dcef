"""The two objects Tune calls to keep what a new head resumes from (tune/study/resume.py): ASHA with rungs that can be
saved and put back, and the callback that copies the Optuna study and signs Ray's state files as Tune writes them."""
from __future__ import annotations

import json
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from tune.storage import Storage
from tune.study.resume import KEPT_DIGESTS, digest, is_ray_state, read_state, signing_key, snapshot, study_path


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs (each trial's metric at each milestone) can be saved and put back: Tune rebuilds the scheduler
    as it was created, empty, so after a restore every trial would pass every rung again."""

    def rungs(self) -> list[list[dict[str, float]]]:
        return [[dict(recorded) for _, recorded in bracket._rungs] for bracket in self._brackets]

    def restore_rungs(self, rungs: list) -> None:
        for bracket, saved in zip(self._brackets, rungs):
            for (_, recorded), values in zip(bracket._rungs, saved):
                recorded.update({str(t): float(v) for t, v in dict(values).items()})


class SearchState(tune.Callback):
    """Keeps the search's state in the record (tune/record/experiment.py: `study_key`, `state_key`). Tune calls `get_state`
    right after writing its controller and searcher state to the driver's staging directory and before uploading it:
    what is copied and signed here is what the upload holds. It keeps only paths and references (Ray pickles it into
    `tuner.pkl` with the scheduler and searcher it refers to)."""

    def __init__(self, storage: Storage, exp_rel: str, study_key: str, state_key: str, study_rel: str | None,
                 scheduler: ResumableASHA | None, searcher) -> None:
        self.storage, self.exp_rel, self.study_key, self.state_key = storage, exp_rel, study_key, state_key
        self.study_rel, self.scheduler, self.searcher = study_rel, scheduler, searcher

    def setup(self, **info) -> None:
        state = read_state(self.storage, self.state_key)
        signed = state.get("signed") if isinstance(state.get("signed"), dict) else {}
        self._signed = {n: [d for d in ds if isinstance(d, str)] for n, ds in signed.items() if isinstance(ds, list)}
        if self.scheduler is not None and isinstance(state.get("asha"), list):
            self.scheduler.restore_rungs(state["asha"])
        # tuner.pkl is written by the Tuner straight to storage, seconds before this (or checked before a restore)
        tuner = f"{self.exp_rel}/tuner.pkl"
        if self.storage.exists(tuner):
            self._save({"tuner.pkl": self.storage.read_bytes(tuner)})

    def get_state(self) -> None:
        staging = getattr(self.searcher, "staging_dir", None)
        files = {}
        if staging is not None:
            files = {p.name: p.read_bytes() for p in Path(staging).iterdir() if p.is_file() and is_ray_state(p.name)}
        self._save(files)
        return None  # nothing for Tune to pickle: a callback state file would be one more file to sign

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._guarded(self._backup_study)  # a finished trial is kept at once, not at the next periodic save

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._guarded(self._backup_study)

    def _backup_study(self) -> None:
        db = study_path(self.study_rel) if self.study_rel else None
        if db is not None and db.exists():
            self.storage.write_bytes(self.study_key, snapshot(db))

    def _save(self, files: dict[str, bytes]) -> None:
        key, source = signing_key()
        signed = getattr(self, "_signed", None)
        if signed is None:  # get_state before setup (not seen, but then nothing stored is lost either)
            signed = self._signed = {}
        for name, data in files.items():  # kept here too: a digest that could not be written goes with the next save
            d = digest(key, data)
            signed[name] = ([x for x in signed.get(name, []) if x != d] + [d])[-KEPT_DIGESTS:]

        def write() -> None:
            # The study first: the searcher state just written names every Optuna trial it knows, which the copy
            # must hold (a restored searcher reporting for a trial the copy lacks fails with "Record does not exist").
            self._backup_study()
            out = {"format": 1, "key_source": source, "signed": signed,
                   "asha": self.scheduler.rungs() if self.scheduler is not None else None}
            self.storage.write_text(self.state_key, json.dumps(out))
        self._guarded(write)

    def _guarded(self, write) -> None:
        """Storage that does not answer (an S3 outage outlasting the client's retries) costs a warning, not the
        search: Tune saves again within seconds, and this copy with it."""
        try:
            write()
        except Exception as e:  # noqa: BLE001 - any transport error; the next save retries
            print(f"[search] warning: could not save the search's state to {self.storage.join(self.state_key)} "
                  f"({type(e).__name__}); retried at the next save", flush=True)
