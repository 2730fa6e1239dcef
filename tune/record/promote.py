"""`python -m tune.promote EXPERIMENT_URI [--dataset NAME] [--force]`: make an experiment's best model the current
best of its dataset, `<storage root>/best/<dataset>/`, the bundle users load.

Each search writes its best models to its own `<experiment>/best/<dataset>/` and never touches another experiment's.
The current best changes only by this explicit act (or, for a dataset that has none yet, at the end of a search):
the two models' validation metric is compared under the experiment's selection rule for the dataset, a model that is
not better is not promoted without --force, and the replaced bundle is kept under
`<storage root>/best-previous/<dataset>/<UTC time>-<its experiment>/`.
"""

from __future__ import annotations
import json
import tempfile
import time
from pathlib import Path
from diffmic.bundle import MANIFEST, META
from tune.record.experiment import Record, RecordError
from tune.storage import Storage
from diffmic.selection import better




def bundle_meta(storage: Storage, rel: str) -> dict | None:
    """bundle.json of the complete bundle at rel (one with its manifest), else None."""
    if not storage.exists(f"{rel}/{MANIFEST}"):
        return None
    return json.loads(storage.read_text(f"{rel}/{META}"))


def copy_bundle(storage: Storage, src: str, dst: str) -> None:
    """Every file of the bundle at src to dst, the manifest last: a copy that dies half-way is refused as incomplete."""
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(src, Path(tmp) / "bundle")
        storage.upload_dir(Path(tmp) / "bundle", dst, last=(MANIFEST,))


def promote(record: Record, dataset: str, force: bool = False) -> str:
    """Promote the experiment's best model of `dataset`; returns the line that says what happened."""
    search = record.read_search()["datasets"].get(dataset)
    if search is None:
        raise RecordError(f"--dataset {dataset!r}: not searched in {record.uri}")
    metric, mode = search["metric"], search["mode"]
    storage, src, current = record.storage, record.best_key(dataset), record.current_key(dataset)
    new = bundle_meta(storage, src)
    if new is None:
        raise RecordError(f"no complete bundle at {storage.join(src)} (the search exports one when it ends; "
                          "`python -m tune.export` writes it again)")
    new_value = new["metrics"]["val"][metric.removeprefix("val_")]
    old = bundle_meta(storage, current)
    if old is not None:
        old_from, new_from = old.get("provenance") or {}, new.get("provenance") or {}
        if (old_from.get("experiment"), old_from.get("trial_id")) == (new_from.get("experiment"),
                                                                       new_from.get("trial_id")):
            return f"{dataset}: {storage.join(current)} already holds this model"
        old_value = (old.get("metrics") or {}).get("val", {}).get(metric.removeprefix("val_"))
        if not better(new_value, old_value, mode) and not force:
            return (f"{dataset}: kept {storage.join(current)} (experiment {old_from.get('experiment')}, {metric} "
                    f"{old_value:.4g}); this experiment's model has {metric} {new_value:.4g} ({mode} is better): "
                    "--force promotes it anyway")
        kept = f"best-previous/{dataset}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-" \
               f"{old_from.get('experiment') or 'unknown'}"
        copy_bundle(storage, current, kept)
        storage.delete_dir(current, first=(MANIFEST,))
    copy_bundle(storage, src, current)
    was = f"; the previous one is kept at {storage.join(kept)}" if old is not None else ""
    return f"{dataset}: {storage.join(current)} is now experiment {record.experiment}'s model ({metric} {new_value:.4g}){was}"


def first_current(record: Record, dataset: str) -> str:
    """At the end of a search: the dataset's first model becomes its current best; an existing one stays."""
    if bundle_meta(record.storage, record.current_key(dataset)) is None:
        return promote(record, dataset)
    return (f"{dataset}: this experiment's model is at {record.best_bundle_uri(dataset)}; the current best "
            f"{record.storage.join(record.current_key(dataset))} is unchanged (`python -m tune.promote {record.uri} "
            f"--dataset {dataset}` compares the two and replaces it if this one is better)")
