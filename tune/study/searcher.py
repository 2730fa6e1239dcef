"""Optuna as the search's searcher: Ray's OptunaSearch made safe to restore, and a sampler that never runs the same
configuration twice.

DistinctSampler wraps the chosen sampler (TPE, random, CMA-ES, QMC) through Optuna's public sampler interface, handed to
the searcher as its `sampler`.

The searched spaces are small and mostly categorical (the default one has 384 points), and TPE exploits: once a point
scores well it tends to propose that very point again, and a second trial of it only re-measures seed noise at full
cost (seen in 2 of 3 default searches). When the wrapped sampler proposes a point the study has already run (or is
running), a point one parameter away from it that no trial has tried is proposed instead.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search.optuna import OptunaSearch

from tune.study.resume import study_path
from diffmic.selection import best

logger = logging.getLogger(__name__)
_DRAWS = 200  # random neighbours and points tried before accepting a repeat (the space may be exhausted)


class NodeStudy(optuna.storages.RDBStorage):
    """The study's SQLite file under this node's cache, pickled by its name there (`rel`), never by its path: Tune
    pickles the searcher with its storage (tuner.pkl, the searcher state), and a new head whose predecessor's disk is
    gone must open its own copy (tune/study/runner.py:local_study) rather than a path that no longer exists."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        path = study_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(f"sqlite:///{path}")

    def __getstate__(self) -> dict:
        return {"rel": self.rel}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["rel"])


class ResumableOptunaSearch(OptunaSearch):
    """The study is saved at once, Tune's own state only every few seconds: a driver lost in between restores a trial
    that had ended as still running, and that trial reports its last epoch again. Optuna refuses to update a finished
    trial; the study keeps the result it holds and the search goes on."""

    staging_dir: str | None = None  # where Tune last saved its state on this driver (tune/study/resume.py signs it there)

    def __init__(self, *args, local_study: str | None = None, epochs: int | None = None, **kwargs) -> None:
        self.local_study = local_study  # the SQLite study under this node's cache (tune/study/resume.py:study_path)
        self.epochs = epochs  # a trial's full budget: one that ends before it was stopped early
        super().__init__(*args, **kwargs)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """A trial stopped before its last epoch (ASHA, the time budget) goes into the study as PRUNED, its learning
        curve kept: Ray would tell Optuna it is COMPLETE with its early value, which misleads TPE (a configuration cut
        short after one epoch is not a finished bad one) and optuna-dashboard. A trial that ran its budget is
        COMPLETE with its best epoch's value (the one rule that selects epochs and trials), not its last epoch's."""
        known = trial_id in self._ot_trials and trial_id not in self._completed_trials
        if result and not error and known:  # the last result (the one a scheduler stops on) reaches only this call
            self.on_trial_result(trial_id, result)
        epoch = (result or {}).get("epoch")
        if (error or not known or not self.epochs or not isinstance(epoch, int) or epoch >= self.epochs
                or result.get("final")):
            if result and not error and known:  # the trial's value is its best epoch's, as the search selects
                result = {**result, self._metric: self._best_of_curve(trial_id, result[self._metric])}
            super().on_trial_complete(trial_id, result, error)
            return
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as e:  # noqa: BLE001 - as Ray does for tell: a warning, never the search
            logger.warning("trial %s: %s", trial_id, e)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        """The saved state names the study's file by the path it had on the driver that saved it: a new head (another
        cache directory) continues from its own copy of the study instead."""
        super().restore(checkpoint_path)
        if self.local_study and self._ot_study is not None:
            url = f"sqlite:///{study_path(self.local_study)}"
            self._storage = optuna.storages.RDBStorage(url)
            self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                               sampler=self._ot_study.sampler)
            for trial in self._ot_trials.values():
                trial.study, trial.storage = self._ot_study, self._ot_study._storage

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("final"):  # the test report after training is no epoch of the learning curve
            return
        # Optuna's step is the epoch: Tune's iteration count starts again at 1 when a trial is restored.
        step = result.get("epoch") or result["training_iteration"]
        trial = self._ot_trials.get(trial_id)
        if trial is not None and step in trial.storage.get_trial(trial._trial_id).intermediate_values:
            return  # an epoch reported again (a restored trial; the result a trial ends on)
        try:
            super().on_trial_result(trial_id, {**result, "training_iteration": step})
        except UpdateFinishedTrialError:
            logger.info("trial %s already finished in the study; its repeated result is not reported again", trial_id)

    def _best_of_curve(self, trial_id: str, last: float) -> float:
        trial = self._ot_trials[trial_id]
        curve = list(trial.storage.get_trial(trial._trial_id).intermediate_values.values()) or [last]
        i = best([{"value": v} for v in curve], "value", self._mode)  # the one rule (diffmic/selection.py)
        return last if i is None else curve[i]

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        self.staging_dir = checkpoint_dir
        super().save_to_dir(checkpoint_dir, session_str)


class DistinctSampler(BaseSampler):
    def __init__(self, inner: BaseSampler, seed: int = 0) -> None:
        self.inner = inner
        self._rng = random.Random(seed)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The whole space, known from the trials that have one (the first trial is left to the inner sampler)."""
        space: dict[str, BaseDistribution] = {}
        for t in study.get_trials(deepcopy=False):
            if t.number != trial.number:
                space.update(t.distributions)
        return space

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict:
        if not search_space:
            return {}
        inner_space = self.inner.infer_relative_search_space(study, trial)
        point = dict(self.inner.sample_relative(study, trial, inner_space))
        for name, dist in search_space.items():  # what the inner sampler does not sample jointly, it samples alone
            if name not in point:
                point[name] = self.inner.sample_independent(study, trial, name, dist)
        tried = _tried(study, exclude=trial.number)
        if _key(point) not in tried:
            return point
        fresh = self._untried_near(point, search_space, tried)
        if fresh is None:
            logger.warning("Optuna proposed trial %d's configuration again and no untried point was found; "
                           "running it again", tried[_key(point)])
            return point
        return fresh

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def _untried_near(self, point: dict, space: dict, tried: dict) -> dict | None:
        """A random untried point that differs from `point` in one parameter, else anywhere in the space."""
        names = list(space)
        for draw in range(_DRAWS):
            if draw < _DRAWS // 2:
                name = self._rng.choice(names)
                candidate = {**point, name: _sample(space[name], self._rng)}
            else:
                candidate = {n: _sample(space[n], self._rng) for n in names}
            if _key(candidate) not in tried:
                return candidate
        return None


def _tried(study: Study, exclude: int) -> dict[tuple, int]:
    """Every configuration the study has run or runs (key -> trial number)."""
    tried: dict[tuple, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.number != exclude and t.state != TrialState.WAITING and t.params:
            tried.setdefault(_key(t.params), t.number)
    return tried


def _key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _sample(dist: BaseDistribution, rng: random.Random):
    if isinstance(dist, CategoricalDistribution):
        return rng.choice(dist.choices)
    if isinstance(dist, IntDistribution):
        return _grid(dist, rng, int)
    if isinstance(dist, FloatDistribution):
        if dist.step is not None:
            return _grid(dist, rng, float)
        if dist.log:
            return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
        return rng.uniform(dist.low, dist.high)
    raise TypeError(f"unsupported Optuna distribution {dist!r}")


def _grid(dist, rng: random.Random, cast):
    step = dist.step or 1
    steps = int(round((dist.high - dist.low) / step))
    return cast(dist.low + step * rng.randint(0, steps))
