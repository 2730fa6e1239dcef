"""Reading the official DiffMIC list files (pickled `[{'img_root': str, 'label': int}, ...]`) without trusting them.

A pickle can run arbitrary code when loaded; these files come from the internet. The unpickler here resolves no
global but the builtins list/dict/str/int, so anything else (any class, any callable) is refused with DataError.
"""
from __future__ import annotations

import builtins
import os
import pickle

from diffmic.data.errors import DataError

_ALLOWED = frozenset({("builtins", "list"), ("builtins", "dict"), ("builtins", "str"), ("builtins", "int")})
_EXPECTED = "a pickled list of dicts {'img_root': str, 'label': int}"
MAX_BYTES = 64 << 20  # the official ISIC list (10 015 images) is about 1 MB


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_list_file(path: str | os.PathLike) -> list[dict]:
    """The validated list of {'img_root': str, 'label': int} dicts stored in `path`."""
    if not os.path.isfile(path):
        raise DataError(f"list file not found: {path}; expected {_EXPECTED}")
    if os.path.getsize(path) > MAX_BYTES:
        raise DataError(f"list file {path} is {os.path.getsize(path)} bytes; expected {_EXPECTED} of at most "
                        f"{MAX_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"refusing to unpickle list file {path}: {e}; expected {_EXPECTED} "
                        "(only builtin list/dict/str/int are allowed)") from None
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(f"cannot read list file {path}: {type(e).__name__}: {e}; expected {_EXPECTED}") from None
    if not isinstance(data, list):
        raise DataError(f"list file {path} holds a {type(data).__name__}; expected {_EXPECTED}")
    for i, item in enumerate(data):
        ok = (isinstance(item, dict) and isinstance(item.get("img_root"), str)
              and isinstance(item.get("label"), int) and not isinstance(item.get("label"), bool))
        if not ok:
            raise DataError(f"list file {path} item {i} is {_describe(item)}; expected {_EXPECTED}")
    return data


def _describe(item) -> str:
    """A short description that never walks the item: shared or deep references (a pickle bomb) would make str() of
    it cost minutes and gigabytes, or overflow the stack."""
    if isinstance(item, dict):
        keys = [repr(k)[:40] for k in list(item)[:5]]
        return f"a dict with keys {', '.join(keys)}{', …' if len(item) > 5 else ''}"
    if isinstance(item, (str, int)):
        return repr(item)[:80]
    return f"a {type(item).__name__}" + (f" of {len(item)} items" if isinstance(item, list) else "")
