"""tune.storage against a local directory and a real S3 server (SeaweedFS, see conftest.s3_server)."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tune.storage import local as local_backend
from tune.storage import s3 as s3_backend
from tune.storage import Storage, StorageError, materialize, open_storage, redact

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def count_calls(operation: str):
    """Count S3 API calls of one kind made through the module's cached transfer client."""
    calls: list[str] = []
    events = s3_backend._client().meta.events
    events.register(f"before-call.s3.{operation}", lambda **kw: calls.append(operation), unique_id="count")
    try:
        yield calls
    finally:
        events.unregister(f"before-call.s3.{operation}", unique_id="count")


def assert_clean(err: Exception, *must_contain: str) -> str:
    """A StorageError message: one line, naming what it must, with no secret or full access key inside."""
    msg = str(err)
    assert "\n" not in msg, msg
    for s in must_contain:
        assert s in msg, f"{s!r} not in {msg!r}"
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            assert value not in msg, f"{var}'s value leaked: {msg!r}"
    return msg


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 4, "sub/deep/c.json": b'{"c": 1}',
             "sub/empty.dat": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def roundtrip(st: Storage, tmp_path: Path) -> None:
    """The same behaviour on every backend."""
    assert not st.exists("exp/x.txt")
    st.write_text("exp/x.txt", "héllo")
    st.write_bytes("exp/trial_1/ckpt.bin", b"\x00\x01" * 100)
    st.write_bytes("other.bin", b"o")
    assert st.read_text("exp/x.txt") == "héllo"
    assert st.read_bytes("exp/trial_1/ckpt.bin") == b"\x00\x01" * 100
    assert st.exists("exp/x.txt") and st.exists("exp") and st.exists("exp/trial_1") and not st.exists("ex")
    assert st.list() == ["exp/trial_1/ckpt.bin", "exp/x.txt", "other.bin"]
    assert st.list("exp/trial_1") == ["exp/trial_1/ckpt.bin"]
    assert st.list("ex") == [] and st.list("nothing/here") == []
    st.write_text("exp/x.txt", "v2")  # overwrite
    assert st.read_text("exp/x.txt") == "v2"
    with pytest.raises(FileNotFoundError):
        st.read_bytes("exp/missing")
    assert st.join("exp", "x.txt") == st.uri + "/exp/x.txt" and st.join() == st.uri

    files = make_tree(tmp_path / "src")
    keys = st.upload_dir(tmp_path / "src", "best/ds1")
    assert keys == sorted(f"best/ds1/{k}" for k in files)
    assert st.list("best") == keys
    out = st.download_dir("best/ds1", tmp_path / "dst")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert st.download_file("best/ds1/sub/b.bin", tmp_path / "one" / "b.bin").read_bytes() == files["sub/b.bin"]
    with pytest.raises(FileNotFoundError):
        st.download_dir("best/nothing", tmp_path / "none")
    with pytest.raises(FileNotFoundError):
        st.download_file("best/nothing.bin", tmp_path / "none.bin")


# ---------------------------------------------------------------- local, no server
def test_local_roundtrip(tmp_path):
    st = open_storage("runs/r1", base_dir=tmp_path)
    assert st.uri == str((tmp_path / "runs/r1").resolve()) and not st.is_s3 and Path(st.uri).is_dir()
    assert st.ray_storage_path == st.uri and st.ray_filesystem() is None
    roundtrip(st, tmp_path)
    assert not [p for p in Path(st.uri).rglob("*") if local_backend.TMP_MARK in p.name]  # atomic writes leave no tmp


def test_local_uri_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_storage("rel/").uri == str(tmp_path.resolve() / "rel")
    assert open_storage(f"file://{tmp_path}/f").uri == str(tmp_path.resolve() / "f")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="afile"):
        open_storage(str(tmp_path / "afile" / "sub"))


@pytest.mark.parametrize("uri", ["s3://", "s3:///x", "s3://ab/x", "s3://Bad_Bucket", "s3://bucket/a/../b",
                                 "s3://bucket/p?allow_bucket_creation=true", "gs://bucket/x", ""])
def test_malformed_uri(uri):
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        open_storage(uri)
    assert_clean(e.value, "expected")
    assert time.monotonic() - t0 < 1  # refused before any network call


def test_uri_normalised():
    assert open_storage("s3://bucket//a/./b/", check=False).uri == "s3://bucket/a/b"
    st = open_storage("S3://bucket/", check=False)
    assert st.uri == "s3://bucket" and st.fs_path == "bucket" and st.join("x", "y/") == "s3://bucket/x/y"
    assert pickle.loads(pickle.dumps(st)) == st


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok3n-abcdef")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    text = redact("k=AKIAIOSFODNN7EXAMPLE s=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY t=tok3n-abcdef end")
    assert text == "k=*** s=*** t=*** end"
    assert str(StorageError("bad\nsecret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")) == "bad secret ***"


