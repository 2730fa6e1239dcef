"""The storage root for everything a search writes: a local directory or ``s3://bucket/prefix``.

One code path serves AWS and any S3-compatible server (SeaweedFS in tests). Endpoint, region and credentials come only
from the standard AWS environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, boto3's credential
chain: env keys, profile, instance role). A ``Storage`` holds no secret (it pickles as its URI, so it can be shipped to
Ray workers) and no error message carries one.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import boto3
import botocore.exceptions as bex
from botocore.config import Config

if TYPE_CHECKING:
    import pyarrow.fs

_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]")  # S3 bucket naming rules (plus legacy '_')
_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403", "ExpiredToken",
           "InvalidToken", "AllAccessDisabled"}
_EXPECTED = "expected s3://bucket/prefix with a bucket name of 3-63 lowercase letters, digits, '.', '-'"
_TMP_MARK = ".tmp-storage-"  # in-flight local writes; never listed
_LIST_PAGE_SIZE = 1000  # S3's maximum page; tests lower it to exercise pagination
_WORKERS = 8  # parallel transfers: many small files (images, checkpoint shards) are latency-bound


class StorageError(RuntimeError):
    """One line naming the URI/endpoint and what was expected; never contains a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(redact(str(message)).split()))


def redact(text: str) -> str:
    """Replace the values of the AWS secret variables found in os.environ with '***'."""
    for var in _SECRET_VARS:
        value = os.environ.get(var, "")
        if len(value) >= 4:  # shorter values are no secret, and replacing them would mangle any text
            text = text.replace(value, "***")
    return text


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
    env = [os.environ.get(v, "") for v in (*_SECRET_VARS, "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION")]
    key = hashlib.sha256(repr((os.getpid(), preflight, _endpoint(), env)).encode()).hexdigest()  # no secret as key
    with _clients_lock:
        if key not in _clients:
            cfg = (Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
                   if preflight else
                   Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=2 * _WORKERS))
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
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": _LIST_PAGE_SIZE})
    for page in pages:
        yield from (o for o in page.get("Contents", []) if not o["Key"].endswith("/"))  # skip "folder" markers


