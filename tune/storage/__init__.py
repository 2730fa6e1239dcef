"""The storage root for everything a search writes: a local directory or ``s3://bucket/prefix``.

One interface (base.Storage: keys relative to the root, '/' on every backend, atomic writes), two backends
(local.LocalStorage, s3.S3Storage). A storage holds no secret: it pickles as its URI, so it can be shipped to Ray
workers, and no error message carries one.
"""
from __future__ import annotations

import re
from pathlib import Path

from diffmic.secrets import redact
from tune.storage.base import Storage, StorageError
from tune.storage.local import LocalStorage, open_local

__all__ = ["LocalStorage", "Storage", "StorageError", "materialize", "open_storage", "redact"]


def is_s3(uri: str | Path) -> bool:
    return str(uri).strip().lower().startswith("s3://")


def open_storage(uri: str, *, create_bucket: bool = False, base_dir: str | Path | None = None,
                 check: bool = True) -> Storage:
    """Parse, normalise and (if check) verify a storage root, in seconds and with one clear line on failure.

    Local: a relative path is resolved against base_dir (default: the cwd) and the directory is created.
    S3: reachable, authorised, bucket there (or created with create_bucket), writable; check=False makes no call.
    """
    text = str(uri or "").strip()
    if not text:
        raise StorageError("empty storage URI: expected a local directory or s3://bucket/prefix")
    if is_s3(text):
        from tune.storage.s3 import open_s3  # boto3 is imported only by those who use S3
        return open_s3(text, create_bucket, check)
    if re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", text) and not text.startswith("file://"):
        raise StorageError(f"unsupported storage URI {text!r}: expected a local directory or s3://bucket/prefix")
    return open_local(text, base_dir, check)


def materialize(uri: str | Path, cache_dir: str | Path) -> Path:
    """A local copy of a dataset, weights file or bundle: a local path is returned resolved; s3://bucket/prefix is
    mirrored once per node into cache_dir (see s3.mirror); a single object gives the path of its local file."""
    text = str(uri).strip()
    if not is_s3(text):
        return Path(text.removeprefix("file://")).expanduser().resolve()
    from tune.storage.s3 import mirror
    return mirror(text, cache_dir)
