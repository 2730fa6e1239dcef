"""What every storage root offers: keys relative to the root, '/' on every backend, atomic writes, no secret held."""
from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tune.errors import StorageError

if TYPE_CHECKING:
    import pyarrow.fs




def clean_rel(rel: str) -> str:
    """A relative key without '', '.' or duplicate slashes; '..' is refused (it would escape the root)."""
    parts = [p for p in str(rel).replace(os.sep, "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"bad relative path {rel!r}: '..' is not allowed")
    return "/".join(parts)


def confined(root: Path, rel: str) -> Path:
    """root/rel for a key read from storage, refused unless it stays inside root: keys are not trusted ('a//b',
    '../x', '/etc/passwd' and links out of root are all refused), and this is checked before anything is created."""
    target = root / clean_rel(rel)
    base = root.resolve()
    if not target.resolve().is_relative_to(base) or target.resolve() == base:
        raise StorageError(f"refusing key {rel!r}: it would be written outside {root}")
    return target


@dataclass(frozen=True)
class Storage:
    """A storage root; build one with open_storage(). It pickles as its URI, so it can be shipped to Ray workers."""

    uri: str  # absolute local path (no trailing slash), "s3://bucket" or "s3://bucket/prefix"
    is_s3 = False
    transfer_workers = 1  # parallel file transfers in upload_dir/download_dir

    @property
    def ray_storage_path(self) -> str:
        """For ray RunConfig(storage_path=...) without a storage_filesystem."""
        return self.uri

    @property
    def fs_path(self) -> str:
        """The root as a path inside ray_filesystem()."""
        return self.uri

    def ray_filesystem(self) -> pyarrow.fs.FileSystem | None:
        """A pyarrow filesystem for RunConfig(storage_filesystem=…, storage_path=self.fs_path); None: Ray's default."""
        return None

    def uri_of(self, fs_path: str) -> str:
        """A path as Ray reports it (inside ray_filesystem()) as a full URI."""
        raise NotImplementedError

    def relative(self, fs_path_or_uri: str) -> str:
        """The key of a path or URI below this root."""
        full, root = self.uri_of(fs_path_or_uri), self.uri.rstrip("/") + "/"
        if not full.startswith(root):
            raise StorageError(f"{full!r} is not under the storage root {self.uri!r}")
        return full[len(root):]

    def join(self, *parts: str) -> str:
        rel = clean_rel("/".join(str(p) for p in parts))
        return f"{self.uri}/{rel}" if rel else self.uri

    # the backend's primitives
    def exists(self, rel: str) -> bool:
        """True for a file, or for a "directory" holding at least one file."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; FileNotFoundError when there is none."""
        raise NotImplementedError

    def write_bytes(self, rel: str, data: bytes) -> None:
        """All or nothing: a reader never sees a partial file."""
        raise NotImplementedError

    def list(self, rel_prefix: str = "") -> list[str]:
        """Keys of all files under the "directory" rel_prefix, recursive, sorted, relative to the storage root."""
        raise NotImplementedError

    def put_file(self, local: Path, rel: str) -> None:
        raise NotImplementedError

    def delete_file(self, rel: str) -> None:
        raise NotImplementedError

    def download_file(self, rel: str, local_path: str | Path) -> Path:
        """Copy one file to local_path (written under a temporary name and renamed: never partial)."""
        raise NotImplementedError

    # built on them
    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def upload_dir(self, local_dir: str | Path, rel: str, last: tuple[str, ...] = ()) -> list[str]:
        """Copy every file under local_dir to rel/...; returns the keys written (relative to the root), sorted.

        Files named in `last` (relative to local_dir) are written after all others: a bundle's manifest, so that an
        upload that dies half-way leaves a directory without one, which every reader refuses as incomplete."""
        src, rel = Path(local_dir), clean_rel(rel)
        if not src.is_dir():
            raise FileNotFoundError(f"not a directory: {src}")
        files = {f"{rel}/{f.relative_to(src).as_posix()}".lstrip("/"): f for f in src.rglob("*") if f.is_file()}
        final = {k for k, f in files.items() if f.relative_to(src).as_posix() in last}
        for batch in ([k for k in files if k not in final], sorted(final)):
            with cf.ThreadPoolExecutor(self.transfer_workers) as ex:
                list(ex.map(lambda key: self.put_file(files[key], key), batch))
        return sorted(files)

    def delete_dir(self, rel: str, first: tuple[str, ...] = ()) -> None:
        """Delete every file under rel/; those named in `first` go before the others (a bundle's manifest: a
        deletion that dies half-way leaves an incomplete bundle that readers refuse, never a mixed one)."""
        rel = clean_rel(rel)
        keys, cut = self.list(rel), len(rel) + 1 if rel else 0
        early = [k for k in keys if k[cut:] in first]
        for k in early:
            self.delete_file(k)
        with cf.ThreadPoolExecutor(self.transfer_workers) as ex:
            list(ex.map(self.delete_file, [k for k in keys if k not in early]))

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy every file under rel/ into local_dir (same layout); FileNotFoundError when there is none."""
        rel, dest = clean_rel(rel), Path(local_dir)
        keys = self.list(rel)
        if not keys and not self.exists(rel):
            raise FileNotFoundError(self.join(rel))
        cut = len(rel) + 1 if rel else 0
        targets = {k: confined(dest, k[cut:]) for k in keys}  # all checked before the first file is written
        with cf.ThreadPoolExecutor(self.transfer_workers) as ex:
            list(ex.map(lambda k: self.download_file(k, targets[k]), keys))
        dest.mkdir(parents=True, exist_ok=True)
        return dest
