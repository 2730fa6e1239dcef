"""A storage root on a local (or network-mounted) filesystem."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tune.storage.base import Storage, StorageError, clean_rel

TMP_MARK = ".tmp-storage-"  # in-flight writes; never listed


def atomic_write(dest: Path, fill: Callable[[str], None]) -> None:
    """fill(tmp) writes a temp file beside dest, renamed over it: readers never see a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}{TMP_MARK}")
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class LocalStorage(Storage):
    def path(self, rel: str = "") -> Path:
        return Path(self.uri, clean_rel(rel))

    def uri_of(self, fs_path: str) -> str:
        return str(Path(fs_path).resolve())

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write(self.path(rel), lambda tmp: Path(tmp).write_bytes(data))

    def list(self, rel_prefix: str = "") -> list[str]:
        root, base = Path(self.uri), self.path(rel_prefix)
        files = base.rglob("*") if base.is_dir() else []
        return sorted(p.relative_to(root).as_posix() for p in files if p.is_file() and TMP_MARK not in p.name)

    def put_file(self, local: Path, rel: str) -> None:
        atomic_write(self.path(rel), lambda tmp: shutil.copyfile(local, tmp))

    def delete_file(self, rel: str) -> None:
        path = self.path(rel)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # empty directories go too, as they do not exist in S3
            if parent == Path(self.uri) or any(parent.iterdir()):
                break
            parent.rmdir()

    def download_file(self, rel: str, local_path: str | Path) -> Path:
        dest = Path(local_path)
        atomic_write(dest, lambda tmp: shutil.copyfile(self.path(rel), tmp))
        return dest


def open_local(text: str, base_dir: str | Path | None, check: bool) -> LocalStorage:
    """A relative path is resolved against base_dir (default: the cwd), since Ray must never see a relative path
    (under `ray job submit --working-dir` it would land in a temporary copy); the directory is created."""
    path = Path(text.removeprefix("file://")).expanduser()
    path = (Path(base_dir if base_dir is not None else os.getcwd()).expanduser() / path).resolve()  # abs path wins
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create local storage directory {path}: {e.strerror}") from None
    if check and not os.access(path, os.W_OK):
        raise StorageError(f"local storage directory {path} is not writable")
    return LocalStorage(str(path))
