"""Optuna through Ray Tune, without running the same configuration twice.

The searched spaces are small and mostly categorical (the default one has 384 points), and TPE exploits: once a point
scores well it tends to propose that very point again, and a second trial of it only re-measures seed noise at full
cost (seen in 2 of 3 default searches). A repeat is recorded in the study as a failed trial (which TPE and the
importance evaluator ignore), and a point one parameter away from it that no trial has tried is run instead.
"""
from __future__ import annotations

import logging
import math
import random

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)
REPEAT_OF = "repeat_of"  # user attribute of a proposal that was not run: the number of the trial it repeated
_DRAWS = 200             # random neighbours and points tried before accepting a repeat (the space may be exhausted)


class DistinctOptunaSearch(OptunaSearch):
    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._rng = random.Random(seed)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if config is None or trial is None or not isinstance(self._space, dict):
            return config
        tried = self._tried(exclude=trial.number)
        twin = tried.get(_key(trial.params))
        if twin is None:
            return config
        fresh = self._untried_near(trial.params, tried)
        if fresh is None:
            logger.warning("Optuna proposed trial %d's configuration again and no untried point was found; "
                           "running it again", twin)
            return config
        trial.set_user_attr(REPEAT_OF, twin)
        self._ot_study.tell(trial, state=TrialState.FAIL)
        del self._ot_trials[trial_id]
        self._ot_study.enqueue_trial(fresh)
        return super().suggest(trial_id)  # asks again, and the study hands out the enqueued point

    def _tried(self, exclude: int) -> dict[tuple, int]:
        """Every configuration the study has run or runs (key -> trial number); hidden repeats excluded."""
        tried = {}
        for t in self._ot_study.get_trials(deepcopy=False):
            if t.number != exclude and t.state != TrialState.WAITING and REPEAT_OF not in t.user_attrs:
                tried.setdefault(_key(t.params), t.number)
        return tried

    def _untried_near(self, params: dict, tried: dict) -> dict | None:
        """A random untried point that differs from `params` in one parameter, else anywhere in the space."""
        names = [n for n in self._space if n in params]
        for draw in range(_DRAWS):
            if draw < _DRAWS // 2:
                name = self._rng.choice(names)
                point = {**params, name: _sample(self._space[name], self._rng)}
            else:
                point = {n: _sample(self._space[n], self._rng) for n in names}
            if _key(point) not in tried:
                return point
        return None


def _key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _sample(dist, rng: random.Random):
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