def test_materialize_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert materialize("data/x", tmp_path / "cache") == tmp_path.resolve() / "data/x"
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- real S3 server
@pytest.mark.integration
@pytest.mark.parametrize("prefix", ["", "team/exp-1"])
def test_s3_roundtrip(s3_server, s3_bucket, prefix, tmp_path):
    uri = f"s3://{s3_bucket}/{prefix}".rstrip("/")
    st = open_storage(uri + "/")
    assert st.uri == uri and st.is_s3 and st.ray_storage_path == uri
    roundtrip(st, tmp_path)
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert f"{prefix}/exp/x.txt".lstrip("/") in keys
    assert not [k for k in keys if ".storage-probe-" in k]  # the write probe was removed


@pytest.mark.integration
def test_s3_list_paginates(s3_server, s3_bucket, monkeypatch):
    st = open_storage(f"s3://{s3_bucket}/p")
    client = s3_server.client()
    names = [f"many/{i:05d}" for i in range(1100)]  # more than one 1000-key page, as S3 itself caps it
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda k: client.put_object(Bucket=s3_bucket, Key=f"p/{k}", Body=b"x"), names))
    client.put_object(Bucket=s3_bucket, Key="p/many/dirmarker/", Body=b"")  # a "folder" object: not a file
    with count_calls("ListObjectsV2") as calls:
        assert st.list("many") == names
    assert len(calls) == 2
    monkeypatch.setattr(s3_backend, "LIST_PAGE_SIZE", 97)
    with count_calls("ListObjectsV2") as calls:
        assert st.list() == names
    assert len(calls) == 12


@pytest.mark.integration
def test_ray_filesystem_reads_and_writes(s3_server, s3_bucket):
    """What Ray gets: RunConfig(storage_filesystem=st.ray_filesystem(), storage_path=st.fs_path)."""
    st = open_storage(f"s3://{s3_bucket}/ray-root")
    fs = st.ray_filesystem()
    with fs.open_output_stream(f"{st.fs_path}/exp/trial/result.json") as f:
        f.write(b'{"acc": 0.9}')
    assert st.read_bytes("exp/trial/result.json") == b'{"acc": 0.9}'
    st.write_bytes("exp/from_boto.txt", b"boto")
    shipped = pickle.dumps(fs)  # Ray pickles it to every worker: no secret may travel with it
    assert s3_server.secret_key.encode() not in shipped and s3_server.access_key.encode() not in shipped
    assert pickle.loads(shipped).open_input_stream(f"{st.fs_path}/exp/from_boto.txt").read() == b"boto"


@pytest.mark.integration
def test_unreachable_endpoint_fails_fast(s3_server, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        open_storage("s3://some-bucket/x")
    elapsed = time.monotonic() - t0
    assert_clean(e.value, f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL", "cannot reach")
    assert elapsed < 10, elapsed


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["secret", "key_id"])
def test_wrong_credentials(s3_server, s3_bucket, monkeypatch, bad):
    if bad == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret_key[::-1])
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody" + s3_server.access_key[::-1])
    with pytest.raises(StorageError) as e:
        open_storage(f"s3://{s3_bucket}/p")
    msg = assert_clean(e.value, s3_bucket, "AWS_ACCESS_KEY_ID", "access denied", s3_server.endpoint)
    assert s3_server.secret_key not in msg and os.environ["AWS_ACCESS_KEY_ID"] not in msg


