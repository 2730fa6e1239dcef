"""Trials at once across the datasets of one search, which run side by side on the same cluster.

Each dataset has its own Tune experiment (own searcher, scheduler, study), so no single Tune setting can bound the
trials of all of them; `search.max_concurrent_trials` is that bound. A `TrialPool` holds it, and each dataset's
searcher asks the pool before it starts a trial (`PooledLimiter`). Fair: while another dataset waits for a slot, a
dataset holds at most its share (the total divided among the datasets still searching); when nobody else waits, it
may take any free slot, so a dataset's tail of ASHA stragglers never leaves the cluster idle.
"""
from __future__ import annotations

import math
import threading

from ray.tune.search import ConcurrencyLimiter


class TrialPool:
    def __init__(self, total: int):
        self.total = total
        self._lock = threading.Lock()
        self._live: dict[str, int] = {}      # member -> its trials started and not yet complete
        self._waiting: dict[str, bool] = {}  # member -> its last request was refused
        self._active: set[str] = set()       # members still searching

    def join(self, member: str) -> None:
        with self._lock:
            self._active.add(member)
            self._live.setdefault(member, 0)

    def leave(self, member: str) -> None:
        with self._lock:
            self._active.discard(member)
            self._live.pop(member, None)
            self._waiting.pop(member, None)

    def request(self, member: str, live: int) -> bool:
        """May `member`, which has `live` trials running, start one more? A yes reserves the slot until `update`."""
        with self._lock:
            self._live[member] = live
            ok = sum(self._live.values()) < self.total
            if ok:
                share = math.ceil(self.total / max(1, len(self._active | {member})))
                others_wait = any(w for m, w in self._waiting.items() if m != member and m in self._active)
                ok = live < share or not others_wait
            self._waiting[member] = not ok
            if ok:
                self._live[member] = live + 1
            return ok

    def update(self, member: str, live: int) -> None:
        with self._lock:
            if member in self._live:
                self._live[member] = live

    def members(self) -> list[str]:
        """The datasets still searching."""
        with self._lock:
            return sorted(self._active)

    def running(self) -> dict[str, int]:
        with self._lock:
            return dict(self._live)


# Pools by search: the limiter is pickled with Tune's state (tuner.pkl), so it names its pool rather than holding it.
POOLS: dict[str, TrialPool] = {}


class PooledLimiter(ConcurrencyLimiter):
    """A dataset's searcher, limited by the search's shared pool `POOLS[pool]` (by `max_concurrent` alone when this
    process has no such pool)."""

    def __init__(self, searcher, max_concurrent: int, pool: str, member: str):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.pool, self.member = pool, member

    def suggest(self, trial_id: str):
        pool = POOLS.get(self.pool)
        if pool is not None and not pool.request(self.member, len(self.live_trials)):
            return None
        try:
            return super().suggest(trial_id)
        finally:
            if pool is not None:
                pool.update(self.member, len(self.live_trials))

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        super().on_trial_complete(trial_id, result=result, error=error)
        pool = POOLS.get(self.pool)
        if pool is not None:
            pool.update(self.member, len(self.live_trials))
