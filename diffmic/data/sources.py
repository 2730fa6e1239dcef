"""Readers for the file-based datasets: each turns a resolved config into image paths, integer labels and class
names (train, and test when the source has its own), raising DataError on any bad input it can see without
opening images. Image files themselves are checked later, all at once (`images.check_images`).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from diffmic.data.errors import DataError, preview
from diffmic.data.safe_pickle import load_list_file

ISIC_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
APTOS_CLASSES = ["0 - No DR", "1 - Mild", "2 - Moderate", "3 - Severe", "4 - Proliferative DR"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Source:
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str] | None  # None: no test split of its own (carve one)
    test_labels: np.ndarray | None
    class_names: list[str]
    where: str  # where the images are, for error messages
    train_groups: list[str] | None = None  # one group per image (a lesion, a patient; dataset.group_column)
    test_groups: list[str] | None = None
    grouping: str = ""  # what the groups are, for the run's log


def _join(base: str | None, p: str) -> str:
    p = os.path.expanduser(str(p))
    return os.path.normpath(p if os.path.isabs(p) or base is None else os.path.join(base, p))


def _root(c: dict, needs: str) -> str:
    if c["root"] is None:
        raise DataError(f"dataset.root is null for dataset {c['name']!r}; expected the folder holding {needs}")
    root = os.path.abspath(os.path.expanduser(c["root"]))
    if not os.path.isdir(root):
        raise DataError(f"dataset root not found: {root}; expected a folder holding {needs}")
    return root


def _dir(path: str, key: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"images folder not found: {path} (dataset.{key}); expected a folder of image files")
    return path


def _read_csv(path: str, columns: list[str], key: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"CSV file not found: {path} (dataset.{key}); expected a CSV with columns {', '.join(columns)}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [col for col in columns if col not in header]
        if missing:
            raise DataError(f"CSV {path} lacks column(s) {', '.join(missing)}; found [{preview(header)}], "
                            f"expected {', '.join(columns)}")
        # extra fields of a long row land under the key None: ignore them; missing fields read as ""
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _display_names(c: dict, default: list[str]) -> list[str]:
    names = c["class_names"]
    if names is None:
        return list(default)
    if len(names) != len(default):
        raise DataError(f"dataset.class_names has {len(names)} names; expected {len(default)} for dataset "
                        f"{c['name']!r} ({', '.join(default)})")
    return list(names)


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _check_label(value, num_classes: int, image: str, origin: str) -> int:
    if value is None or not 0 <= value < num_classes:
        raise DataError(f"label {value!r} of image {image} (in {origin}) is out of range; expected an integer "
                        f"in [0, {num_classes - 1}]")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
def _isic_split(csv_path: str, key: str, images: str, ext: str) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for line, row in enumerate(_read_csv(csv_path, ["image", *ISIC_CLASSES], key), start=2):
        try:
            vals = [float(row[k]) for k in ISIC_CLASSES]
        except ValueError:
            vals = []
        ones = [i for i, v in enumerate(vals) if v == 1.0]
        if len(ones) != 1 or any(v not in (0.0, 1.0) for v in vals):
            got = ",".join(row[k] for k in ISIC_CLASSES)
            raise DataError(f"{csv_path} line {line} (image {row['image']!r}) has labels [{got}]; expected one-hot "
                            f"0/1 values with exactly one 1 over {','.join(ISIC_CLASSES)}")
        paths.append(os.path.join(images, row["image"] + ext))
        labels.append(ones[0])
    return paths, labels


def read_isic2018(c: dict) -> Source:
    root = _root(c, f"{c['images_dir']}/ and {c['csv']}")
    ext = c["image_ext"] if str(c["image_ext"]).startswith(".") else f".{c['image_ext']}"
    images = _dir(_join(root, c["images_dir"]), "images_dir")
    tr_p, tr_y = _isic_split(_join(root, c["csv"]), "csv", images, ext)
    te_p = te_y = None
    if c["test_csv"]:
        te_images = _dir(_join(root, c["test_images_dir"] or c["images_dir"]), "test_images_dir")
        te_p, te_y = _isic_split(_join(root, c["test_csv"]), "test_csv", te_images, ext)
    source = Source(tr_p, np.asarray(tr_y, np.int64), te_p, None if te_y is None else np.asarray(te_y, np.int64),
                    _display_names(c, ISIC_CLASSES), f"dataset 'isic2018' under {images}")
    return _with_isic_lesions(source, c, root, ext)


def _with_isic_lesions(source: Source, c: dict, root: str, ext: str) -> Source:
    """HAM10000's lesion of each image (`dataset.group_column`, lesion_id), from the ground-truth CSV when it has
    that column, else from `dataset.metadata_csv` (HAM10000_metadata.csv: image_id, lesion_id) under root."""
    column = c["group_column"]
    if not column:
        return source
    lesions: dict[str, str] = {}
    for key in ("csv", "test_csv", "metadata_csv"):
        path = _join(root, c[key]) if c.get(key) else None
        if path and os.path.isfile(path):
            with open(path, newline="", encoding="utf-8-sig") as f:
                for row in csv.DictReader(f):
                    row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                    image = row.get("image") or row.get("image_id")
                    if image and row.get(column):
                        lesions[image] = row[column]
    if not lesions:
        source.grouping = (f"per image: no {column} in {c['csv']} nor {c.get('metadata_csv')} under {root} "
                           "(images of one lesion may sit on both sides of a split)")
        return source

    def groups(paths):
        # an image without a lesion id is a group of its own
        return None if paths is None else [lesions.get(os.path.basename(p)[:-len(ext)] if p.endswith(ext)
                                                        else os.path.basename(p), f"image:{p}") for p in paths]
    source.train_groups, source.test_groups = groups(source.train_paths), groups(source.test_paths)
    source.grouping = f"by {column} ({len(set(source.train_groups))} lesions for {len(source.train_paths)} images)"
    return source


def _aptos_split(csv_path: str, key: str, images: str, ext: str) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for row in _read_csv(csv_path, ["id_code", "diagnosis"], key):
        path = os.path.join(images, row["id_code"] + ext)
        value = _as_int(row["diagnosis"])
        if value is None:
            raise DataError(f"label {row['diagnosis']!r} of image {path} (in {csv_path}) is not an integer; "
                            f"expected a grade in [0, {len(APTOS_CLASSES) - 1}]")
        labels.append(_check_label(value, len(APTOS_CLASSES), path, csv_path))
        paths.append(path)
    return paths, labels


def read_aptos2019(c: dict) -> Source:
    root = _root(c, f"{c['csv']} and {c['images_dir']}/")
    ext = c["image_ext"] if str(c["image_ext"]).startswith(".") else f".{c['image_ext']}"
    images = _join(root, c["images_dir"])
    if not os.path.isdir(images) and c["images_dir"] == "train_images" and os.path.isdir(_join(root, "train")):
        images = _join(root, "train")  # the layout of the official repo (dataset/aptos/train/)
    _dir(images, "images_dir")
    tr_p, tr_y = _aptos_split(_join(root, c["csv"]), "csv", images, ext)
    te_p = te_y = None
    if c["test_csv"]:
        te_images = _dir(_join(root, c["test_images_dir"]) if c["test_images_dir"] else images, "test_images_dir")
        te_p, te_y = _aptos_split(_join(root, c["test_csv"]), "test_csv", te_images, ext)
    return Source(tr_p, np.asarray(tr_y, np.int64), te_p, None if te_y is None else np.asarray(te_y, np.int64),
                  _display_names(c, APTOS_CLASSES), f"dataset 'aptos2019' under {images}")


# ---------------------------------------------------------------------------------------------------------------
def read_pkl(c: dict) -> Source:
    root = _root(c, "the images the list files point to") if c["root"] is not None else None
    remap = c["path_remap"] or {}
    if not isinstance(remap, dict):
        raise DataError(f"dataset.path_remap = {remap!r} is invalid; expected {{from: PREFIX, to: PATH or null}}")
    frm, to = remap.get("from"), remap.get("to")
    to = root if to is None else os.path.expanduser(str(to))

    def image_path(p: str) -> str:
        if frm and to is not None and p.startswith(frm):
            p = os.path.join(to, p[len(frm):])
        return _join(root, p)

    lists = {}
    for key in ("train_list", "test_list"):
        if c[key] is None:
            if key == "train_list":
                raise DataError("dataset.train_list is null; expected the path of the official *_train.pkl list")
            continue
        path = _join(root, c[key])
        lists[key] = (path, load_list_file(path))
    all_labels = [it["label"] for _, items in lists.values() for it in items]
    names = c["class_names"]
    n = c["num_classes"] or (len(names) if names else (max(all_labels) + 1 if all_labels else 0))
    if names is not None and len(names) != n:
        raise DataError(f"dataset.class_names has {len(names)} names; expected num_classes = {n}")
    out = {}
    for key, (path, items) in lists.items():
        paths = [image_path(it["img_root"]) for it in items]
        labels = [_check_label(it["label"], n, p, path) for it, p in zip(items, paths)]
        out[key] = (paths, np.asarray(labels, np.int64))
    te = out.get("test_list", (None, None))
    source = Source(*out["train_list"], *te, list(names) if names else [f"class_{i}" for i in range(n)],
                    f"the list file {lists['train_list'][0]} (check dataset.root and dataset.path_remap)")
    column = c["group_column"]
    if column:  # a key of the list's entries; an entry without it is a group of its own
        def groups(key):
            if key not in lists:
                return None
            return [str(it.get(column) or f"image:{it['img_root']}") for it in lists[key][1]]
        source.train_groups, source.test_groups = groups("train_list"), groups("test_list")
        source.grouping = f"by {column} ({len(set(source.train_groups))} groups)"
    return source


# ---------------------------------------------------------------------------------------------------------------
def _image_files(folder: str) -> list[str]:
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(folder, f))]


def _subdirs(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def read_folder(c: dict) -> Source:
    root = _root(c, f"{c['train_dir']}/<class>/ and {c['test_dir']}/<class>/ image folders")
    train = _join(root, c["train_dir"])
    if not os.path.isdir(train):
        raise DataError(f"train folder not found: {train}; expected {train}/<class>/<image files>")
    found = _subdirs(train)
    if not found:
        raise DataError(f"no class folders in {train}; expected {train}/<class>/<image files>")
    names = list(c["class_names"]) if c["class_names"] else found
    for d in found:
        if d not in names:
            raise DataError(f"class folder {os.path.join(train, d)} is not in dataset.class_names; expected one of: "
                            f"{preview(names)}")

    def split(folder: str) -> tuple[list[str], np.ndarray]:
        paths, labels = [], []
        for i, name in enumerate(names):
            d = os.path.join(folder, name)
            files = _image_files(d) if os.path.isdir(d) else []
            paths += files
            labels += [i] * len(files)
        return paths, np.asarray(labels, np.int64)

    te_p = te_y = None
    test = _join(root, c["test_dir"])
    if os.path.isdir(test):
        for d in _subdirs(test):
            if d not in names:
                raise DataError(f"test class folder {os.path.join(test, d)} names class {d!r}, which is not a "
                                f"training class; expected one of: {preview(names)}")
        te_p, te_y = split(test)
    return Source(*split(train), te_p, te_y, names, f"dataset 'folder' under {root}")


# ---------------------------------------------------------------------------------------------------------------
def read_csv_dataset(c: dict) -> Source:
    if not c["train_csv"]:
        raise DataError("dataset.train_csv is null; expected the path of a CSV with image and label columns")
    root = _root(c, "the images named in the CSV") if c["root"] is not None else None
    cols = [c["image_column"], c["label_column"]]
    tables = {}
    for key in ("train_csv", "test_csv"):
        if c[key]:
            path = _join(root, c[key])
            rows = _read_csv(path, cols, key)
            base = root if root is not None else os.path.dirname(path)
            tables[key] = (path, [_join(base, r[cols[0]]) for r in rows], [r[cols[1]] for r in rows],
                           [r.get(c["group_column"], "") for r in rows] if c["group_column"] else None)
            if c["group_column"] and rows and c["group_column"] not in rows[0]:
                raise DataError(f"CSV {path} lacks the column {c['group_column']!r} (dataset.group_column); "
                                f"found [{preview(list(rows[0]))}]")
    for path, images, raw, _ in tables.values():
        for img, lab in zip(images, raw):
            if lab == "":
                raise DataError(f"empty label for image {img} in {path}; expected a class index or class name")
    as_ints = all(_as_int(v) is not None for _, _, raw, _ in tables.values() for v in raw)
    names = c["class_names"]
    if as_ints:
        top = max((_as_int(v) for _, _, raw, _ in tables.values() for v in raw), default=-1)
        names = list(names) if names else [f"class_{i}" for i in range(top + 1)]
    elif names is None:
        names = sorted(set(tables["train_csv"][2]))
    out = {}
    for key, (path, images, raw, _) in tables.items():
        if as_ints:
            labels = [_check_label(_as_int(v), len(names), img, path) for img, v in zip(images, raw)]
        else:
            index = {n: i for i, n in enumerate(names)}
            for img, v in zip(images, raw):
                if v not in index:
                    raise DataError(f"unknown class name {v!r} for image {img} in {path}; expected one of: "
                                    f"{preview(names, 20)}")
            labels = [index[v] for v in raw]
        out[key] = (images, np.asarray(labels, np.int64))
    te = out.get("test_csv", (None, None))
    source = Source(*out["train_csv"], *te, list(names), f"the CSV {tables['train_csv'][0]}")
    if c["group_column"]:  # an empty cell: the image is a group of its own
        def groups(key):
            if key not in tables:
                return None
            return [g or f"image:{img}" for img, g in zip(tables[key][1], tables[key][3])]
        source.train_groups, source.test_groups = groups("train_csv"), groups("test_csv")
        source.grouping = f"by {c['group_column']} ({len(set(source.train_groups))} groups)"
    return source


READERS = {"isic2018": read_isic2018, "aptos2019": read_aptos2019, "pkl": read_pkl, "folder": read_folder,
           "csv": read_csv_dataset}