@pytest.mark.integration
def test_no_credentials(s3_server, s3_bucket, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as e:
        open_storage(f"s3://{s3_bucket}/p")
    assert_clean(e.value, s3_bucket, "no AWS credentials", "AWS_ACCESS_KEY_ID")


@pytest.mark.integration
def test_missing_bucket(s3_server):
    name = f"missing-{os.getpid()}-{time.monotonic_ns()}"
    with pytest.raises(StorageError) as e:
        open_storage(f"s3://{name}/runs")
    assert_clean(e.value, name, "does not exist", "storage.create_bucket=true")
    st = open_storage(f"s3://{name}/runs", create_bucket=True)
    s3_server.client().head_bucket(Bucket=name)
    st.write_text("a", "1")
    assert open_storage(f"s3://{name}/runs", create_bucket=True).read_text("a") == "1"  # idempotent


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.integration
def test_materialize_once_then_incremental(s3_server, s3_bucket, tmp_path):
    files = make_tree(tmp_path / "ds")
    data = open_storage(f"s3://{s3_bucket}/datasets")
    data.upload_dir(tmp_path / "ds", "toy")
    cache = tmp_path / "cache"
    with count_calls("GetObject") as gets:
        local = materialize(f"s3://{s3_bucket}/datasets/toy/", cache)
    assert local.parent == cache.resolve() and len(gets) == len(files)
    first = _snapshot(local)
    assert {k: v[2] for k, v in first.items()} == files
    with count_calls("GetObject") as gets:
        assert materialize(f"s3://{s3_bucket}/datasets/toy", cache) == local  # same URI, normalised
    assert gets == [] and _snapshot(local) == first  # nothing transferred or touched

    data.write_bytes("toy/a.txt", b"ALPHA")  # same size, new content: only the ETag tells
    data.write_bytes("toy/new/d.txt", b"new")
    s3_server.client().delete_object(Bucket=s3_bucket, Key="datasets/toy/sub/deep/c.json")
    with count_calls("GetObject") as gets:
        materialize(f"s3://{s3_bucket}/datasets/toy", cache)
    third = _snapshot(local)
    assert len(gets) == 2 and third["a.txt"][2] == b"ALPHA" and third["new/d.txt"][2] == b"new"
    assert "sub/deep/c.json" not in third and third["sub/b.bin"] == first["sub/b.bin"]

    weights = materialize(f"s3://{s3_bucket}/datasets/toy/sub/b.bin", cache)  # a single object → its file
    assert weights.is_file() and weights.read_bytes() == files["sub/b.bin"]
    with pytest.raises(StorageError, match="nothing to download"):
        materialize(f"s3://{s3_bucket}/datasets/none", cache)


@pytest.mark.integration
def test_materialize_concurrent_processes(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    expected = {f"shard{i % 4}/img{i:03d}.bin": os.urandom(64 * 1024 + i) for i in range(40)}
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: client.put_object(Bucket=s3_bucket, Key=f"big/{kv[0]}", Body=kv[1]),
                    expected.items()))
    code = ("import sys; from tune import storage; from tune.storage import s3; gets = []\n"
            "s3._client().meta.events.register('before-call.s3.GetObject', lambda **kw: gets.append(1))\n"
            "print(storage.materialize(sys.argv[1], sys.argv[2]), len(gets))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"s3://{s3_bucket}/big", str(tmp_path / "cache")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = [o[0].split() for o in outs]
    assert results[0][0] == results[1][0]
    assert sorted(int(r[1]) for r in results) == [0, len(expected)]  # the lock: one downloaded, the other reused
    local = Path(results[0][0])
    assert {k: v[2] for k, v in _snapshot(local).items()} == expected


@pytest.mark.integration
def test_data_survives_restart(s3_server, s3_bucket, tmp_path):
    st = open_storage(f"s3://{s3_bucket}/keep")
    st.write_bytes("ckpt/model.pt", b"weights" * 1000)
    t0 = time.monotonic()
    s3_server.restart()
    print(f"S3 server restart took {time.monotonic() - t0:.2f} s")
    assert st.read_bytes("ckpt/model.pt") == b"weights" * 1000
    assert open_storage(f"s3://{s3_bucket}/keep").list() == ["ckpt/model.pt"]


def test_the_filesystem_ray_ships_keeps_its_retries(monkeypatch):
    """Ray pickles the storage filesystem to every Train controller and worker. pyarrow's own pickling drops the retry
    strategy, so a trial's checkpoint-state write failed at once while S3 restarted (test_a_search_rides_out_an_s3_
    restart, about 1 run in 3). Counted on a loopback server that answers 503 to everything: the copy Ray unpickles
    makes as many attempts per request as the original."""
    import http.server
    import threading

    requests = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            requests.append(self.command)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_PUT = do_POST = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "key")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setattr(s3_backend, "OUTAGE_ATTEMPTS", 5)  # 25 ms x (1 + 2 + 4 + 8) of back-off per request
        fs = s3_backend.S3Storage("s3://bucket/root").ray_filesystem()

        def attempts(filesystem) -> int:
            requests.clear()
            with pytest.raises(OSError):
                filesystem.get_file_info("bucket/root/x")
            return len(requests)

        direct = attempts(fs)
        shipped = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(fs))))  # to the controller, and on to a worker
        assert direct >= 5 and attempts(shipped) == direct, (direct, requests)
    finally:
        server.shutdown()
        server.server_close()
