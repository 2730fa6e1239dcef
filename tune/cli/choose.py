"""`python -m tune.cli.choose EXPERIMENT_URI [--dataset NAME] [--max-cost-ms MS]`: the choice stage alone, on an
existing experiment: the best sampler point of pareto.csv within a prediction-cost budget under the experiment's
selection rule, written to stages/<dataset>/choice.json; `python -m tune.export EXPERIMENT_URI` then tests and
exports it. Nothing is measured or trained.
"""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pandas as pd

from diffmic.cli import one_line_errors
from tune.record.experiment import Record
from tune.record.results import Results, best_trial
from tune.stages.steps import FINALISTS, choice_stage


def choose(experiment_uri: str, dataset: str | None, max_cost_ms: float | None) -> dict[str, dict]:
    if max_cost_ms is not None and max_cost_ms <= 0:
        raise ValueError(f"--max-cost-ms {max_cost_ms}: expected a positive number of milliseconds per image")
    results = Results.read(Record.at(experiment_uri))
    if dataset and dataset not in results.datasets:
        raise ValueError(f"--dataset {dataset!r}: not in this experiment (has {', '.join(results.datasets)})")
    out = {}
    for name in [dataset] if dataset else results.datasets:
        metric, mode = results.metric(name), results.searches[name]["mode"]
        knobs = {"metric": metric, "mode": mode, "max_cost_ms": max_cost_ms}
        stage = SimpleNamespace(dataset=name, record=results.record, cfg={"search": knobs})
        best = best_trial(results.trials(name), metric, mode)
        if best is None:
            raise ValueError(f"dataset {name!r}: no trial reported {metric} with a checkpoint")
        finalists = results.record.read_stage(name, FINALISTS) or {}
        selected = finalists.get("selected")
        out[name] = choice_stage(stage, results.record.read_rows("pareto", name), best,
                                 None if selected is None else pd.Series(selected),
                                 finalists.get("repeats") or {})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tune.cli.choose", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_uri")
    parser.add_argument("--dataset")
    parser.add_argument("--max-cost-ms", type=float, help="prediction budget, ms per image (default: none)")
    args = parser.parse_args(argv)
    with one_line_errors("tune.cli.choose"):
        print(json.dumps(choose(args.experiment_uri, args.dataset, args.max_cost_ms), indent=1))


if __name__ == "__main__":
    main()
