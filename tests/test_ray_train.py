"""Ray Train end to end against a real S3 server (SeaweedFS on loopback, see conftest.py).

- a 2-worker `python -m diffmic.train` run whose checkpoints and result land in the bucket (listed with boto3), with the
  bucket created on request (`storage.create_bucket=true`) and the secret key never in the output;
- validation metrics over the whole split across workers (a unit check of `diffmic.engine.evaluate` with 2 fake ranks);
- kill -9 after the first S3 checkpoint, then `resume=true`: the run ends like an uninterrupted one; without
  `resume=true` the rerun is refused and nothing in the bucket changes; resuming the finished run retrains nothing;
- a 2-raylet cluster (`ray.cluster_utils.Cluster`), joined through RAY_ADDRESS, with one worker per node;
- bad storage input (missing bucket, wrong secret, unreachable endpoint): exit code 2 and one line before training.

Every run is tiny (32 px synthetic images, timm's `test_resnet` backbones so that a checkpoint is ~20 MB, not ~600 MB)
and runs in its own process session, which is swept with SIGKILL afterwards so that no Ray process outlives its test.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffmic.session import Session
from helpers import TINY, compose

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
S3 = ["storage=s3"]
ERROR_PREFIX = "diffmic.train: error:"


# ----------------------------------------------------------------------------------------------------- helpers
@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.text.splitlines()[-n:])


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("RAY_ADDRESS", "DIFFMIC_DEBUG", "HYDRA_FULL_ERROR"):  # a local Ray; one-line errors
        env.pop(var, None)
    env.update(extra)
    return env


def _session_pids(sid: int) -> list[int]:
    """Processes of the session `sid` (the driver's own session: its Ray head processes and workers too)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(proc.name))
    return pids


def _sweep(sid: int, timeout: float = 60.0) -> None:
    """SIGKILL every process left in the session `sid` (started by this test), by pid, until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := _session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


class Training:
    """`python -m diffmic.train OVERRIDES` in its own session, output in files under tmp_path."""

    def __init__(self, tmp_path: Path, tag: str, overrides: list[str], env: dict[str, str] | None = None):
        self.out_path, self.err_path = tmp_path / f"{tag}.out", tmp_path / f"{tag}.err"
        self.start = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "diffmic.train", *overrides], cwd=ROOT,
                                         env=env or _env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def result(self, rc: int) -> Run:
        return Run(rc, self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"),
                   time.monotonic() - self.start)

    def wait(self, timeout: float) -> Run:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"diffmic.train did not finish within {timeout:.0f} s:\n{self.result(-9).tail()}")
        finally:
            _sweep(self.proc.pid)
        return self.result(rc)

    def kill(self) -> None:
        """kill -9 the driver's whole session: driver, its local Ray (GCS, raylet, dashboard) and the workers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        _sweep(self.proc.pid)


def train(tmp_path: Path, tag: str, overrides: list[str], env: dict[str, str] | None = None,
          timeout: float = 900) -> Run:
    return Training(tmp_path, tag, overrides, env).wait(timeout)


def objects(server, bucket: str, prefix: str = "") -> dict[str, tuple[int, str]]:
    """key -> (size, ETag) of every object under prefix, with boto3 (paginated)."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", [])}


def read_json(server, bucket: str, key: str) -> dict:
    return json.loads(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def load_state(server, bucket: str, key: str, tmp_path: Path) -> dict:
    local = tmp_path / f"state-{uuid.uuid4().hex[:8]}.pt"
    server.client().download_file(bucket, key, str(local))
    return torch.load(local, map_location="cpu", weights_only=True)


def checkpoints(keys, run_prefix: str) -> dict[str, set[str]]:
    """checkpoint directory name -> files in it (relative), for the checkpoints of the run under run_prefix/."""
    found: dict[str, set[str]] = {}
    for key in keys:
        rel = key[len(run_prefix) + 1:] if key.startswith(run_prefix + "/") else ""
        head, _, rest = rel.partition("/")
        if head.startswith("checkpoint_") and rest and not rest.endswith("/"):
            found.setdefault(head, set()).add(rest)
    return found


def assert_one_line_error(run: Run, secret: str, *needles: str) -> str:
    assert run.rc == 2, f"exit code {run.rc}, expected 2:\n{run.tail()}"
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), f"expected one `{ERROR_PREFIX}` line:\n{run.err}"
    assert "Traceback" not in run.text, run.text
    assert secret not in run.text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_checkpoint_staging_of_dead_workers_is_swept(tmp_path, monkeypatch):
    """A killed worker's staging directory goes; a live worker's stays."""
    import tempfile

    from tune.train.distributed import SCRATCH_PREFIX, sweep_orphaned_scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{SCRATCH_PREFIX}{dead.pid}-abc" / "x").mkdir(parents=True)
    (tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def").mkdir()
    (tmp_path / f"{SCRATCH_PREFIX}notapid").mkdir()  # not ours to judge
    sweep_orphaned_scratch()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{SCRATCH_PREFIX}{os.getpid()}-def",
                                                          f"{SCRATCH_PREFIX}notapid"]


# ------------------------------------------------------------------------------ 1. two workers, all in S3
@pytest.mark.timeout(1200)
@pytest.mark.integration
@pytest.mark.slow
def test_two_worker_run_creates_its_bucket_and_lands_in_s3(s3_server, tmp_path):
    bucket = f"t-{uuid.uuid4().hex[:16]}"  # does not exist yet: storage.create_bucket=true makes it
    run = train(tmp_path, "two", [*TINY, "train.epochs=2", "scaling.num_workers=2", *S3,
                                  f"storage.uri=s3://{bucket}/rt", "storage.create_bucket=true", "experiment=two"])
    assert run.rc == 0, run.tail()
    assert s3_server.secret_key not in run.text, "the S3 secret key appears in the run's output"
    assert "world_size=2" in run.text  # Ray Train set up a 2-rank process group

    keys = objects(s3_server, bucket, "rt/")
    ckpts = checkpoints(keys, "rt/two")
    *epoch_ckpts, final = sorted(ckpts)  # checkpoint_<timestamp>: in report order; num_to_keep=2
    assert epoch_ckpts and all({"state.pt", "metrics.json"} <= ckpts[n] for n in epoch_ckpts), ckpts
    assert read_json(s3_server, bucket, f"rt/two/{epoch_ckpts[0]}/metrics.json")["epoch"] in (1, 2)

    # The final checkpoint: the model bundle with its val/test metrics, and the training state of the last epoch
    # (so that resuming the finished run finds it).
    assert {"result.json", "model/model.safetensors", "model/manifest.json", "state.pt"} <= ckpts[final]
    state = load_state(s3_server, bucket, f"rt/two/{final}/state.pt", tmp_path)
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]
    assert {"model", "ema", "optimizers", "rng", "config", "best"} <= set(state)
    # Validation covered the whole val split although each of the 2 workers evaluated half of it (the confusion
    # matrix counts every example once).
    metrics = read_json(s3_server, bucket, f"rt/two/{final}/result.json")
    num_val = len(_splits().val)
    assert np.asarray(metrics["val"]["confusion_matrix"]).sum() == num_val
    assert np.asarray(metrics["test"]["confusion_matrix"]).sum() == len(_splits().test)

    summary = read_json(s3_server, bucket, "rt/two/result.json")  # the driver's summary
    assert summary["experiment"] == "two" and summary["storage"] == f"s3://{bucket}/rt/two"
    assert summary["metrics"]["final"] == 1 and 0 <= summary["metrics"]["test_accuracy"] <= 1
    assert summary["checkpoint"].endswith(final)
    assert "rt/two/checkpoint_manager_snapshot.json" in keys
    # the split the workers used, one row per image (issue 22: a reader can check it)
    body = s3_server.client().get_object(Bucket=bucket, Key="rt/two/splits.csv")["Body"].read().decode()
    rows = [line.split(",") for line in body.splitlines()[1:]]
    data = _splits()
    assert sorted(r[2] for r in rows) == sorted(["train"] * len(data.train) + ["val"] * len(data.val)
                                                 + ["test"] * len(data.test))


def _splits():
    from diffmic.data import build_splits
    cfg = compose(TINY)
    return build_splits(cfg["dataset"], seed=cfg["dataset"].get("split_seed", cfg["seed"]))


# ------------------------------------------------------------------ 2. validation over the whole split
class _Deterministic(torch.nn.Module):
    """Per-example predictions that do not depend on batch or sampling noise: sharding cannot change them."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))

    def predict(self, x, sampler, steps, eta=0.0, num_samples=1, generator=None, temperature=1.0):
        logits = x.mean(dim=(2, 3)) @ self.weight * 4
        return SimpleNamespace(samples=logits.unsqueeze(0), dcg_probs=(-logits).softmax(-1))


class _Rank(Session):
    """Rank `rank` of `world_size`; all_gather returns every rank's shard once all ranks have contributed."""

    def __init__(self, rank: int, world_size: int, shards: dict):
        super().__init__("cpu", amp=False)
        self.rank, self.world_size, self.shards = rank, world_size, shards

    def all_gather(self, obj):
        self.shards[self.rank] = obj
        if len(self.shards) < self.world_size:
            return [obj]  # first pass of an earlier rank: its own metrics are not looked at
        return [self.shards[r] for r in range(self.world_size)]


def _evaluate_sharded(model, dataset, cfg, world_size: int) -> list[dict]:
    """Every rank's metrics after evaluate() over its shard and the gather (ranks run one after the other)."""
    from diffmic.engine import evaluate
    shards: dict = {}
    for rank in range(1, world_size):  # fill the other ranks' shards first
        evaluate(model, dataset, cfg, _Rank(rank, world_size, shards), generator_seed=7)
    return [evaluate(model, dataset, cfg, _Rank(rank, world_size, shards), generator_seed=7)
            for rank in range(world_size)]


def test_validation_metrics_cover_the_whole_split_across_ranks(monkeypatch):
    import diffmic.engine as engine
    from diffmic.metrics import classification_metrics
    from diffmic.models import build_model

    cfg = compose(TINY)
    data = _splits()
    val = torch.utils.data.ConcatDataset([data.val, torch.utils.data.Subset(data.val, range(5))])  # odd length

    # A model whose predictions do not depend on the sampling noise: identical metrics for any number of ranks.
    model = _Deterministic().eval()
    (single,) = _evaluate_sharded(model, val, cfg, 1)
    for world in (2, 3):
        for metrics in _evaluate_sharded(model, val, cfg, world):  # every rank gets the same, whole-split metrics
            assert metrics == single
    assert np.asarray(single["confusion_matrix"]).sum() == len(val)

    # The real model: every example once, in split order, the same labels and (noise-free) DCG outputs.
    seen = []

    def recording(labels, probs, dcg, ordinal=False):
        seen.append((labels, probs, dcg))
        return classification_metrics(labels, probs, dcg, ordinal=ordinal)
    monkeypatch.setattr(engine, "classification_metrics", recording)
    real = build_model(cfg, data.num_classes, cfg["dataset"]["image_size"]).eval()
    (one,) = _evaluate_sharded(real, val, cfg, 1)
    labels1, probs1, dcg1 = seen[-1]
    two = _evaluate_sharded(real, val, cfg, 2)
    labels2, probs2, dcg2 = seen[-1]
    expected = np.asarray([val[i][1] for i in range(len(val))])
    np.testing.assert_array_equal(labels1, expected)
    np.testing.assert_array_equal(labels2, expected)
    assert probs2.shape == probs1.shape == (len(val), data.num_classes)
    np.testing.assert_allclose(dcg2, dcg1, atol=1e-5)
    assert two[0] == two[1] and two[0]["dcg_accuracy"] == one["dcg_accuracy"]
    assert np.asarray(two[0]["confusion_matrix"]).sum() == len(val)


# ------------------------------------------------------------------------------ 3. kill and resume
def _wait_for_first_checkpoint(server, bucket: str, run_prefix: str, training: Training, timeout: float) -> None:
    """Until Ray has recorded a checkpoint of the run in S3 (its checkpoint manager's snapshot lists one)."""
    deadline, key = time.monotonic() + timeout, f"{run_prefix}/checkpoint_manager_snapshot.json"
    while time.monotonic() < deadline:
        if training.proc.poll() is not None:
            run = training.result(training.proc.returncode)
            _sweep(training.proc.pid)
            pytest.fail(f"the run ended (code {run.rc}) before it was killed:\n{run.tail()}")
        if key in objects(server, bucket, run_prefix + "/"):
            try:
                if read_json(server, bucket, key).get("checkpoint_results"):
                    return
            except ValueError:  # being written
                pass
        time.sleep(0.25)
    training.kill()
    pytest.fail(f"no checkpoint in s3://{bucket}/{run_prefix} within {timeout:.0f} s:\n"
                f"{training.result(-9).tail()}")


@pytest.mark.timeout(1500)
@pytest.mark.integration
@pytest.mark.slow
def test_kill_and_resume_from_an_s3_checkpoint(s3_server, s3_bucket, tmp_path):
    from diffmic.engine import train as train_in_process
    from diffmic.session import LocalSession

    # Epochs long enough (~5x TINY's training split) that the kill lands between the first and the last one.
    cfg_args = [*TINY, "dataset.num_train=480", "train.epochs=3", "scaling.num_workers=1", *S3,
                f"storage.uri=s3://{s3_bucket}/rs", "experiment=kr"]
    secret, prefix = s3_server.secret_key, "rs/kr"

    first = Training(tmp_path, "first", cfg_args)
    _wait_for_first_checkpoint(s3_server, s3_bucket, prefix, first, timeout=600)
    first.kill()
    killed = first.result(-9)
    assert secret not in killed.text
    before = objects(s3_server, s3_bucket)
    at_kill = checkpoints(before, prefix)
    assert at_kill and all("model/manifest.json" not in files for files in at_kill.values()), at_kill
    assert f"{prefix}/result.json" not in before  # the killed driver never wrote its summary
    snapshot = read_json(s3_server, s3_bucket, f"{prefix}/checkpoint_manager_snapshot.json")
    latest_at_kill = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]  # what a resume starts from
    killed_state = load_state(s3_server, s3_bucket, f"{prefix}/{latest_at_kill}/state.pt", tmp_path)
    start = killed_state["epoch"]
    assert 1 <= start < 3, f"the run was not interrupted (checkpoint of epoch {start})"

    # The same experiment without resume=true: refused, one line, and nothing in the bucket changes.
    refused = train(tmp_path, "refused", cfg_args, timeout=300)
    line = assert_one_line_error(refused, secret, "experiment='kr' already exists", "resume=true")
    assert "nothing was overwritten" in line
    assert objects(s3_server, s3_bucket) == before

    resumed = train(tmp_path, "resumed", [*cfg_args, "resume=true"])
    assert resumed.rc == 0, resumed.tail()
    assert secret not in resumed.text
    assert "resumed from" in resumed.text and f"at epoch {start}" in resumed.text, resumed.tail()
    assert f"epoch {start}/3" not in resumed.text  # the checkpointed epochs were not trained again
    assert "epoch 3/3" in resumed.text

    ckpts = checkpoints(objects(s3_server, s3_bucket), prefix)
    latest = max(ckpts)  # the final checkpoint: bundle and training state
    assert {"state.pt", "model/manifest.json"} <= ckpts[latest]
    state = load_state(s3_server, s3_bucket, f"{prefix}/{latest}/state.pt", tmp_path)
    history = state["history"]
    assert state["epoch"] == 3
    assert history[:start] == killed_state["history"]  # the epochs before the kill were carried over, not redone
    summary = read_json(s3_server, s3_bucket, f"{prefix}/result.json")
    assert summary["metrics"]["final"] == 1 and summary["checkpoint"].endswith(latest)

    # An uninterrupted run of the same configuration (the same training loop, in this process) for comparison.
    cfg = compose([*TINY, "dataset.num_train=480", "train.epochs=3"])
    full = train_in_process(cfg, LocalSession(tmp_path / "uninterrupted", amp=False))
    assert [r["epoch"] for r in history] == [r["epoch"] for r in full.history] == [1, 2, 3]
    # Within noise (loose: a different data order after the restart, few examples): the final training loss within
    # a third of the first epoch's loss, the validation accuracy within 0.35.
    assert abs(history[-1]["train_loss"] - full.history[-1]["train_loss"]) < full.history[0]["train_loss"] / 3
    assert abs(history[-1]["val_accuracy"] - full.history[-1]["val_accuracy"]) <= 0.35

    # Resuming the finished run: nothing left to train, the result is reported again, no epoch is added.
    again = train(tmp_path, "again", [*cfg_args, "resume=true"])
    assert again.rc == 0, again.tail()
    assert "at epoch 3" in again.text and "epoch 3/3" not in again.text
    ckpts = checkpoints(objects(s3_server, s3_bucket), prefix)
    state = load_state(s3_server, s3_bucket, f"{prefix}/{max(ckpts)}/state.pt", tmp_path)
    assert max(ckpts) > latest and state["epoch"] == 3 and state["history"] == history


