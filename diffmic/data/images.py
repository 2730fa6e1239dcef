"""Reading images with PIL (torchvision's C++ decoders are not available on every machine), and checking them once."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from diffmic.data.errors import DataError

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit grey images are scaled by their bit depth: PIL's own convert("RGB") clips them at
    255, which saturates almost every pixel of a 16-bit PNG (a common medical export)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max() <= 65535 else float(values.max())
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike, min_size: int | None = None, data: bytes | None = None) -> Image.Image:
    """The image at `path` as RGB; DataError naming the file when it is missing, unreadable or corrupt.

    `min_size`: a JPEG is decoded at the smallest of its DCT scales (1/8, 1/4, 1/2, 1) whose short side is still at
    least `min_size` (libjpeg's draft mode: the inverse DCT and colour conversion run at that scale). `data`: the
    file's bytes when the caller has read them already; they are decoded instead of the file.
    """
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            if min_size and im.format == "JPEG":
                im.draft("RGB", (min_size, min_size))  # scale 1/a with a <= min(w, h) // min_size
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _READ_ERRORS as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e} (expected a readable image file)") from None


def _decode_problem(path: str) -> str | None:
    """None when the file decodes, else a short reason. Every image is decoded in full (a PNG whose chunk CRCs are
    valid can still hold pixel data that fails to inflate); JPEGs at 1/8 scale, which still reads every block."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except _READ_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_images(paths: Sequence[str], verify: bool, where: str) -> None:
    """Every file exists (and, with `verify`, decodes); else one DataError naming the first bad file and the count."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" ({len(missing) - 1} other image files are missing too)" if len(missing) > 1 else ""
        raise DataError(f"image file not found: {missing[0]}{more}; expected the images of {where}")
    if not verify or not paths:
        return
    workers = max(1, min(8, (os.cpu_count() or 1) * 2))
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        problems = [(p, r) for p, r in zip(paths, pool.map(_decode_problem, paths, chunksize=16)) if r]
    if problems:
        (path, reason), n = problems[0], len(problems)
        more = f" ({n - 1} other image files are unreadable too)" if n > 1 else ""
        raise DataError(f"corrupt or unreadable image {path}: {reason}{more}; expected a readable image file "
                        "(set verify_images: false to skip this check)")
