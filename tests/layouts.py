"""Tiny datasets generated in the exact layouts of the real ones, for the real-path tests.

ISIC2018 Task 3 (images/ISIC_*.jpg + the one-hot ground-truth CSV with float values), APTOS2019 (train.csv with
id_code,diagnosis + train_images/*.png), the official DiffMIC list files of both (pickled [{'img_root', 'label'}]
with the official ./dataset/isic2018/ and ./dataset/aptos/ prefixes, beside images/ and train/), an ImageFolder tree
(train/<class>/, test/<class>/) and a CSV with image paths and class names. Class k is a coloured disc at a
class-specific place on a noisy background, so a few epochs learn it.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

ISIC = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def picture(rng: np.random.Generator, k: int, classes: int, size: int) -> Image.Image:
    a = rng.normal(110, 25, (size, size, 3))
    r = size // 5
    cy = int((0.25 + 0.5 * (k % 2)) * size) + rng.integers(-2, 3)
    cx = int((0.15 + 0.7 * k / max(classes - 1, 1)) * size) + rng.integers(-2, 3)
    yy, xx = np.ogrid[:size, :size]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    a[disc] = np.array([60 + 25 * k, 200 - 20 * k, 90 + 15 * (k % 3)]) + rng.normal(0, 10, (disc.sum(), 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _split_lists(rng, items: list[dict], folder: Path, stem: str) -> None:
    order = rng.permutation(len(items))
    cut = int(0.7 * len(items))  # the official 70/30 split
    with open(folder / f"{stem}_train.pkl", "wb") as f:
        pickle.dump([items[i] for i in order[:cut]], f)
    with open(folder / f"{stem}_test.pkl", "wb") as f:
        pickle.dump([items[i] for i in order[cut:]], f)


def isic(root: Path, per_class: int, size: int, rng) -> Path:
    """root/images/ISIC_00xxxxx.jpg, the ground-truth CSV, and the official lists isic2018_{train,test}.pkl."""
    (root / "images").mkdir(parents=True)
    rows, items = [], []
    for k in range(len(ISIC)):
        for _ in range(per_class):
            name = f"ISIC_{24306 + len(rows):07d}"
            picture(rng, k, len(ISIC), size).save(root / "images" / f"{name}.jpg", quality=92)
            rows.append([name, *("1.0" if j == k else "0.0" for j in range(len(ISIC)))])
            items.append({"img_root": f"./dataset/isic2018/images/{name}.jpg", "label": k})
    with open(root / "ISIC2018_Task3_Training_GroundTruth.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", *ISIC], *rows])
    _split_lists(rng, items, root, "isic2018")
    return root


def aptos(root: Path, per_class: int, size: int, rng) -> Path:
    """root/train.csv (id_code,diagnosis), root/train_images/<id>.png; the official lists aptos_{train,test}.pkl point
    at ./dataset/aptos/train/<id>.png, so root/train/ holds the same images for them (the official repo's layout)."""
    (root / "train_images").mkdir(parents=True)
    rows, items = [], []
    for k in range(5):
        for _ in range(per_class):
            code = f"{(len(rows) * 2654435761) % 16**12:012x}"
            picture(rng, k, 5, size).save(root / "train_images" / f"{code}.png")
            rows.append([code, k])
            items.append({"img_root": f"./dataset/aptos/train/{code}.png", "label": k})
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id_code", "diagnosis"], *rows])
    (root / "train").symlink_to("train_images")
    _split_lists(rng, items, root, "aptos")
    return root


def folder(root: Path, per_class: int, size: int, rng, classes=("benign", "malignant", "normal")) -> Path:
    for split, n in (("train", per_class), ("test", max(2, per_class // 3))):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                picture(rng, k, len(classes), size).save(root / split / name / f"{name}_{i:03d}.png")
    return root


def csv_table(root: Path, per_class: int, size: int, rng, classes=("grade_a", "grade_b", "grade_c")) -> Path:
    """root/train.csv with columns image,label (relative paths, class names) and root/scans/*.jpg."""
    (root / "scans").mkdir(parents=True)
    rows = []
    for k, name in enumerate(classes):
        for i in range(per_class):
            rel = f"scans/{name}_{i:03d}.jpg"
            picture(rng, k, len(classes), size).save(root / rel, quality=92)
            rows.append([rel, name])
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label"], *rows])
    return root


def write_all(out: Path, per_class: int = 12, size: int = 48) -> dict[str, Path]:
    """Every layout under `out`: {'isic', 'aptos', 'folder', 'csv'} -> its root."""
    rng = np.random.default_rng(0)
    return {"isic": isic(out / "isic", per_class, size, rng), "aptos": aptos(out / "aptos", per_class, size, rng),
            "folder": folder(out / "folder", per_class, size, rng), "csv": csv_table(out / "csv", per_class, size, rng)}
