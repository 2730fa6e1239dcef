"""A storage root in S3: ``s3://bucket/prefix`` on AWS or any S3-compatible server (SeaweedFS in the tests).

Endpoint, region and credentials come only from the standard AWS environment (``AWS_ENDPOINT_URL[_S3]``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, boto3's credential chain: env keys, profile, instance role). No object here
holds a secret, and no error message carries one.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from diffmic.secrets import SECRET_VARS
from tune.storage.base import Storage, StorageError, clean_rel
from tune.storage.local import atomic_write

if TYPE_CHECKING:
    import pyarrow.fs

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]")  # S3 bucket naming rules (plus legacy '_')
_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled"}
_EXPECTED = "expected s3://bucket/prefix with a bucket name of 3-63 lowercase letters, digits, '.', '-'"
LIST_PAGE_SIZE = 1000  # S3's maximum page; tests lower it to exercise pagination
WORKERS = 8  # parallel transfers
# Attempts per request before an S3 error is raised. pyarrow's default strategy waits 25 ms x 2^n between attempts:
# 12 attempts ride out about 100 s of outage (a restarted S3 server, a network blip) at the cost of time, not a trial
# or a checkpoint. boto3's standard mode waits at random up to 2^n s (at most 20 s): about a minute on average.
OUTAGE_ATTEMPTS = 12


# ---------------------------------------------------------------- environment, clients, keys
def _endpoint() -> tuple[str | None, str | None]:
    """(endpoint URL, the variable it came from), with boto3's own precedence; (None, None) means AWS."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var].rstrip("/"), var
    return None, None


def _region() -> str:
    return (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            or boto3.session.Session().region_name or "us-east-1")


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _client(preflight: bool = False) -> Any:
    """A boto3 S3 client for the current environment, cached per process (clients are thread-safe, sessions not).

    The preflight client fails fast (connect 3 s, read 5 s, one retry) so a wrong endpoint is reported in seconds, not
    after botocore's default minutes; the transfer client retries more and pools a connection per worker thread.
    """
    env = [os.environ.get(v, "") for v in (*SECRET_VARS, "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION")]
    key = hashlib.sha256(repr((os.getpid(), preflight, _endpoint(), env)).encode()).hexdigest()  # no secret as key
    with _clients_lock:
        if key not in _clients:
            cfg = (Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
                   if preflight else
                   Config(retries={"max_attempts": OUTAGE_ATTEMPTS, "mode": "standard"},
                          max_pool_connections=2 * WORKERS))
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=_endpoint()[0], region_name=_region(),
                                                           config=cfg)
        return _clients[key]


def _code(e: bex.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _missing_as_fnf(uri: str) -> Iterator[None]:
    """S3's 404 / NoSuchKey as FileNotFoundError, like the local backend raises."""
    try:
        yield
    except bex.ClientError as e:
        if _code(e) in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(uri) from None
        raise


def _iter_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict]:
    """Every object under a key prefix, following continuation tokens (S3 returns at most 1000 per page)."""
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE})
    for page in pages:
        yield from (o for o in page.get("Contents", []) if not o["Key"].endswith("/"))  # skip "folder" markers


def _parse_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[5:].partition("/")
    if "?" in uri or "#" in uri:
        raise StorageError(f"bad storage URI {uri!r}: no query strings (to create the bucket pass "
                           f"storage.create_bucket=true); {_EXPECTED}")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in prefix.split("/"):
        raise StorageError(f"bad storage URI {uri!r}: {_EXPECTED} and no '..' in the prefix")
    return bucket, clean_rel(prefix)


# ---------------------------------------------------------------- the backend
def _outage_tolerant_fs(options: dict, attempts: int) -> pyarrow.fs.S3FileSystem:
    """An S3FileSystem with `options` (S3FileSystem's keywords) that retries each request `attempts` times, and still
    does where Ray unpickles it: pyarrow's own pickling keeps the options but drops the retry strategy, which left
    every Train controller and worker with 3 quick attempts, so a trial failed when S3 restarted under it."""
    import pyarrow.fs as pafs

    return _outage_tolerant_class()(**options, retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts),
                                    _attempts=attempts)


@functools.cache
def _outage_tolerant_class() -> type:
    import pyarrow.fs as pafs

    class OutageTolerantS3FileSystem(pafs.S3FileSystem):
        def __init__(self, *, _attempts: int, **kwargs) -> None:
            super().__init__(**kwargs)  # Cython's __cinit__ takes the same keywords
            self._attempts = _attempts

        def __reduce__(self):
            return _outage_tolerant_fs, (super().__reduce__()[1][0], self._attempts)

    return OutageTolerantS3FileSystem


