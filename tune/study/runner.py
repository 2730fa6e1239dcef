"""One dataset's search: a Ray Tune experiment whose trials are Ray Train runs of the DiffMIC training loop,
sampled by Optuna (TPE by default) and stopped early by ASHA on the per-epoch validation metric."""
from __future__ import annotations


import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from diffmic.config import with_values
from diffmic.secrets import redact_config
from tune.train.distributed import build_trainer, sweep_orphaned_scratch
from tune.pages import tracking
from tune.pages.live import Progress
from tune.study.resume import verify_ray_state
from tune.study.resume_hooks import ResumableASHA, SearchState
from tune.study.space import tune_space
from tune.storage import open_storage
from tune.study.dataset import DatasetSearch


# What a trial itself holds: it only waits on its Ray Train run. No CPU (even 0.01 CPU per trial would leave room for
# one trial fewer: 2 trials of a 1-CPU worker need 2.02 CPUs); an empty request is refused, so one byte of memory.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}


def run_trial(params: dict, base_cfg: dict, checkpoints_uri: str) -> None:
    """A Tune trial: one Ray Train run with the sampled values applied as overrides of the base config.

    The inner run is named after the trial, so a restored trial finds its own checkpoints and continues.
    """
    cfg = with_values(base_cfg, params)
    storage = open_storage(checkpoints_uri, check=False)
    trial_id = tune.get_context().get_trial_id()
    result = build_trainer(cfg, storage, name=trial_id, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error


LEGACY_NAME = "run_trial"  # every dataset's trainable had this name before datasets were searched at once


def trial_function(dataset: str, name: str | None = None):
    """run_trial under a name of the dataset's own: Tune registers trainables by name, once per process, and the
    datasets' searches run at once in one driver; under one shared name a dataset's trials ran with another's
    config (seen: synthetic trials training on APTOS images)."""
    def trial(params: dict, base_cfg: dict, checkpoints_uri: str) -> None:
        run_trial(params, base_cfg, checkpoints_uri)

    trial.__name__ = trial.__qualname__ = name or f"run_trial_{dataset}"
    return trial


def legacy_name(search: DatasetSearch) -> str:
    """An experiment started by an earlier version names its trainable LEGACY_NAME, and Tune restores it only under
    that name; that is safe while no other dataset's search runs in this driver."""
    from tune.study.pool import POOLS

    pool = POOLS.get(search.record.uri)
    others = [m for m in (pool.members() if pool else []) if m != search.dataset]
    if others:
        raise ValueError(f"dataset {search.dataset}: its Tune experiment was started by an earlier diffmic, whose "
                         f"trials all share the trainable name {LEGACY_NAME!r}, so it cannot resume beside "
                         f"{', '.join(others)}: resume one dataset at a time (datasets=[{search.dataset}])")
    return LEGACY_NAME


def local_study(search: DatasetSearch) -> None:
    """The study's SQLite file on this driver, before Tune starts or restores its searcher: the stored copy when this
    node has none (a new head after the old one was lost), nothing stale from an experiment whose results are gone."""
    if search.cfg["search"]["optuna_storage"]:
        return
    db, stored = search.optuna_db(), search.record.study_key(search.dataset)
    db.parent.mkdir(parents=True, exist_ok=True)
    if db.exists() and not search.storage.exists(search.rel):  # the results it belonged to are gone
        db.unlink()  # a fresh experiment under an old name starts a fresh study
    if not db.exists() and search.storage.exists(stored):
        search.storage.download_file(stored, db)


def optuna_searcher(search: DatasetSearch):
    import optuna

    from tune.study.pool import PooledLimiter
    from tune.study.searcher import DistinctSampler, NodeStudy, ResumableOptunaSearch

    s = search.cfg["search"]
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s["seed"]),
        "random": lambda: optuna.samplers.RandomSampler(seed=s["seed"]),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=s["seed"]),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=s["seed"]),
    }
    if s["optuna_storage"]:
        storage = optuna.storages.RDBStorage(s["optuna_storage"])
    else:
        storage = NodeStudy(search.study_rel)  # pickled by name: a new head opens its own copy
    searcher = ResumableOptunaSearch(sampler=DistinctSampler(samplers[s["sampler"]](), seed=s["seed"]),
                                     storage=storage, study_name=f"{search.experiment}-{search.dataset}",
                                     local_study=None if s["optuna_storage"] else search.study_rel,
                                     epochs=search.cfg["train"]["epochs"])
    # The search's pool (tune/study/pool.py) shares search.max_concurrent_trials among the datasets searched at once.
    return PooledLimiter(searcher, max_concurrent=max_concurrent(search.cfg), pool=search.record.uri,
                         member=search.dataset)