@pytest.mark.timeout(1200)
@pytest.mark.integration
@pytest.mark.slow
def test_a_damaged_latest_s3_checkpoint_falls_back_to_the_one_before(s3_server, s3_bucket, tmp_path):
    """The latest checkpoint in S3 cut short (an upload that died): resume warns once and continues from the
    checkpoint before it, never crashes nor starts again from scratch."""
    cfg_args = [*TINY, "train.epochs=2", "scaling.num_workers=1", *S3, f"storage.uri=s3://{s3_bucket}/dc",
                "experiment=dc"]
    prefix, client = "dc/dc", s3_server.client()
    first = train(tmp_path, "first", cfg_args)
    assert first.rc == 0, first.tail()
    ckpts = checkpoints(objects(s3_server, s3_bucket), prefix)
    assert len(ckpts) >= 2, ckpts
    latest, before = sorted(ckpts)[-1], sorted(ckpts)[-2]
    kept = load_state(s3_server, s3_bucket, f"{prefix}/{before}/state.pt", tmp_path)
    key = f"{prefix}/{latest}/state.pt"
    body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_bucket, Key=key, Body=body[: len(body) // 2])

    resumed = train(tmp_path, "resumed", [*cfg_args, "resume=true"])
    assert resumed.rc == 0, resumed.tail()
    # (Ray echoes a worker's lines on the driver's stdout and stderr alike: one warning is one distinct line)
    warnings = {line for line in resumed.text.splitlines() if "resuming from the checkpoint before it" in line}
    assert len(warnings) == 1 and f"{latest}/state.pt" in warnings.pop(), resumed.tail()
    assert f"at epoch {kept['epoch']}" in resumed.text and "at epoch 0" not in resumed.text, resumed.tail()
    newest = max(checkpoints(objects(s3_server, s3_bucket), prefix))
    assert newest > latest  # a new final checkpoint, whose training state is the one resumed from, intact
    state = load_state(s3_server, s3_bucket, f"{prefix}/{newest}/state.pt", tmp_path)
    assert state["epoch"] == 2 and state["history"][: kept["epoch"]] == kept["history"]


# ------------------------------------------------------------------------------ 4. two raylets
@pytest.mark.timeout(1200)
@pytest.mark.integration
@pytest.mark.slow
def test_multi_node_run_puts_one_worker_on_each_raylet(s3_server, s3_bucket, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    # Two raylets on this machine; the custom resource `node_slot` (one per node, one per worker) forces the two
    # workers onto different nodes.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_slot": 1}, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, resources={"node_slot": 1})
        cluster.wait_for_nodes()
        # The CLI joins the running cluster through RAY_ADDRESS instead of starting its own.
        run = train(tmp_path, "multi", [*TINY, "scaling.num_workers=2", "+scaling.resources_per_worker.node_slot=1",
                                        *S3, f"storage.uri=s3://{s3_bucket}/mn", "experiment=mn"],
                    env=_env(RAY_ADDRESS=cluster.address))
        assert run.rc == 0, run.tail()
        assert "Started a local Ray instance" not in run.text  # it joined ours
        assert s3_server.secret_key not in run.text

        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")],
                              detail=True, raise_on_missing_output=False)
        assert len(workers) == 2, workers
        assert {w.node_id for w in workers} == nodes, "the two Train workers did not run on different raylets"
    finally:
        ray.shutdown()
        cluster.shutdown()
    keys = objects(s3_server, s3_bucket, "mn/")
    assert any(k.endswith("/state.pt") for k in keys) and "mn/mn/result.json" in keys


# ------------------------------------------------------------------------------ 5. bad storage input
def _closed_port() -> socket.socket:
    """A loopback port that is bound but never listens (connections are refused); close it when done."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


@pytest.mark.timeout(600)
@pytest.mark.integration
@pytest.mark.parametrize("case", ["bucket_missing", "wrong_secret", "endpoint_unreachable"])
def test_bad_storage_input_is_one_line_before_training(case, s3_server, s3_bucket, tmp_path):
    bucket, env, closed = s3_bucket, _env(), None
    if case == "bucket_missing":
        bucket = f"t-missing-{uuid.uuid4().hex[:8]}"
        needles = (f"bucket {bucket!r} does not exist", "storage.create_bucket=true")
    elif case == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-" + uuid.uuid4().hex
        needles = ("access denied", "AWS_SECRET_ACCESS_KEY")
    else:
        closed = _closed_port()
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{closed.getsockname()[1]}"
        needles = ("cannot reach S3 endpoint", env["AWS_ENDPOINT_URL"])
    before = objects(s3_server, s3_bucket)
    try:
        run = train(tmp_path, case, [*TINY, "scaling.num_workers=1", *S3, f"storage.uri=s3://{bucket}/bad",
                                     "experiment=bad"], env=env, timeout=300)
    finally:
        if closed is not None:
            closed.close()
    assert_one_line_error(run, s3_server.secret_key, *needles)
    assert env["AWS_SECRET_ACCESS_KEY"] not in run.text
    assert "Started a local Ray instance" not in run.text  # refused before any cluster work
    assert objects(s3_server, s3_bucket) == before
    if case == "bucket_missing":
        assert bucket not in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}


def test_unreachable_endpoint_fails_in_seconds(monkeypatch):
    from tune.storage import StorageError, open_storage

    with _closed_port() as closed:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-" + uuid.uuid4().hex)
        start = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach S3 endpoint") as e:
            open_storage("s3://some-bucket/prefix")
        assert time.monotonic() - start < 15
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(e.value)
