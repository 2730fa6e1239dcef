"""`python -m tune.promote EXPERIMENT_URI [--dataset NAME] [--force]`: make an experiment's best model the current
best of its dataset, `<storage root>/best/<dataset>/`, the bundle users load.

Each search writes its best models to its own `<experiment>/best/<dataset>/` and never touches another experiment's.
The current best changes only by this explicit act (or, for a dataset that has none yet, at the end of a search):
the two models' validation metric is compared under the experiment's selection rule for the dataset, a model that is
not better is not promoted without --force, and the replaced bundle is kept under
`<storage root>/best-previous/<dataset>/<UTC time>-<its experiment>/`.
"""

from __future__ import annotations
import argparse
from diffmic.cli import one_line_errors
from tune.record.experiment import Record
from tune.record.promote import promote


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tune.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_uri")
    parser.add_argument("--dataset", help="one dataset (default: every dataset of the experiment)")
    parser.add_argument("--force", action="store_true", help="promote even a model that is not better")
    args = parser.parse_args(argv)
    with one_line_errors("tune.promote"):
        record = Record.at(args.experiment_uri)
        for dataset in [args.dataset] if args.dataset else list(record.read_search()["datasets"]):
            print(promote(record, dataset, args.force), flush=True)
