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
from diffmic.metrics import prefixed
from tune.record.results import Results




def export(experiment_uri: str, dataset: str | None = None, trial: str | None = None,
           to: str | None = None, replace: bool = False, sampler: str | None = None, steps: int | None = None,
           samples: int | None = None) -> list[dict]:
    import pandas as pd

    from diffmic.choices import SAMPLERS
    from diffmic.ledger import look
    from tune.record.experiment import CHECKPOINT, Record
    from tune.record.results import best_trial
    from tune.stages.checkpoints import provenance, test_and_export
    from tune.storage import open_storage

    if sampler is None and (steps is not None or samples is not None):
        raise ValueError("--steps/--samples need --sampler (official, ddpm or ddim)")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    for flag, value in (("--steps", steps), ("--samples", samples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: expected an integer >= 1")
    results = Results.read(Record.at(experiment_uri))
    if dataset and dataset not in results.datasets:
        raise ValueError(f"--dataset {dataset!r}: not in this experiment (has {', '.join(results.datasets)})")
    done = []
    for name in [dataset] if dataset else results.datasets:
        # Trials of the search and runs of its finalists: any of them can be exported.
        control = (results.record.read_stage(name, "control") or {}).get("row")  # the plain control's run
        rows = pd.concat([f[f["dataset"].astype(str) == name] for f in (results.summary, results.finalists,
                          pd.DataFrame([control] if control else [])) if "dataset" in f], ignore_index=True)
        # the search's choice (the choice stage's artefact, which `tune.cli.choose` may have re-made; best.json for
        # records written before the stages had artefacts)
        chosen = results.record.read_stage(name, "choice") or results.best.get(name) or {}
        if trial:
            picked = rows[rows["trial_id"] == trial]
            if picked.empty or pd.isna(picked.iloc[0].get(CHECKPOINT)):
                raise ValueError(f"--trial {trial!r}: no checkpointed trial or finalist run with that id for "
                                 f"dataset {name!r}")
            row, sampling = picked.iloc[0], None
        elif chosen.get("trial_id") is not None and (rows["trial_id"] == str(chosen["trial_id"])).any():
            # The search's choice: its best point within search.max_cost_ms, or its selected finalist.
            row = rows[rows["trial_id"] == str(chosen["trial_id"])].iloc[0]
            sampling = chosen.get("sampling") or None
        else:
            row, sampling = best_trial(rows, results.metric(name), results.searches[name]["mode"]), None
            if row is None:
                raise ValueError(f"dataset {name!r}: no trial reported {results.metric(name)} with a checkpoint")
        if sampler is not None:
            sampling = {"sampler": sampler, "sample_steps": steps, "num_samples": samples}
            sampling = {k: v for k, v in sampling.items() if v is not None}
        dest = to or (results.record.trial_bundle_uri(name, row["trial_id"]) if trial
                      else results.record.best_bundle_uri(name))
        dest = open_storage(dest).uri  # checks the destination before any work
        checkpoint_uri = results.record.checkpoint_uri(row)
        about = provenance(results.experiment, name, row, [k for k, _, _ in results.params(name)], checkpoint_uri,
                           results.metric(name))
        result = test_and_export(checkpoint_uri, dest, about, replace, sampling)
        results.record.append_test_look(look("tune.export", result["test"], name, str(row["trial_id"]),
                                             result["sampling"]))
        done.append({"dataset": name, "trial_id": row["trial_id"], "bundle_uri": dest, "sampling": result["sampling"],
                     **prefixed("test", result["test"])})
    return done
