"""Ray Train glue: run `diffmic.engine.train` as `train_loop_per_worker` of a `TorchTrainer`.

`RaySession` is the engine's session inside a Ray Train worker: DDP through `prepare_model`, distributed sampling
through `prepare_data_loader`, reports and checkpoints through `ray.train.report`, resume from
`ray.train.get_checkpoint()`. `fit(cfg)` is what `python -m diffmic.train scaling.num_workers=N` calls; the search
builds the same trainer per trial with `build_trainer`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from diffmic.checkpoint import METRICS_FILE, STATE_FILE, to_jsonable, write_checkpoint_files
from diffmic.compat import ensure_torchvision_importable
from diffmic.metrics import prefixed
from diffmic.remote import localize
from diffmic.secrets import SECRET_VARS
from diffmic.session import Session, write_result

# Where storage is, passed to the workers through Ray's runtime_env. Never the credentials: Ray logs runtime_env and
# serves it through its job and dashboard APIs. Workers get credentials where they run: a local Ray started here
# inherits this process's environment; a cluster's nodes have them in theirs (cluster/local.sh, the KubeRay secret)
# or from an instance role (cluster/aws.yaml).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE")
RESULT_FILE = "result.json"
SPLITS_FILE = "splits.csv"  # image, group, split, carve: the membership the run used (diffmic/data/build.py)
# Rank 0 stages each checkpoint here before `ray.train.report` persists it. A worker killed from outside (an ASHA stop,
# a lost node, a preempted trial) never reaches `finish()`, so its directory is swept by the next worker on that node.
SCRATCH_PREFIX = "diffmic-ckpt-"


def sweep_orphaned_scratch(wait_s: float = 0.0) -> None:
    """Delete staging directories whose worker process (the PID in the name) no longer exists.

    With `wait_s`, keep sweeping for up to that long while directories of live processes remain: at the end of a
    search the workers of the trials stopped last are still being torn down.
    """
    deadline = time.monotonic() + wait_s
    while True:
        alive = False
        for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
            pid = path.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
            if not pid.isdigit():
                continue
            if _alive(int(pid)):
                alive = True
            else:
                shutil.rmtree(path, ignore_errors=True)
        if not alive or time.monotonic() >= deadline:
            return
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RaySession(Session):
    def __init__(self, amp: bool = True):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        super().__init__(ray.train.torch.get_device(), amp)
        sweep_orphaned_scratch()
        self._scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        self._state_dir: Path | None = None  # the latest training state written or restored (rank 0)

    def prepare_model(self, model):
        # The pre-training phase leaves the denoiser unused, a frozen DCG leaves the DCG unused.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def prepare_loader(self, loader):
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def report(self, metrics: dict, state: dict | None) -> None:
        metrics = to_jsonable(metrics)
        if state is None:
            ray.train.report(metrics)
            return
        directory = None
        if self.rank == 0:  # one copy of the (replicated) state is enough
            directory = Path(tempfile.mkdtemp(dir=self._scratch))
            write_checkpoint_files(directory, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)
        if directory is not None:  # kept (the previous one dropped) for the final checkpoint, see finish()
            self._keep_state(directory)

    def _keep_state(self, directory: Path) -> None:
        if self._state_dir is not None and self._state_dir != directory:
            shutil.rmtree(self._state_dir, ignore_errors=True)
        self._state_dir = directory

    def latest_checkpoints(self) -> list[Path]:
        """The run's latest checkpoint and the one before it in storage: a damaged latest one (an upload cut short)
        is passed over with a warning (engine._resume_from)."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            return []
        found = [latest, *earlier_checkpoints(latest)[:1]]
        # each under its own name, which the engine's warnings then show (checkpoint_<time>, as in storage)
        return [Path(c.to_directory(str(self._scratch / "restored" / Path(c.path).name))) for c in found]

    def resumed_from(self, checkpoint: Path) -> None:
        self._keep_state(checkpoint)  # the state the final checkpoint carries over (_report_final)

    def finish(self, result, model, cfg: dict, class_names: list[str]) -> None:
        """With `train.test_at_end`, a final report whose checkpoint is the model bundle and its test metrics."""
        try:
            if cfg["train"]["test_at_end"]:
                self._report_final(result, model, cfg, class_names)
        finally:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _report_final(self, result, model, cfg: dict, class_names: list[str]) -> None:
        directory = None
        if self.rank == 0:
            directory = Path(tempfile.mkdtemp(dir=self._scratch))
            # This becomes the run's latest checkpoint: it carries the training state too, so that resuming a
            # finished run (resume=true, a retry, a restored trial) finds state.pt and has nothing left to train.
            for name in (STATE_FILE, METRICS_FILE):
                if self._state_dir is not None and (self._state_dir / name).is_file():
                    shutil.copyfile(self._state_dir / name, directory / name)
            write_result(directory, result, model, cfg, class_names, metrics_file=RESULT_FILE)
        row = to_jsonable({"epoch": result.best_epoch, "final": 1, **prefixed("val", result.val),
                           **prefixed("test", result.test)})
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


def earlier_checkpoints(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoints older than `latest`, newest first: Ray names them checkpoint_<time>, side by side
    in the run's directory."""
    import pyarrow.fs

    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, recursive=False))
    older = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem) for n in older]


def train_loop_per_worker(cfg: dict) -> None:
    ensure_torchvision_importable()  # a worker process starts here
    from diffmic.engine import train
    cpus = (cfg["scaling"]["resources_per_worker"] or {}).get("CPU")
    if cpus:  # one intra-op thread per reserved CPU: oversubscribed OpenMP threads slow every worker down
        torch.set_num_threads(max(1, int(cpus)))
    # The driver already verified every image; workers only read them.
    cfg = localize({**cfg, "dataset": {**cfg["dataset"], "verify_images": False}})
    train(cfg, RaySession(amp=cfg["train"]["amp"]))


