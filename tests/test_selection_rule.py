"""The one rule (diffmic/selection.py): better under metric + mode, ties to the earliest epoch, then the cheaper point,
then the lowest trial id; and every place that picks uses it."""
import math

import pandas as pd
import pytest

from diffmic.selection import best, better, ranked


def test_better_is_strict_and_missing_values_never_win():
    assert better(0.9, 0.8, "max") and better(0.1, 0.2, "min")
    assert not better(0.8, 0.8, "max")  # a tie keeps the earlier one
    assert not better(math.nan, 0.1, "max") and not better(None, 0.1, "min")
    assert better(0.1, None, "max") and better(0.1, math.nan, "min")
    with pytest.raises(ValueError, match="mode='maximum': expected max or min"):
        better(1, 0, "maximum")


def test_ties_go_to_the_earliest_epoch_then_the_cheaper_point_then_the_lowest_trial_id():
    epochs = [{"epoch": 3, "v": 0.9}, {"epoch": 1, "v": 0.9}, {"epoch": 2, "v": 0.5}]
    assert best(epochs, "v", "max") == 1 and best(epochs, "v", "min") == 2
    points = [{"trial_id": "b", "predict_ms_per_image": 5.0, "v": 0.9},
              {"trial_id": "a", "predict_ms_per_image": 9.0, "v": 0.9},
              {"trial_id": "c", "predict_ms_per_image": 5.0, "v": 0.9}]
    assert best(points, "v", "max") == 0  # cheaper first, then b before c
    trials = [{"trial_id": "t2", "v": 0.7}, {"trial_id": "t1", "v": 0.7}, {"trial_id": "t3", "v": math.nan}]
    assert ranked(trials, "v", "max") == [1, 0] and best([{"v": None}], "v", "max") is None


def test_every_picker_follows_the_rule():
    """The best trial, a trial's best epoch, the finalists' ranking and the Pareto choice agree on a tied table
    (the row order is chosen so that a plain idxmax or an unstable sort would pick otherwise)."""
    from tune.record.results import best_trial
    from tune.selection.finalists import top_configs
    from tune.selection.pareto import choose

    summary = pd.DataFrame([{"trial_id": "t9", "best_epoch": 2, "lr": 1, "val_f1": 0.8, "checkpoint_path": "/9"},
                            {"trial_id": "t5", "best_epoch": 1, "lr": 2, "val_f1": 0.8, "checkpoint_path": "/5"},
                            {"trial_id": "t1", "best_epoch": 1, "lr": 3, "val_f1": 0.8, "checkpoint_path": "/1"}])
    assert best_trial(summary, "val_f1", "max")["trial_id"] == "t1"
    assert [c["lr"] for c in top_configs(summary, ["lr"], "val_f1", "max", 3)] == [3, 2, 1]
    points = pd.DataFrame([{"dataset": "d", "trial_id": "t9", "val_f1": 0.8, "predict_ms_per_image": 2.0},
                           {"dataset": "d", "trial_id": "t5", "val_f1": 0.8, "predict_ms_per_image": 1.0},
                           {"dataset": "d", "trial_id": "t1", "val_f1": 0.8, "predict_ms_per_image": 1.0}])
    assert choose(points, "d", "val_f1", "max", None)["trial_id"] == "t1"
