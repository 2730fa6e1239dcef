"""`python -m diffmic.export EXPERIMENT_URI [--dataset NAME] [--trial ID] [--to URI]`

Exports the best model of a finished search (per dataset, chosen on validation) as a self-contained bundle — the
same step `tune/search.py` runs at its end — or a chosen trial's best checkpoint instead. EXPERIMENT_URI is
`<storage.uri>/<experiment>` (local path or s3://). Default destinations: `<storage.uri>/best/<dataset>/` for the
best, `<storage.uri>/<experiment>/exports/<dataset>/<trial>/` for a chosen trial. The bundle is tested on the
test split once, as it is written.
"""
from __future__ import annotations

import argparse
import io
import json
import sys

from diffmic.checkpoint import to_jsonable
from diffmic.cli import one_line_errors


def export(experiment_uri: str, dataset: str | None = None, trial: str | None = None,
           to: str | None = None) -> list[dict]:
    import pandas as pd

    from tune.results import best_trial, test_and_export
    from tune.storage import open_storage

    root_uri, _, experiment = experiment_uri.rstrip("/").rpartition("/")
    storage = open_storage(root_uri)
    if not storage.exists(f"{experiment}/summary.parquet"):
        raise FileNotFoundError(f"{experiment_uri!r}: no summary.parquet (expected the results of tune/search.py)")
    summary = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{experiment}/summary.parquet")))
    meta = json.loads(storage.read_text(f"{experiment}/search.json"))
    datasets = [dataset] if dataset else sorted(summary["dataset"].unique())
    done = []
    for name in datasets:
        rows = summary[summary["dataset"] == name]
        if rows.empty:
            raise ValueError(f"--dataset {name!r}: not in this experiment (has {', '.join(sorted(summary['dataset'].unique()))})")
        if trial:
            picked = rows[rows["trial_id"] == trial]
            if picked.empty or picked.iloc[0].get("checkpoint_path") is None:
                raise ValueError(f"--trial {trial!r}: no checkpointed trial with that id for dataset {name!r}")
            row = picked.iloc[0]
        else:
            row = best_trial(rows, meta["metric"], meta["mode"])
            if row is None:
                raise ValueError(f"dataset {name!r}: no trial reported {meta['metric']} with a checkpoint")
        dest = to or (storage.join(experiment, "exports", name, row["trial_id"]) if trial else storage.join("best", name))
        dest = open_storage(dest).uri  # checks the destination before any work
        provenance = {"experiment": experiment, "dataset": name, "trial_id": row["trial_id"],
                      "params": {v["key"]: row[v["key"]] for v in meta["space"].values() if v["key"] in row},
                      "checkpoint": storage.uri_of(row["checkpoint_path"]), "selected_on": meta["metric"]}
        result = test_and_export(provenance["checkpoint"], dest, to_jsonable(provenance))
        done.append({"dataset": name, "trial_id": row["trial_id"], "bundle_uri": dest, **{
            f"test_{k}": v for k, v in result["test"].items() if not isinstance(v, list)}})
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffmic.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment_uri")
    parser.add_argument("--dataset")
    parser.add_argument("--trial")
    parser.add_argument("--to", help="destination directory or s3:// prefix")
    args = parser.parse_args(argv)
    with one_line_errors("diffmic.export"):
        for row in export(args.experiment_uri, args.dataset, args.trial, args.to):
            print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())
