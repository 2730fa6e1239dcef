"""Up-front validation of the `dataset` config group (a plain dict; Hydra/OmegaConf mappings work too).

The defaults are those of configs/dataset/<name>.yaml, the one place they live: a config given as a few keys
(`{"name": "isic2018", "root": …}` from Python) gets the rest from that file, exactly as Hydra composes it.
Keys this module does not know are ignored (so a config group may carry keys meant for other code).
"""
from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence

from diffmic.data import synthetic
from diffmic.data.errors import DataError

KNOWN = ("synthetic", "isic2018", "aptos2019", "pkl", "folder", "csv")  # the readers (and the synthetic set)


def defaults(name: str) -> dict:
    """configs/dataset/<name>.yaml, as plain data."""
    import yaml

    from diffmic.cli import CONFIG_DIR
    return yaml.safe_load((CONFIG_DIR / "dataset" / f"{name}.yaml").read_text())


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v.copy() if isinstance(v, (list, dict)) else v
    return out


def _plain(x):
    """OmegaConf containers and tuples -> plain dict/list."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(v) for v in x]
    return x


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(c: dict, key: str, lo: int, hi: int | None = None, what: str = "") -> int:
    v = c[key]
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise DataError(f"dataset.{key} = {v!r} is invalid; expected an integer {rng}{what}")
    return int(v)


def _fraction(c: dict, key: str, why: str) -> float:
    v = c[key]
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0.0 < float(v) < 1.0:
        raise DataError(f"dataset.{key} = {v!r} is invalid; expected a number strictly between 0 and 1 ({why})")
    return float(v)


def _triple(c: dict, key: str, positive: bool) -> list[float]:
    v = c[key]
    ok = isinstance(v, list) and len(v) == 3 and all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                                                      for x in v)
    if not ok or (positive and min(v) <= 0):
        raise DataError(f"dataset.{key} = {v!r} is invalid; expected 3 numbers (R, G, B){' > 0' if positive else ''}")
    return [float(x) for x in v]


def resolve_config(cfg: Mapping | None) -> dict:
    """`cfg` with every default filled in and every value checked; DataError (one line) on the first bad one."""
    given = _plain(cfg or {})
    if not isinstance(given, dict):
        raise DataError(f"dataset config is a {type(cfg).__name__}; expected a mapping of dataset keys")
    name = given.get("name", "synthetic")
    if name not in KNOWN:
        raise DataError(f"unknown dataset name {name!r}; expected one of: {', '.join(KNOWN)}")
    c = _merge(defaults(name), given)

    c["image_size"] = _int(c, "image_size", 32, what=" (pixels)")
    c["val_fraction"] = _fraction(c, "val_fraction", "a validation split is needed for model selection")
    c["test_fraction"] = _fraction(c, "test_fraction", "share of the data carved as test when there is no test split")
    if c["split_seed"] is not None:
        c["split_seed"] = _int(c, "split_seed", 0)
    c["val_carve"] = _int(c, "val_carve", 0)
    aug = c["augment"]
    if not isinstance(aug, dict):
        raise DataError(f"dataset.augment = {aug!r} is invalid; expected a mapping with hflip, vflip, rotation")
    for k in ("hflip", "vflip"):
        if not isinstance(aug.get(k), bool):
            raise DataError(f"dataset.augment.{k} = {aug.get(k)!r} is invalid; expected true or false")
    rot = aug.get("rotation")
    if not isinstance(rot, numbers.Real) or isinstance(rot, bool) or not 0 <= rot <= 180:
        raise DataError(f"dataset.augment.rotation = {rot!r} is invalid; expected degrees in [0, 180]")
    c["mean"], c["std"] = _triple(c, "mean", False), _triple(c, "std", True)
    for key in ("verify_images", "cache", "jpeg_draft"):
        if not isinstance(c[key], bool):
            raise DataError(f"dataset.{key} = {c[key]!r} is invalid; expected true or false")
    names = c["class_names"]
    if names is not None:
        if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)):
            raise DataError(f"dataset.class_names = {names!r} is invalid; expected null or a list of distinct, "
                            "non-empty strings")
    if name == "synthetic":
        c["num_classes"] = _int(c, "num_classes", 2, synthetic.MAX_CLASSES)
        c["num_train"] = _int(c, "num_train", 2)
        c["num_test"] = _int(c, "num_test", 1)
        c["seed"] = _int(c, "seed", 0)
        if names is not None and len(names) != c["num_classes"]:
            raise DataError(f"dataset.class_names has {len(names)} names; expected num_classes = {c['num_classes']}")
    elif name == "pkl" and c["num_classes"] is not None:
        c["num_classes"] = _int(c, "num_classes", 2)
    if c["root"] is not None and not isinstance(c["root"], str):
        c["root"] = str(c["root"])
    return c