@dataclass(frozen=True)
class S3Storage(Storage):
    is_s3 = True
    transfer_workers = WORKERS  # many small files (images, checkpoint shards) are latency-bound

    @property
    def fs_path(self) -> str:
        return self.uri[5:]  # "bucket/prefix" inside ray_filesystem()

    def uri_of(self, fs_path: str) -> str:
        return "s3://" + fs_path.removeprefix("s3://")

    def ray_filesystem(self) -> pyarrow.fs.FileSystem:
        """A bare S3FileSystem() ignores AWS_ENDPOINT_URL, hence the explicit endpoint. Credentials are left to the
        default chain on each node, so the pickled filesystem that Ray ships to workers carries no secret. pyarrow is
        imported in the helpers below: local-only users never pay for its S3 start-up."""
        endpoint = _endpoint()[0]
        return _outage_tolerant_fs({"region": _region(), "connect_timeout": 5,
                                    **({"endpoint_override": endpoint} if endpoint else {})}, OUTAGE_ATTEMPTS)

    def bucket_key(self, rel: str = "") -> tuple[str, str]:
        bucket, _, prefix = self.uri[5:].partition("/")
        return bucket, "/".join(p for p in (prefix, clean_rel(rel)) if p)

    def exists(self, rel: str) -> bool:
        bucket, key = self.bucket_key(rel)
        with contextlib.suppress(FileNotFoundError), _missing_as_fnf(self.join(rel)):
            if key and _client().head_object(Bucket=bucket, Key=key):
                return True
        page = _client().list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        return bool(page.get("Contents"))

    def read_bytes(self, rel: str) -> bytes:
        bucket, key = self.bucket_key(rel)
        with _missing_as_fnf(self.join(rel)):
            return _client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        bucket, key = self.bucket_key(rel)
        _client().put_object(Bucket=bucket, Key=key, Body=bytes(data))  # a PUT is all-or-nothing

    def list(self, rel_prefix: str = "") -> list[str]:
        (bucket, key), root = self.bucket_key(rel_prefix), self.bucket_key()[1]
        cut = len(root) + 1 if root else 0
        return sorted(o["Key"][cut:] for o in _iter_objects(_client(), bucket, f"{key}/" if key else ""))

    def put_file(self, local: Path, rel: str) -> None:
        _client().upload_file(str(local), *self.bucket_key(rel))  # multipart for big files

    def delete_file(self, rel: str) -> None:
        _client().delete_object(Bucket=self.bucket_key(rel)[0], Key=self.bucket_key(rel)[1])

    def download_file(self, rel: str, local_path: str | Path) -> Path:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _missing_as_fnf(self.join(rel)):  # s3transfer writes a temp name and renames: dest is never partial
            _client().download_file(*self.bucket_key(rel), str(dest))
        return dest


# ---------------------------------------------------------------- opening
def _credentials_hint() -> str:
    """Which credentials were used, never the secret: the key ID's variable with the ID masked, or their source."""
    kid = os.environ.get("AWS_ACCESS_KEY_ID")
    if kid:
        return f"AWS_ACCESS_KEY_ID={kid[:4]}…{kid[-4:]}" if len(kid) >= 12 else "AWS_ACCESS_KEY_ID=***"
    creds, profile = boto3.session.Session().get_credentials(), os.environ.get("AWS_PROFILE")
    return f"credentials from {getattr(creds, 'method', 'nowhere')}" + (f" (AWS_PROFILE={profile})" if profile else "")