def max_concurrent(cfg: dict) -> int:
    """Trials at once (across all datasets of the search): the knob, else as many as the cluster's current CPUs/GPUs
    fit (Tune cannot count Train's workers itself under Train V2, ray-project/ray#54305)."""
    if cfg["search"]["max_concurrent_trials"]:
        return int(cfg["search"]["max_concurrent_trials"])
    scaling = cfg["scaling"]
    per_worker = dict(scaling["resources_per_worker"] or {})
    workers = max(1, scaling["num_workers"])
    total = ray.cluster_resources()
    fits = []
    for resource, amount in per_worker.items():
        if amount:
            fits.append(int(total.get(resource, 0) // (amount * workers)))
    if scaling["use_gpu"] and "GPU" not in per_worker:
        fits.append(int(total.get("GPU", 0) // workers))
    return max(1, min(fits) if fits else 1)


def progress_reporter(search: DatasetSearch):
    metric = search.cfg["search"]["metric"]
    columns = {metric: metric.replace("val_", "val "), "val_accuracy": "val acc", "val_dcg_macro_f1": "DCG f1",
               "val_gain_macro_f1": "gain f1", "train_loss": "loss", "epoch": "epoch"}
    return tune.CLIReporter(metric_columns=columns, parameter_columns={p.key: p.name for p in search.params},
                            max_report_frequency=30, sort_by_metric=True)


def run_search(search: DatasetSearch) -> tune.ResultGrid:
    """Start the dataset's experiment, or continue it from storage when it exists (finished trials stay done)."""
    fs = search.storage.ray_filesystem()
    root = open_storage(search.storage.join(search.experiment), check=False)
    path = root.fs_path if fs is not None else root.ray_storage_path
    exp_path = f"{path}/{search.dataset}"

    def trainable(name: str | None = None):
        return tune.with_resources(
            tune.with_parameters(trial_function(search.dataset, name), base_cfg=redact_config(search.cfg),
                                 checkpoints_uri=search.storage.join(search.checkpoints_rel)),  # the study's DB
            TRIAL_RESOURCES,                                                                    # URL stays here
        )

    local_study(search)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        verify_ray_state(search.storage, search.rel, search.record.state_key(search.dataset),  # checked in plan
                         trust=search.cfg["trust_ray_state"])  # too; again here, just before Ray reads them
        print(f"[search] {search.dataset}: resuming {search.storage.join(search.rel)}", flush=True)
        try:
            tuner = tune.Tuner.restore(exp_path, trainable(), resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs)
        except ValueError as e:
            if f"expected '{LEGACY_NAME}'" not in str(e):
                raise
            tuner = tune.Tuner.restore(exp_path, trainable(legacy_name(search)), resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=fs)
    else:
        tuner = new_tuner(search, trainable(), path, fs)
    try:
        return tuner.fit()
    finally:  # trials that ASHA stopped last leave staging directories no later worker on this node will sweep
        sweep_orphaned_scratch(wait_s=15)


def asha_grace(s: dict, t: dict) -> int:
    """search.grace_period, at most the trial's epochs (Ray's ASHA refuses a grace period beyond max_t; a run of fewer
    epochs cannot be stopped before its end anyway)."""
    return min(s["grace_period"], t["epochs"])


def new_tuner(search: DatasetSearch, trainable, path: str, fs) -> tune.Tuner:
    s, t = search.cfg["search"], search.cfg["train"]
    scheduler = None
    if s["scheduler"] == "asha":
        # Time is the epoch the run reports, not Tune's iteration count, which starts again at 1 when a trial is
        # restored (its Train run resumes at a later epoch).
        scheduler = ResumableASHA(time_attr="epoch", max_t=t["epochs"], grace_period=asha_grace(s, t),
                                  reduction_factor=s["reduction_factor"])
    searcher = optuna_searcher(search)
    state = SearchState(search.storage, search.rel, search.record.study_key(search.dataset),
                        search.record.state_key(search.dataset),
                        None if s["optuna_storage"] else search.study_rel, scheduler, searcher.searcher)
    return tune.Tuner(
        trainable,
        param_space=tune_space(search.params),
        tune_config=tune.TuneConfig(metric=s["metric"], mode=s["mode"], search_alg=searcher, scheduler=scheduler,
                                    num_samples=s["num_samples"], time_budget_s=s["time_budget_s"]),
        run_config=tune.RunConfig(name=search.dataset, storage_path=path, storage_filesystem=fs,
                                  progress_reporter=progress_reporter(search), verbose=1,
                                  callbacks=[state, Progress(search.record.uri, search.dataset),
                                             *tracking.callbacks(search)],
                                  # Ray Train already retries a trial's workers (scaling.max_failures); this only
                                  # restarts a trial whose driver actor was lost, so the two do not multiply.
                                  failure_config=tune.FailureConfig(max_failures=s["trial_max_failures"])),
    )