def _clean_rel(rel: str) -> str:
    """A relative key without '', '.' or duplicate slashes; '..' is refused (it would escape the root)."""
    parts = [p for p in str(rel).replace(os.sep, "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"bad relative path {rel!r}: '..' is not allowed")
    return "/".join(parts)


def _parse_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[5:].partition("/")
    if "?" in uri or "#" in uri:
        raise StorageError(f"bad storage URI {uri!r}: no query strings (to create the bucket pass "
                           f"storage.create_bucket=true); {_EXPECTED}")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in prefix.split("/"):
        raise StorageError(f"bad storage URI {uri!r}: {_EXPECTED} and no '..' in the prefix")
    return bucket, _clean_rel(prefix)


def _atomic_write(dest: Path, fill: Callable[[str], None]) -> None:
    """fill(tmp) writes a temp file beside dest, renamed over it: readers never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}{_TMP_MARK}")
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- Storage
@dataclass(frozen=True)
class Storage:
    """A storage root; build it with open_storage(). Keys are relative to the root and use '/' on both backends."""

    uri: str  # absolute local path (no trailing slash), "s3://bucket" or "s3://bucket/prefix"

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def ray_storage_path(self) -> str:
        """For ray RunConfig(storage_path=...) without a storage_filesystem."""
        return self.uri

    @property
    def fs_path(self) -> str:
        """The root as a path inside ray_filesystem(): "bucket/prefix" for S3, the absolute path for local."""
        return self.uri[5:] if self.is_s3 else self.uri

    def uri_of(self, fs_path: str) -> str:
        """A path as Ray reports it (e.g. a checkpoint's `bucket/key` inside ray_filesystem()) as a full URI."""
        return "s3://" + fs_path.removeprefix("s3://") if self.is_s3 else str(Path(fs_path).resolve())

    def relative(self, fs_path_or_uri: str) -> str:
        """The key of a path or URI below this root."""
        full, root = self.uri_of(fs_path_or_uri), self.uri.rstrip("/") + "/"
        if not full.startswith(root):
            raise StorageError(f"{full!r} is not under the storage root {self.uri!r}")
        return full[len(root):]

    def ray_filesystem(self) -> pyarrow.fs.FileSystem | None:
        """pyarrow S3FileSystem for RunConfig(storage_filesystem=..., storage_path=self.fs_path); None for local.

        A bare S3FileSystem() ignores AWS_ENDPOINT_URL, hence the explicit endpoint. Credentials are left to the default
        chain on each node, so the pickled filesystem that Ray ships to workers carries no secret.
        """
        if not self.is_s3:
            return None
        import pyarrow.fs as pafs  # here: local-only users never pay for pyarrow's S3 start-up

        endpoint = _endpoint()[0]
        return pafs.S3FileSystem(region=_region(), connect_timeout=5,
                                 **({"endpoint_override": endpoint} if endpoint else {}))

    def _bucket_key(self, rel: str = "") -> tuple[str, str]:
        bucket, _, prefix = self.uri[5:].partition("/")
        return bucket, "/".join(p for p in (prefix, _clean_rel(rel)) if p)

    def _path(self, rel: str = "") -> Path:
        return Path(self.uri, _clean_rel(rel))

    def join(self, *parts: str) -> str:
        rel = _clean_rel("/".join(str(p) for p in parts))
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str) -> bool:
        """True for a file, or for a "directory" holding at least one file (S3 has no directories)."""
        if not self.is_s3:
            return self._path(rel).exists()
        bucket, key = self._bucket_key(rel)
        with contextlib.suppress(FileNotFoundError), _missing_as_fnf(self.join(rel)):
            if key and _client().head_object(Bucket=bucket, Key=key):
                return True
        page = _client().list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        return bool(page.get("Contents"))

    def read_bytes(self, rel: str) -> bytes:
        if not self.is_s3:
            return self._path(rel).read_bytes()
        bucket, key = self._bucket_key(rel)
        with _missing_as_fnf(self.join(rel)):
            return _client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic on both backends: a local temp file renamed into place; an S3 PUT is all-or-nothing."""
        if self.is_s3:
            bucket, key = self._bucket_key(rel)
            _client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
        else:
            _atomic_write(self._path(rel), lambda tmp: Path(tmp).write_bytes(data))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def list(self, rel_prefix: str = "") -> list[str]:
        """Keys of all files under the "directory" rel_prefix, recursive, sorted, relative to the storage root."""
        if not self.is_s3:
            root, base = Path(self.uri), self._path(rel_prefix)
            files = base.rglob("*") if base.is_dir() else []
            return sorted(p.relative_to(root).as_posix() for p in files if p.is_file() and _TMP_MARK not in p.name)
        (bucket, key), root = self._bucket_key(rel_prefix), self._bucket_key()[1]
        cut = len(root) + 1 if root else 0
        return sorted(o["Key"][cut:] for o in _iter_objects(_client(), bucket, f"{key}/" if key else ""))

    def upload_dir(self, local_dir: str | Path, rel: str) -> list[str]:
        """Copy every file under local_dir to rel/...; returns the keys written (relative to the root), sorted."""
        src, rel = Path(local_dir), _clean_rel(rel)
        if not src.is_dir():
            raise FileNotFoundError(f"not a directory: {src}")
        files = {f"{rel}/{f.relative_to(src).as_posix()}".lstrip("/"): f for f in src.rglob("*") if f.is_file()}

        def put(key: str) -> None:
            if self.is_s3:
                _client().upload_file(str(files[key]), *self._bucket_key(key))  # multipart for big files
            else:
                _atomic_write(self._path(key), lambda tmp: shutil.copyfile(files[key], tmp))
        with cf.ThreadPoolExecutor(_WORKERS if self.is_s3 else 1) as ex:
            list(ex.map(put, files))
        return sorted(files)

    def download_file(self, rel: str, local_path: str | Path) -> Path:
        dest = Path(local_path)
        if not self.is_s3:
            _atomic_write(dest, lambda tmp: shutil.copyfile(self._path(rel), tmp))
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _missing_as_fnf(self.join(rel)):  # s3transfer writes a temp name and renames: dest is never partial
            _client().download_file(*self._bucket_key(rel), str(dest))
        return dest

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy every file under rel/ into local_dir (same layout); FileNotFoundError when there is none."""
        rel, dest = _clean_rel(rel), Path(local_dir)
        keys = self.list(rel)
        if not keys and (self.is_s3 or not self._path(rel).is_dir()):
            raise FileNotFoundError(self.join(rel))
        cut = len(rel) + 1 if rel else 0
        with cf.ThreadPoolExecutor(_WORKERS if self.is_s3 else 1) as ex:
            list(ex.map(lambda k: self.download_file(k, dest / k[cut:]), keys))
        dest.mkdir(parents=True, exist_ok=True)
        return dest


# ---------------------------------------------------------------- opening
def _credentials_hint() -> str:
    """Which credentials were used, never the secret: the key ID's variable with the ID masked, or their source."""
    kid = os.environ.get("AWS_ACCESS_KEY_ID")
    if kid:
        return f"AWS_ACCESS_KEY_ID={kid[:4]}…{kid[-4:]}" if len(kid) >= 12 else "AWS_ACCESS_KEY_ID=***"
    creds, profile = boto3.session.Session().get_credentials(), os.environ.get("AWS_PROFILE")
    return f"credentials from {getattr(creds, 'method', 'nowhere')}" + (f" (AWS_PROFILE={profile})" if profile else "")


def _preflight(st: Storage, create_bucket: bool) -> None:
    """Fail in seconds, with one clear line, before any cluster work: reachable, authorised, bucket there, writable."""
    client, (bucket, prefix), var = _client(preflight=True), st._bucket_key(), _endpoint()[1]
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


def open_storage(uri: str, *, create_bucket: bool = False, base_dir: str | Path | None = None,
                 check: bool = True) -> Storage:
    """Parse, normalise and (if check) verify a storage root.

    Local: a relative path is resolved against base_dir (default: the cwd), since Ray must never see a relative path
    (under `ray job submit --working-dir` it would land in a temporary copy); the directory is created.
    S3: see _preflight; check=False skips all network calls (e.g. on workers, after the driver checked).
    """
    text = str(uri or "").strip()
    if not text:
        raise StorageError("empty storage URI: expected a local directory or s3://bucket/prefix")
    if text.lower().startswith("s3://"):
        bucket, prefix = _parse_s3(text)
        st = Storage(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")
        if check:
            _preflight(st, create_bucket)
        return st
    if re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", text) and not text.startswith("file://"):
        raise StorageError(f"unsupported storage URI {text!r}: expected a local directory or s3://bucket/prefix")
    path = Path(text.removeprefix("file://")).expanduser()
    path = (Path(base_dir if base_dir is not None else os.getcwd()).expanduser() / path).resolve()  # abs path wins
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create local storage directory {path}: {e.strerror}") from None
    if check and not os.access(path, os.W_OK):
        raise StorageError(f"local storage directory {path} is not writable")
    return Storage(str(path))


# ---------------------------------------------------------------- datasets
def materialize(uri: str | Path, cache_dir: str | Path) -> Path:
    """A local copy of a dataset: a local path is returned resolved; s3://bucket/prefix is mirrored once per node.

    The copy lives in cache_dir/<sha of the URI>/; a manifest beside it (key -> size, ETag) lets a later call skip
    unchanged files, fetch changed ones and drop deleted ones. An exclusive flock serialises concurrent callers on one
    node (several Ray workers): the first downloads, the others wait and then find the copy current.
    If the URI names a single object (e.g. weights), the path of the local file is returned instead.
    """
    text = str(uri).strip()
    if not text.lower().startswith("s3://"):
        return Path(text.removeprefix("file://")).expanduser().resolve()
    bucket, prefix = _parse_s3(text)
    norm = f"s3://{bucket}/{prefix}".rstrip("/")
    digest = hashlib.sha256(norm.encode()).hexdigest()[:20]
    cache = Path(cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    target, manifest_path = cache / digest, cache / f"{digest}.manifest.json"
    with open(cache / f"{digest}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        client, cut, single = _client(), len(prefix) + 1 if prefix else 0, None
        objs = {_clean_rel(o["Key"][cut:]): o for o in _iter_objects(client, bucket, f"{prefix}/" if prefix else "")}
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
            (target / _clean_rel(rel)).unlink(missing_ok=True)
        todo = [rel for rel in new if old.get(rel) != new[rel]
                or not (target / rel).is_file() or (target / rel).stat().st_size != new[rel]["size"]]

        def fetch(rel: str) -> None:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, objs[rel]["Key"], str(target / rel))  # temp name + rename
        with cf.ThreadPoolExecutor(_WORKERS) as ex:
            list(ex.map(fetch, todo))
        _atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(new, sort_keys=True)))
    return target / single if single else target
