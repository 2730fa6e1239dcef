"""`build_splits`: config dict -> validated train / val / test datasets (val carved from train, stratified)."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from diffmic.data import synthetic
from diffmic.data.config import resolve_config
from diffmic.data.datasets import DataSplits, ImageListDataset, SyntheticDataset
from diffmic.data.errors import DataError
from diffmic.data.images import check_images
from diffmic.data.prepared import PreparedImages
from diffmic.data.sources import READERS
from diffmic.data.groups import combine, duplicate_groups, grouped_carve
from diffmic.data.splits import stratified_carve
from diffmic.data.transforms import eval_transform, train_transform

_TEST_STREAM, _VAL_STREAM = 1, 2  # distinct random streams for the two carves


def _check_train_classes(labels: np.ndarray, class_names: list[str], where: str) -> None:
    if len(class_names) < 2:  # nothing to classify: every metric would read 1.000
        raise DataError(f"{where} has {len(class_names)} class{'' if len(class_names) == 1 else 'es'} "
                        f"({', '.join(map(repr, class_names)) or 'none'}); expected at least 2")
    counts = np.bincount(labels, minlength=len(class_names)) if len(labels) else np.zeros(len(class_names), int)
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty and len(labels):
        raise DataError(f"class {empty[0]!r} has no training example in {where}"
                        f"{f' (nor do {len(empty) - 1} other classes)' if len(empty) > 1 else ''}; "
                        "expected at least one training image per class")


def _nonempty(name: str, n: int, why: str) -> None:
    if n == 0:
        raise DataError(f"the {name} split is empty ({why}); expected at least one example")


def build_splits(cfg: Mapping, seed: int = 0) -> DataSplits:
    """Validate `cfg` (the `dataset` config group as a dict) and the data it points to, then build the splits.

    Everything that can be checked without training is checked here, so bad input fails before any cluster work
    with one DataError line. The carves (test from train when the source has no test split, then val from train)
    are stratified and seeded by `split_seed`; `seed` is used only when `split_seed` is null. `val_carve` > 0 draws
    another validation carve from the same training pool, leaving the test split where it is.
    """
    c = resolve_config(cfg)
    split_seed = c["split_seed"] if c["split_seed"] is not None else int(seed)
    val_stream = [split_seed, _VAL_STREAM] + ([c["val_carve"]] if c["val_carve"] else [])
    size, mean, std, aug = c["image_size"], c["mean"], c["std"], c["augment"]
    tf_train = train_transform(size, aug["hflip"], aug["vflip"], aug["rotation"], mean, std)
    tf_eval = eval_transform(size, mean, std)

    if c["name"] == "synthetic":
        n_cls = c["num_classes"]
        names = list(c["class_names"] or synthetic.class_names(n_cls))
        labels = synthetic.label_of(np.arange(c["num_train"]), n_cls)
        _check_train_classes(labels, names, f"the synthetic train split (num_train = {c['num_train']})")
        keep, val = stratified_carve(labels, c["val_fraction"], val_stream)
        _nonempty("val", len(val), f"val_fraction = {c['val_fraction']} of {c['num_train']} training examples")

        def make(idx, split_id, tf):
            return SyntheticDataset(idx, n_cls, size, c["seed"], split_id, tf)
        splits = DataSplits(make(keep, 0, tf_train), make(val, 0, tf_eval),
                            make(np.arange(c["num_test"]), 1, tf_eval), names)
        # generated images have no file: each is named by its split stream and index (train and val share one)
        splits.membership = ([{"image": f"train:{i}", "group": "", "split": "train", "carve": c["val_carve"]}
                              for i in keep] + [{"image": f"train:{i}", "group": "", "split": "val",
                                                 "carve": c["val_carve"]} for i in val]
                             + [{"image": f"test:{i}", "group": "", "split": "test", "carve": c["val_carve"]}
                                for i in range(c["num_test"])])
        return splits

    src = READERS[c["name"]](c)
    names, where = src.class_names, src.where
    _nonempty("train", len(src.train_paths), f"no training examples found in {where}")
    _check_train_classes(src.train_labels, names, where)
    tr_p, tr_y = list(src.train_paths), src.train_labels
    all_paths = tr_p + list(src.test_paths or [])  # source order, for the first-missing-file message
    check_images(all_paths, c["verify_images"], where)
    reader = PreparedImages(size, c["jpeg_draft"], c["cache"])  # cache: the node's where the images are read
    groups, grouping = _groups(src, c, all_paths, reader)
    tr_g = groups[:len(tr_p)] if groups is not None else None
    if src.test_paths is None:
        keep, carved = grouped_carve(tr_y, tr_g, c["test_fraction"], [split_seed, _TEST_STREAM])
        te_p, te_y = [tr_p[i] for i in carved], tr_y[carved]
        te_g = tr_g[carved] if tr_g is not None else None
        tr_p, tr_y = [tr_p[i] for i in keep], tr_y[keep]
        tr_g = tr_g[keep] if tr_g is not None else None
        _nonempty("test", len(te_p), f"test_fraction = {c['test_fraction']} of {len(keep) + len(carved)} examples")
    else:
        te_p, te_y = list(src.test_paths), src.test_labels
        te_g = groups[len(src.train_paths):] if groups is not None else None
        _nonempty("test", len(te_p), f"the test source of {where} lists no image")
    keep, val = grouped_carve(tr_y, tr_g, c["val_fraction"], val_stream)
    _nonempty("val", len(val), f"val_fraction = {c['val_fraction']} of {len(tr_y)} training examples")
    _nonempty("train", len(keep), f"all {len(tr_y)} training examples went to val")
    if tr_g is not None and te_g is not None:
        crossing = len(set(tr_g.tolist()) & set(te_g.tolist()))
        if crossing:  # a given test split the groups cannot move: said, never hidden
            grouping += f"; {crossing} group(s) of the given test split also appear in train"
    splits = DataSplits(ImageListDataset([tr_p[i] for i in keep], tr_y[keep], tf_train, reader),
                        ImageListDataset([tr_p[i] for i in val], tr_y[val], tf_eval, reader),
                        ImageListDataset(te_p, te_y, tf_eval, reader), list(names))
    splits.grouping = grouping
    def row(path: str, group, split: str) -> dict:  # paths relative to the root: the same on every node
        shown = os.path.relpath(path, c["root"]) if c["root"] and path.startswith(str(c["root"])) else path
        return {"image": shown, "group": "" if group is None else str(group), "split": split,
                "carve": c["val_carve"]}
    pick = (lambda g, i: g[i]) if tr_g is not None else (lambda g, i: None)
    splits.membership = ([row(tr_p[i], pick(tr_g, i), "train") for i in keep]
                         + [row(tr_p[i], pick(tr_g, i), "val") for i in val]
                         + [row(p, pick(te_g, i) if te_g is not None else None, "test") for i, p in enumerate(te_p)])
    return splits


def _groups(src, c: dict, paths: list[str], reader) -> tuple[np.ndarray | None, str]:
    """One group id per image of `paths` (train then test) and a line saying what they are: the source's groups
    (dataset.group_column) merged with duplicate groups (dataset.group_duplicates)."""
    given = None
    if src.train_groups is not None:
        given = list(src.train_groups) + list(src.test_groups or [f"image:{p}" for p in src.test_paths or []])
    text = src.grouping or "per image (no group_column)"
    duplicates = None
    if c.get("group_duplicates"):
        duplicates = duplicate_groups(paths, reader, int(c["duplicate_distance"]))
        merged = len(paths) - len(set(duplicates.tolist()))
        text += f"; duplicates merged: {merged} image(s) joined a group (perceptual hash, distance " \
                f"{c['duplicate_distance']})"
    groups = combine(given, duplicates)
    return (None if groups is None else groups), text
