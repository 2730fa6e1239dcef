"""After a dataset's search: the per-trial summary, the best trial (chosen on validation), its one test
evaluation and its exported bundle."""

from __future__ import annotations
import tempfile
from pathlib import Path
import pandas as pd
from typing import TYPE_CHECKING
from diffmic.checkpoint import to_jsonable
from tune.storage import StorageError, open_storage
if TYPE_CHECKING:
    from tune.study.dataset import DatasetSearch


def open_checkpoint(checkpoint_uri: str, sampling: dict | None = None):
    """(config, splits, evaluation model, fitted temperature, state) of a trial's checkpoint, on this process's
    device. The config is the checkpoint's own (the exact config that trained it), with `sampling` (diffusion.* keys:
    sampler, sample_steps, num_samples, eta) applied. Runs in Ray tasks: a worker process may start here."""
    from diffmic.compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from diffmic.checkpoint import fitted_temperature, load_eval_model, load_state
    from diffmic.config import split_seed
    from diffmic.data import build_splits
    from diffmic.remote import localize
    from diffmic.session import Session

    with tempfile.TemporaryDirectory() as tmp:
        state = load_state(open_storage(checkpoint_uri, check=False).download_dir("", Path(tmp) / "checkpoint"))
    cfg = state["config"]
    if cfg["dataset"].get("origin_root"):  # the worker's local cache path may not exist here
        cfg = {**cfg, "dataset": {**cfg["dataset"], "root": cfg["dataset"]["origin_root"]}}
    if sampling:  # a sampler point (tune/selection/pareto.py), resolved on the trial's own T and preset start
        from tune.selection.points import settings
        cfg = {**cfg, "diffusion": {**cfg["diffusion"], **settings(sampling, cfg)}}
    data = build_splits(localize(cfg)["dataset"], seed=split_seed(cfg))
    session = Session(amp=cfg["train"]["amp"])
    model = load_eval_model(state, data.num_classes).to(session.device)
    return cfg, data, model, fitted_temperature(state), state, session


def test_and_export(checkpoint_uri: str, export_uri: str | None, provenance: dict, replace: bool = False,
                    sampling: dict | None = None, explain: bool = False) -> dict:
    """Test metrics of a checkpoint's evaluation weights (EMA / best validation), and optionally the bundle
    exported from those same weights to `export_uri` (a directory or s3:// prefix), predicting by default with
    `sampling` (a Pareto point; None: the trial's own settings), and (`explain`) where the model looks on a few test
    images of each class. Needs no Ray: `test_best` runs it as a task, `tune.export` runs it here.

    The model is first measured on validation at that very point, which fits its temperatures (the head's and its
    DCG's: a DDIM-5 chain's ŷ0 is spread unlike the official chain's, so each point gets its own τ); the test then
    uses them, and the bundle carries them with the point they belong to. That validation figure ("val", the
    exported point's) is what stands beside the test figure; the best epoch's ("val_best_epoch", the training
    sampler's) is kept apart and named so."""
    from diffmic.bundle import MANIFEST, write_bundle
    from diffmic.engine import evaluate

    cfg, data, model, _, state, session = open_checkpoint(checkpoint_uri, sampling)
    val = evaluate(model, data.val, cfg, session, generator_seed=cfg["seed"])
    temperature = val["temperature"]
    test = evaluate(model, data.test, cfg, session, generator_seed=cfg["seed"], temperature=temperature,
                    dcg_temperature=val["dcg_temperature"], intervals=True)
    looks = where_it_looks(model, data.test, cfg, temperature, session.device) if explain else None
    best_epoch = state["best"]["metrics"] if state.get("best") else {}
    if export_uri is not None:
        dest = open_storage(export_uri, check=False)
        if dest.exists(MANIFEST):
            if not replace:
                raise StorageError(f"{export_uri} already holds a bundle: choose another destination, or replace "
                                   "it explicitly (tune.export --replace)")
            dest.delete_dir("", first=(MANIFEST,))  # never a mix of two bundles: incomplete until the new manifest
        with tempfile.TemporaryDirectory() as tmp:
            bundle = write_bundle(Path(tmp) / "bundle", model.cpu(), cfg, data.class_names,
                                  to_jsonable({"val": val, "val_best_epoch": best_epoch, "test": test}), provenance)
            dest.upload_dir(bundle, "", last=(MANIFEST,))
    sampling = {k: cfg["diffusion"][k] for k in ("sampler", "sample_steps", "num_samples")}
    return {"test": to_jsonable(test), "val": to_jsonable(val), "class_names": data.class_names,
            "sampling": sampling, "explain": looks}


def where_it_looks(model, dataset, cfg: dict, temperature: float, device) -> dict:
    """The report's "where it looks" panel: a few test images per class (right and wrong), each with the DCG's CAM
    and ROI crops as the prediction used them and its spread over the S chains (diffmic/explain.py)."""
    from diffmic.data.config import resolve_config
    from diffmic.explain import explain_split, heatmap_png

    d, pre = cfg["diffusion"], resolve_config(cfg["dataset"])
    shown = explain_split(model, dataset, pre["mean"], pre["std"], d["sampler"], d["sample_steps"], d["eta"],
                          d["num_samples"], temperature, device, seed=cfg["seed"])
    return {"items": [e.to_json() for e in shown], "images": [heatmap_png(e) for e in shown]}


def task_resources(cfg: dict) -> dict:
    """Ray task options for work on a trial's checkpoint: the resources of one of its Train workers, so it runs on
    the kind of device the trial trained on."""
    scaling = cfg["scaling"]
    resources = dict(scaling["resources_per_worker"] or {})
    num_gpus = resources.pop("GPU", 1) if scaling["use_gpu"] else 0
    num_cpus = resources.pop("CPU", 1)
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources or None}


def test_best(search: DatasetSearch, best: pd.Series, export_uri: str | None, sampling: dict | None = None,
              explain: bool = True) -> dict:
    """Evaluate the best trial's best checkpoint on the test split, once, and export it to export_uri (if given)."""
    import ray

    checkpoint_uri = search.record.checkpoint_uri(best)
    about = provenance(search.experiment, search.dataset, best, [p.key for p in search.params], checkpoint_uri,
                       search.cfg["search"]["metric"])
    task = ray.remote(**task_resources(search.cfg))(test_and_export)
    # a resumed search exports again
    out = ray.get(task.remote(checkpoint_uri, export_uri, about, True, sampling, explain=explain))
    return {**out, "bundle_uri": export_uri, "checkpoint_uri": checkpoint_uri}


def provenance(experiment: str, dataset: str, trial: pd.Series, params: list[str], checkpoint_uri: str,
               selected_on: str) -> dict:
    """Where an exported bundle comes from, as its bundle.json keeps it."""
    return to_jsonable({"experiment": experiment, "dataset": dataset, "trial_id": trial["trial_id"],
                        "params": {k: trial[k] for k in params if k in trial}, "checkpoint": checkpoint_uri,
                        "selected_on": selected_on})