def _preflight(st: S3Storage, create_bucket: bool) -> None:
    """Fail in seconds, with one clear line, before any cluster work: reachable, authorised, bucket there, writable."""
    client, (bucket, prefix), var = _client(preflight=True), st.bucket_key(), _endpoint()[1]
    where = f"S3 endpoint {client.meta.endpoint_url}" + (f" (from {var})" if var else "")
    step = "read"
    try:
        try:
            client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
        except bex.ClientError as e:
            if _code(e) != "NoSuchBucket":
                raise
            if not create_bucket:
                raise StorageError(f"bucket {bucket!r} does not exist at {where}: create it (e.g. `aws s3 mb "
                                   f"s3://{bucket}`) or pass storage.create_bucket=true") from None
            step, region = "create", _region()
            kw = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):  # a concurrent run made it
                client.create_bucket(Bucket=bucket, **kw)
        step = "write under"  # workers write checkpoints much later: catch read-only credentials now
        probe = "/".join(p for p in (prefix, f".storage-probe-{uuid.uuid4().hex}") if p)
        client.put_object(Bucket=bucket, Key=probe, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe)
    except bex.NoCredentialsError:
        raise StorageError(f"no AWS credentials found for bucket {bucket!r} at {where}: set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or use an instance role)") from None
    except (bex.ConnectionError, bex.ReadTimeoutError) as e:
        raise StorageError(f"cannot reach {where} for {st.uri} ({type(e).__name__}): is the server running and the "
                           "URL right?") from None
    except bex.ClientError as e:
        code, status = _code(e), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _DENIED or status == 403:
            raise StorageError(f"access denied ({code}) to {step} bucket {bucket!r} at {where} with "
                               f"{_credentials_hint()}: check the access key ID, the secret key "
                               "(AWS_SECRET_ACCESS_KEY) and the bucket's permissions") from None
        raise StorageError(f"S3 check of {st.uri} failed ({step}): {code} {e.response.get('Error', {}).get('Message')}"
                           f"; is {where} an S3 endpoint and {_region()} the bucket's region?") from None
    except bex.BotoCoreError as e:
        raise StorageError(f"S3 check of {st.uri} at {where} failed: {type(e).__name__}: {e}") from None


def open_s3(text: str, create_bucket: bool, check: bool) -> S3Storage:
    """check=False skips all network calls (e.g. on workers, after the driver checked)."""
    bucket, prefix = _parse_s3(text)
    st = S3Storage(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")
    if check:
        _preflight(st, create_bucket)
    return st


# ---------------------------------------------------------------- datasets
def mirror(text: str, cache_dir: str | Path) -> Path:
    """A local copy of s3://bucket/prefix, mirrored once per node; StorageError (one line) when it cannot be read.

    The copy lives in cache_dir/<sha of the URI>/; a manifest beside it (key -> size, ETag) lets a later call skip
    unchanged files, fetch changed ones and drop deleted ones. An exclusive flock serialises concurrent callers on one
    node (several Ray workers): the first downloads, the others wait and then find the copy current.
    If the URI names a single object (e.g. weights), the path of the local file is returned instead.
    """
    bucket, prefix = _parse_s3(text)
    norm = f"s3://{bucket}/{prefix}".rstrip("/")
    try:
        return _mirror(bucket, prefix, norm, Path(cache_dir))
    except (bex.BotoCoreError, bex.ClientError) as e:  # no credentials, no bucket, endpoint unreachable, …
        raise StorageError(f"cannot download {norm}: {type(e).__name__}: {e}") from None


def _mirror(bucket: str, prefix: str, norm: str, cache_dir: Path) -> Path:
    digest = hashlib.sha256(norm.encode()).hexdigest()[:20]
    cache = Path(cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    target, manifest_path = cache / digest, cache / f"{digest}.manifest.json"
    with open(cache / f"{digest}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        client, cut, single = _client(), len(prefix) + 1 if prefix else 0, None
        objs = {clean_rel(o["Key"][cut:]): o for o in _iter_objects(client, bucket, f"{prefix}/" if prefix else "")}
        if not objs and prefix:
            with contextlib.suppress(FileNotFoundError), _missing_as_fnf(norm):
                head = client.head_object(Bucket=bucket, Key=prefix)
                single = prefix.rsplit("/", 1)[-1]
                objs = {single: {"Key": prefix, "Size": head["ContentLength"], "ETag": head["ETag"]}}
        if not objs:
            raise StorageError(f"nothing to download at {norm}: no object under that prefix")
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}
        new = {rel: {"size": o["Size"], "etag": o["ETag"]} for rel, o in objs.items()}
        for rel in set(old) - set(new):  # deleted upstream
            (target / clean_rel(rel)).unlink(missing_ok=True)
        todo = [rel for rel in new if old.get(rel) != new[rel]
                or not (target / rel).is_file() or (target / rel).stat().st_size != new[rel]["size"]]

        def fetch(rel: str) -> None:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, objs[rel]["Key"], str(target / rel))  # temp name + rename
        with cf.ThreadPoolExecutor(WORKERS) as ex:
            list(ex.map(fetch, todo))
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(new, sort_keys=True)))
    return target / single if single else target
