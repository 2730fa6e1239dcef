"""Reading images with PIL (torchvision's C++ decoders are not available on every machine), and checking them once."""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from diffmic.data.errors import DataError

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB; DataError naming the file when it is missing, unreadable or corrupt."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _READ_ERRORS as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e} (expected a readable image file)") from None


def _decode_problem(path: str) -> str | None:
    """None when the file decodes, else a short reason. Cheap: PNG chunk CRCs, JPEG decoded at 1/8 scale."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()  # reads every chunk and checks its CRC: catches truncation and bit rot
            else:
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
