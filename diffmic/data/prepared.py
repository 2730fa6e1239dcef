"""Each image's deterministic part (decode, centre-square crop, resize to `image_size`), done once per image and node.

`PreparedImages` is what `ImageListDataset` reads its files with. It runs the head of the paper's transforms
(`prepare_transform`) on the decoded file; the transforms then run on its output as they would on the file, their
crop and resize changing nothing, so every tensor is the one the file gives, random draws included.

With a cache (this node's: `diffmic.remote.cache_dir("prepared")`, beside its dataset cache, looked up by the process
that reads the images) the prepared pixels are kept as raw uint8 `.npy` files (np.load reads them) named by the blake2b
hash of the source file's bytes, under a folder that names the format, the size and the decode
(`v1-224-full/3f/3f9c….npy`). A source whose bytes change gets another name, so a stale entry is never read (the old
one stays behind; deleting the folder is safe at any time). An entry is written to a temporary file and renamed into
place, so all processes of a node (the DataLoader workers of every trial of a search) share the entries; two that
prepare one image at once write the same bytes.

Hashing reads the file. A process remembers each path's hash with the file's size, inode, mtime and ctime and reads
the file again when one of them moves. A file changed less than `RACY_S` seconds before it was hashed is hashed on
every read: file system timestamps can be too coarse to tell two writes that close apart (git's "racy clean" files).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from diffmic.data.errors import DataError
from diffmic.data.images import load_image
from diffmic.data.transforms import prepare_transform
from diffmic.remote import cache_dir

FORMAT = 1  # bump whenever the prepared pixels of a source can change (decoding, crop, resize)
RACY_S = 2.0


class PreparedImages:
    """path -> the square `image_size` RGB image the transforms start from. `jpeg_draft` decodes JPEGs at a reduced
    DCT scale (`load_image`'s `min_size`); `cache` keeps the result on disk: True in this node's cache, a path in that
    folder, False nowhere. `hits`/`misses` count this process's cache look-ups."""

    def __init__(self, image_size: int, jpeg_draft: bool = False, cache: bool | str | os.PathLike = False) -> None:
        self.image_size, self.jpeg_draft, self.cache = int(image_size), bool(jpeg_draft), cache
        self.name = f"v{FORMAT}-{self.image_size}-{'draft' if self.jpeg_draft else 'full'}"
        self.prepare = prepare_transform(self.image_size)
        self.hits = self.misses = 0
        self._hashes: dict[str, tuple[tuple[int, ...], str]] = {}
        self._writable = True
        blank = io.BytesIO()
        np.save(blank, np.zeros((self.image_size, self.image_size, 3), np.uint8), allow_pickle=False)
        self._npy_header = blank.getvalue()[:-3 * self.image_size ** 2]

    @property
    def folder(self) -> Path | None:
        if self.cache is False or self.cache is None:
            return None
        return (cache_dir("prepared") if self.cache is True else Path(self.cache)) / self.name

    def __call__(self, path: str) -> Image.Image:
        folder = self.folder
        if folder is None:
            return self._prepare(path, None)
        digest, data = self._hash(path)
        img = self._read(os.path.join(folder, digest[:2], f"{digest}.npy"))
        if img is not None:
            self.hits += 1
            return img
        self.misses += 1
        if data is None:  # the remembered hash: decode the bytes that are hashed, never a newer file under an old name
            digest, data = self._hash(path, again=True)
        img = self._prepare(path, data)
        self._write(Path(folder, digest[:2], f"{digest}.npy"), np.asarray(img))
        return img

    def _prepare(self, path: str, data: bytes | None) -> Image.Image:
        return self.prepare(load_image(path, self.image_size if self.jpeg_draft else None, data))

    def _hash(self, path: str, again: bool = False) -> tuple[str, bytes | None]:
        """The hex hash of the file's bytes, and the bytes when they were read for it."""
        try:
            st = os.stat(path)
            stamp = (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            known = self._hashes.get(path)
            if known is not None and known[0] == stamp and not again:
                return known[1], None
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}") from None
        except OSError as e:
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e} (expected a readable image "
                            "file)") from None
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        if time.time() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > RACY_S:
            self._hashes[path] = (stamp, digest)
        return digest, data

    def _read(self, entry: str) -> Image.Image | None:
        """The entry's image; None when it is absent or not an .npy of this size (damaged: prepared and written
        again). The header is compared with the one np.save writes, rather than parsed (np.load's parse would take
        as long as the rest of a cache hit)."""
        try:
            with open(entry, "rb") as f:
                data = f.read()
        except OSError:
            return None
        header, size = self._npy_header, self.image_size
        if len(data) != len(header) + size * size * 3 or not data.startswith(header):
            return None
        return Image.frombytes("RGB", (size, size), memoryview(data)[len(header):])

    def _write(self, entry: Path, pixels: np.ndarray) -> None:
        if not self._writable:
            return
        tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, pixels, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as e:  # a full or read-only disk: training goes on, preparing every image itself
            self._writable = False
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            warnings.warn(f"the prepared-image cache {entry.parent.parent} cannot be written ({type(e).__name__}: "
                          f"{e}); this process prepares its images without it", RuntimeWarning, stacklevel=2)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, jpeg_draft={self.jpeg_draft}, "
                f"cache={self.cache!r})")
