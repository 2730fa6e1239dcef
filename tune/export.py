"""`python -m tune.export EXPERIMENT_URI [--dataset NAME] [--trial ID] [--to URI]`

Exports the best model of a finished search (per dataset, chosen on validation by that dataset's selection rule) as a
self-contained bundle — the same step `tune/search.py` runs at its end — or a chosen trial's best checkpoint instead.
EXPERIMENT_URI is `<storage.uri>/<experiment>` (local path or s3://). Default destinations:
`<experiment>/best/<dataset>/` for the best, `<experiment>/exports/<dataset>/<trial>/` for a chosen trial. A bundle
already there is replaced only with --replace. The bundle is tested on the test split once, as it is written.
`python -m tune.promote` makes it the current best of its dataset.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tune/export.py` from any working copy

from diffmic.cli import one_line_errors  # noqa: E402
from diffmic.metrics import prefixed  # noqa: E402


def export(experiment_uri: str, dataset: str | None = None, trial: str | None = None,
           to: str | None = None, replace: bool = False) -> list[dict]:
    from tune.record import CHECKPOINT, Record, best_trial
    from tune.results import provenance, test_and_export
    from tune.storage import open_storage

    results = Record.at(experiment_uri).load()
    if dataset and dataset not in results.datasets:
        raise ValueError(f"--dataset {dataset!r}: not in this experiment (has {', '.join(results.datasets)})")
    done = []
    for name in [dataset] if dataset else results.datasets:
        rows = results.trials(name)
        if trial:
            picked = rows[rows["trial_id"] == trial]
            if picked.empty or picked.iloc[0].get(CHECKPOINT) is None:
                raise ValueError(f"--trial {trial!r}: no checkpointed trial with that id for dataset {name!r}")
            row = picked.iloc[0]
        else:
            row = best_trial(rows, results.metric(name), results.searches[name]["mode"])
            if row is None:
                raise ValueError(f"dataset {name!r}: no trial reported {results.metric(name)} with a checkpoint")
        dest = to or (results.record.trial_bundle_uri(name, row["trial_id"]) if trial
                      else results.record.best_bundle_uri(name))
        dest = open_storage(dest).uri  # checks the destination before any work
        checkpoint_uri = results.record.checkpoint_uri(row)
        about = provenance(results.experiment, name, row, [k for k, _, _ in results.params(name)], checkpoint_uri,
                           results.metric(name))
        result = test_and_export(checkpoint_uri, dest, about, replace)
        done.append({"dataset": name, "trial_id": row["trial_id"], "bundle_uri": dest,
                     **prefixed("test", result["test"])})
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_uri")
    parser.add_argument("--dataset")
    parser.add_argument("--trial")
    parser.add_argument("--to", help="destination directory or s3:// prefix")
    parser.add_argument("--replace", action="store_true", help="replace a bundle already at the destination")
    args = parser.parse_args(argv)
    with one_line_errors("tune.export"):
        for row in export(args.experiment_uri, args.dataset, args.trial, args.to, args.replace):
            print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())