def runtime_env() -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Train V2 gives up on a worker group after 60 s; an autoscaling cluster may need minutes to add a node.
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    return {"env_vars": env}


def keep_credentials_out_of_tune() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the session tokens from the driver's environment
    into the runtime_env of every trial actor (ray/tune/execution/class_cache.py), which Ray writes to
    runtime_env_agent.log and serves through its APIs. Trials get credentials where they run instead (FORWARDED_ENV's
    note), so the copy is dropped; test_job_submit_search_into_s3 scans Ray's files for the secret."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(SECRET_VARS)


def serialize_tune_registry() -> None:
    """Tune's registry of trainables (one per process) is not thread-safe: two datasets' Tuners starting at once in
    this driver's threads failed with "dictionary changed size during iteration" in its flush. Its writes are made
    one at a time."""
    import threading

    from ray.tune import registry

    reg = registry._global_registry
    if getattr(reg, "_diffmic_lock", None) is not None:
        return
    lock = threading.RLock()
    register, flush = reg.register, reg.flush_values

    def locked(fn):
        def call(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)
        return call

    reg.register, reg.flush_values, reg._diffmic_lock = locked(register), locked(flush), lock
    # Ray calls flush_values after ray.init through this hook list; the hook must take the lock too.
    ray._private.worker._post_init_hooks[:] = [reg.flush_values if getattr(h, "__self__", None) is reg else h
                                               for h in ray._private.worker._post_init_hooks]


def init_ray(cfg: dict) -> None:
    """Join the cluster at RAY_ADDRESS (or the one this process runs in), else start a local one."""
    keep_credentials_out_of_tune()
    serialize_tune_registry()
    if ray.is_initialized():
        return
    # Train V2's placement-group cleaner (a worker) finds the cluster's State API through RAY_API_SERVER_ADDRESS /
    # RAY_ADDRESS, else by scanning this machine for Ray processes, which fails when another Ray instance runs here
    # ("Found multiple active Ray instances"): the finished trial's CPUs are then never returned and the next trial
    # waits forever. So the workers are told which cluster is theirs.
    env = runtime_env()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if "://" not in address and address not in ("auto", "local"):  # a GCS host:port (as `ray job` sets it)
            env["env_vars"].setdefault("RAY_ADDRESS", address)
        # Under `ray job submit --runtime-env-json '{"env_vars": …}'` ray.init refuses to set a variable the job's
        # runtime env already sets (same values: this process got them from it), so those are left to the job.
        job_env = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {})
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in (job_env.get("env_vars") or {})}
        ray.init(runtime_env=env, log_to_driver=True)
    else:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, runtime_env=env)


def build_trainer(cfg: dict, storage, name: str, callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    scaling, t = cfg["scaling"], cfg["train"]
    fs = storage.ray_filesystem()
    path = storage.fs_path if fs is not None else storage.ray_storage_path
    score = f"val_{t['select_metric']}"  # the engine's selection rule scores the checkpoints Ray keeps
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=max(1, scaling["num_workers"]), use_gpu=scaling["use_gpu"],
                                               resources_per_worker=dict(scaling["resources_per_worker"] or {})),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs, callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t["num_to_keep"],
                                                         checkpoint_score_attribute=score,
                                                         checkpoint_score_order=t["select_mode"]),
            failure_config=ray.train.FailureConfig(max_failures=scaling["max_failures"]),
        ),
    )


def write_splits(storage, name: str, membership: list[dict]) -> None:
    """<name>/splits.csv beside a run: the membership (image, group, split, carve) its workers build from its seed."""
    if membership:
        import pandas as pd
        storage.write_text(f"{name}/{SPLITS_FILE}", pd.DataFrame(membership).to_csv(index=False))


def fit(cfg: dict) -> dict:
    """`diffmic.train` through Ray Train: checks storage first, then trains; results land in storage."""
    from tune.storage import open_storage

    storage = open_storage(cfg["storage"]["uri"], create_bucket=cfg["storage"]["create_bucket"])
    name = cfg["experiment"]  # a plain name (validate_config): the run stays under the storage root
    exists = bool(storage.list(name))
    if exists and not cfg["resume"]:
        raise ValueError(f"experiment={name!r} already exists under {storage.uri}: pass resume=true to continue it "
                         f"or choose another experiment name (nothing was overwritten)")
    if cfg["resume"] and not exists:
        raise ValueError(f"resume=true: there is no experiment {name!r} under {storage.uri} to resume; without "
                         "resume=true a new run starts")
    from diffmic.config import split_seed
    from diffmic.data import build_splits
    from diffmic.weights import check_pretrained
    local = localize(cfg)
    check_pretrained(local["model"])  # here, before Ray: every worker must be able to get them too
    # The data is read here once, before any cluster work (a bad root is one line now, not a failed worker), and
    # the split every worker builds from the same seed is written beside the run, as a local run writes it.
    membership = build_splits(local["dataset"], seed=split_seed(cfg)).membership
    init_ray(cfg)
    write_splits(storage, name, membership)
    result = build_trainer(cfg, storage, name).fit()
    if result.error:
        raise result.error
    summary = {"experiment": name, "storage": storage.join(name), "metrics": to_jsonable(result.metrics),
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    storage.write_text(f"{name}/{RESULT_FILE}", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary
