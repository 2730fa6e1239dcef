"""What the search does beyond Tune + Optuna, as pure code (no Ray): the trial pool the datasets share, the Pareto
front of validation metric against prediction cost, the finalists' configurations and runs. The same features on a
real Ray cluster: tests/test_search.py::test_two_datasets_at_once_pareto_front_and_finalists."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from tune.selection.finalists import SEED_STRIDE, plan_runs, top_configs
from tune.selection.points import COST, ParetoError, check_grid, settings
from tune.selection.pareto import choose, mark_front
from tune.study.pool import POOLS, PooledLimiter, TrialPool


# ------------------------------------------------------------------------------------------------ the trial pool
def test_the_pool_never_runs_more_than_its_total():
    pool = TrialPool(3)
    for m in ("a", "b"):
        pool.join(m)
    live = {"a": 0, "b": 0}
    for _ in range(10):
        for m in ("a", "b"):
            if pool.request(m, live[m]):
                live[m] += 1
    assert sum(live.values()) == 3


def test_a_dataset_waiting_gets_its_share_before_another_takes_more():
    pool = TrialPool(4)
    pool.join("a"), pool.join("b")
    assert [pool.request("a", n) for n in range(2)] == [True, True]  # a takes its share of 2
    assert pool.request("b", 0) is True
    pool.update("b", 1)
    # b is not waiting: a may take the free slot
    assert pool.request("a", 2) is True
    # now full; b asks, is refused and waits; when a slot frees, a (over its share) may not take it while b waits
    assert pool.request("b", 1) is False
    pool.update("a", 2)  # one of a's trials ended
    assert pool.request("a", 2) is False
    assert pool.request("b", 1) is True


def test_a_dataset_that_has_finished_leaves_its_share_to_the_others():
    pool = TrialPool(4)
    pool.join("a"), pool.join("b")
    for n in range(2):
        assert pool.request("b", n)
    live = 0
    while pool.request("a", live):
        live += 1
    assert live == 2  # b holds 2 of 4
    assert pool.request("b", 2) is False  # b waits now: a may not go beyond its share
    pool.leave("b")
    while pool.request("a", live):
        live += 1
    assert live == 4  # alone, a may use the whole pool


from ray.tune.search import Searcher  # noqa: E402 (only the base class; no Ray process starts)


class _Searcher(Searcher):
    """A searcher that always has another configuration."""
    def __init__(self):
        super().__init__()
        self.n = 0

    def suggest(self, trial_id):
        self.n += 1
        return {"x": self.n}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def test_pooled_limiters_share_one_total_and_survive_pickling():
    import pickle

    POOLS["exp"] = TrialPool(2)
    try:
        a = PooledLimiter(_Searcher(), max_concurrent=2, pool="exp", member="a")
        b = PooledLimiter(_Searcher(), max_concurrent=2, pool="exp", member="b")
        POOLS["exp"].join("a"), POOLS["exp"].join("b")
        assert a.suggest("a1") is not None
        assert b.suggest("b1") is not None
        assert a.suggest("a2") is None and b.suggest("b2") is None  # 2 running: the pool is full
        a.on_trial_complete("a1")
        # both wait; b is at its share (1 of 2), a below it: the freed slot is a's
        assert b.suggest("b3") is None
        assert a.suggest("a3") is not None
        again = pickle.loads(pickle.dumps(a))  # Tune pickles its searcher (tuner.pkl): the pool goes by name
        assert again.pool == "exp" and again.member == "a"
    finally:
        POOLS.pop("exp", None)


# ------------------------------------------------------------------------------------------------ Pareto front
def _points():
    return pd.DataFrame([
        {"dataset": "d", "trial_id": "t1", "sampler": "official", "sample_steps": 250, "num_samples": 1,
         "val_macro_f1": 0.80, COST: 40.0},
        {"dataset": "d", "trial_id": "t1", "sampler": "ddim", "sample_steps": 10, "num_samples": 1,
         "val_macro_f1": 0.79, COST: 4.0},
        {"dataset": "d", "trial_id": "t2", "sampler": "ddim", "sample_steps": 10, "num_samples": 1,
         "val_macro_f1": 0.70, COST: 5.0},   # beaten by t1 ddim 10 on both
        {"dataset": "d", "trial_id": "t2", "sampler": "ddpm", "sample_steps": 1000, "num_samples": 1,
         "val_macro_f1": 0.82, COST: 150.0},
        {"dataset": "e", "trial_id": "t3", "sampler": "ddim", "sample_steps": 5, "num_samples": 1,
         "val_macro_f1": 0.50, COST: 999.0},  # another dataset: its own front
    ])


def test_the_front_holds_the_points_nothing_beats_on_both():
    front = mark_front(_points(), "val_macro_f1", "max")
    assert front["on_front"].tolist() == [True, True, False, True, True]
    # for a metric to minimise the order flips
    lower = mark_front(_points().assign(val_ece=[0.1, 0.2, 0.05, 0.3, 0.1]), "val_ece", "min")
    assert lower["on_front"].tolist() == [False, True, True, False, True]


@pytest.mark.parametrize("budget, expected", [(None, ("t2", "ddpm")), (50.0, ("t1", "official")),
                                              (4.5, ("t1", "ddim")), (1.0, None)])
def test_the_chosen_point_is_the_best_within_the_cost_budget(budget, expected):
    point = choose(_points(), "d", "val_macro_f1", "max", budget)
    assert (None if point is None else (point["trial_id"], point["sampler"])) == expected


def test_a_points_settings_follow_the_trials_own_chain():
    cfg = {"diffusion": {"timesteps": 100, "sample_steps": 250, "beta_steps": 1000, "num_samples": 2}}
    assert settings({"sampler": "official"}, cfg) == {"sampler": "official", "sample_steps": 250, "num_samples": 2}
    assert settings({"sampler": "ddpm"}, cfg)["sample_steps"] == 100
    assert settings({"sampler": "ddim", "sample_steps": 10, "num_samples": 1}, cfg) == \
        {"sampler": "ddim", "sample_steps": 10, "num_samples": 1}


@pytest.mark.parametrize("grid, expected", [
    ({"sampler": "ddim"}, "expected a list"),
    ([{"sampler": "euler"}], "search.pareto[0]"),
    ([{"sampler": "ddim", "steps": 10}], "search.pareto[0]"),
    ([{"sampler": "ddim", "sample_steps": 0}], "sample_steps must be an integer >= 1"),
    ([{"sampler": "ddim", "sample_steps": 500}], "exceed the smallest diffusion.timesteps searched (100)"),
])
def test_a_bad_sampler_grid_is_one_line(grid, expected):
    with pytest.raises(ParetoError, match=None) as e:
        check_grid(grid, [100, 250])
    assert expected in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ finalists
def test_finalists_are_the_best_distinct_configurations_each_repeated_with_new_seeds():
    summary = pd.DataFrame({"a": [1, 1, 2, 3], "b": ["x", "x", "y", "z"], "val_f1": [0.9, 0.8, 0.7, math.nan]})
    configs = top_configs(summary, ["a", "b"], "val_f1", "max", 3)
    assert configs == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]  # a duplicate and a trial without the metric skipped
    assert top_configs(summary, ["a", "b"], "val_f1", "min", 1) == [{"a": 2, "b": "y"}]
    runs = plan_runs(configs, 2, seed=5)
    assert [(r["config"], r["repeat"], r["seed"]) for r in runs] == \
        [(0, 0, 5 + SEED_STRIDE), (0, 1, 5 + 2 * SEED_STRIDE), (1, 0, 5 + SEED_STRIDE), (1, 1, 5 + 2 * SEED_STRIDE)]
    assert len({r["name"] for r in runs}) == 4
    # a run's name depends on its configuration only, not on its rank: a resumed search never continues one
    # configuration's checkpoints under another's name
    assert plan_runs(configs[::-1], 2, seed=5)[0]["name"] == runs[2]["name"]
    # folds: the search's seed, validation carves 1..R, names apart from the seeds runs
    folds = plan_runs(configs, 2, seed=5, mode="folds")
    assert [(r["seed"], r["val_carve"]) for r in folds] == [(5, 1), (5, 2)] * 2
    assert not {r["name"] for r in folds} & {r["name"] for r in runs}


def test_an_experiment_of_the_earlier_trainable_name_resumes_only_alone():
    """Before datasets ran at once every trainable was named run_trial; Tune restores an experiment only under its
    trainable's name, and two experiments under one name in one driver would mix their configs."""
    from types import SimpleNamespace

    from tune.study.runner import LEGACY_NAME, legacy_name, trial_function

    assert trial_function("isic2018").__name__ == "run_trial_isic2018"
    search = SimpleNamespace(dataset="a", record=SimpleNamespace(uri="mem://exp"))
    POOLS["mem://exp"] = pool = TrialPool(2)
    try:
        pool.join("a"), pool.join("b")
        with pytest.raises(ValueError, match=r"resume one dataset at a time \(datasets=\[a\]\)"):
            legacy_name(search)
        pool.leave("b")
        assert legacy_name(search) == LEGACY_NAME
    finally:
        POOLS.pop("mem://exp", None)


def test_a_bad_repeat_mode_is_one_line_naming_it():
    import yaml

    from diffmic.cli import CONFIG_DIR
    from tune.study.checks import check_knobs
    from tune.study.space import SearchError

    knobs = yaml.safe_load((CONFIG_DIR / "search" / "default.yaml").read_text())
    check_knobs(knobs)  # the defaults pass
    with pytest.raises(SearchError, match=r"^search.repeat_mode='fold': expected seeds or folds$"):
        check_knobs({**knobs, "repeat_mode": "fold"})


def test_a_finalist_export_is_repeat_0_whatever_the_repeats_scores(monkeypatch):
    """Issue 22: the selected configuration's repeat fixed in advance is exported, not its luckiest repeat."""
    import pandas as pd

    import tune.train.distributed
    from tune.selection import finalists

    scores = {"finalist-r0": 0.5, "finalist-r1": 0.9, "finalist-r2": 0.7}

    class Result:
        def __init__(self, name):
            self.error, self.checkpoint = None, type("C", (), {"path": f"/x/{name}"})()
            self.best_checkpoints = [(None, {"val_macro_f1": scores[name], "epoch": 1})]

    monkeypatch.setattr(tune.train.distributed, "build_trainer",
                        lambda cfg, storage, name: type("T", (), {"fit": lambda self: Result(name)})())
    monkeypatch.setattr(finalists, "plan_runs", lambda configs, repeats, seed, mode="seeds": [
        {"config": 0, "params": {}, "repeat": r, "seed": r, "val_carve": 0, "name": f"finalist-r{r}"}
        for r in range(3)])
    search = type("S", (), {})()
    search.cfg = {"search": {"metric": "val_macro_f1", "mode": "max", "finalists": 1, "repeats": 3,
                             "repeat_mode": "seeds", "max_concurrent_trials": 1},
                  "seed": 0, "dataset": {"split_seed": 0, "val_carve": 0}, "scaling": {"num_workers": 1}}
    search.params, search.dataset = [], "d"
    search.storage = type("St", (), {"join": lambda self, *a: "/tmp/none"})()
    search.record = type("R", (), {"finalists_key": lambda self, d: "finalists/d"})()
    monkeypatch.setattr("tune.storage.open_storage", lambda uri, check=False: None)
    summary = pd.DataFrame([{"trial_id": "t", "val_macro_f1": 0.6, "checkpoint_path": "/x"}])
    frame, selected, stats = finalists.confirm(search, summary)
    assert selected["trial_id"] == "finalist-r0" and selected["val_macro_f1"] == 0.5
    assert stats["val_macro_f1_mean"] == pytest.approx(0.7)
