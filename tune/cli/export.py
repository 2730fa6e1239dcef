"""`python -m tune.export EXPERIMENT_URI [--dataset NAME] [--trial ID] [--sampler S --steps N] [--to URI]`

Exports the model a finished search chose for each dataset (the best point of pareto.csv within search.max_cost_ms,
or the selected finalist) as a self-contained bundle — the same step `tune/search.py` runs at its end — or any other
trial or finalist run (`--trial`), predicting by default with any sampler setting (`--sampler ddim --steps 10`).
EXPERIMENT_URI is `<storage.uri>/<experiment>` (local path or s3://). Default destinations:
`<experiment>/best/<dataset>/` for the best, `<experiment>/exports/<dataset>/<trial>/` for a chosen trial. A bundle
already there is replaced only with --replace. The bundle is tested on the test split once, as it is written.
`python -m tune.promote` makes it the current best of its dataset.
"""

from __future__ import annotations
import argparse
import json
from diffmic.cli import one_line_errors
from tune.stages.export import export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_uri")
    parser.add_argument("--dataset")
    parser.add_argument("--trial")
    parser.add_argument("--to", help="destination directory or s3:// prefix")
    parser.add_argument("--replace", action="store_true", help="replace a bundle already at the destination")
    parser.add_argument("--sampler", help="the bundle's default sampler: official, ddpm or ddim (a point of "
                        "pareto.csv; default: the point the search chose, or the trial's own settings)")
    parser.add_argument("--steps", type=int, help="with --sampler: its sample_steps (ddim: steps; official: start)")
    parser.add_argument("--samples", type=int, help="with --sampler: chains per image (num_samples)")
    args = parser.parse_args(argv)
    with one_line_errors("tune.export"):
        for row in export(args.experiment_uri, args.dataset, args.trial, args.to, args.replace, args.sampler,
                          args.steps, args.samples):
            print(json.dumps(row))
