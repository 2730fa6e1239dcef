"""Issue 22: group-aware splits. No lesion (ISIC, HAM10000's lesion_id) and no duplicate image (APTOS, perceptual
hash) sits on two sides of a split, and the membership used is written down (splits.csv)."""
import csv
import shutil

import numpy as np
import pytest
from PIL import Image

import layouts
from diffmic.data import build_splits
from diffmic.data.groups import combine, fingerprint, grouped_carve, near_duplicates
from diffmic.session import LocalSession


def _sides(splits) -> dict[str, set]:
    out = {}
    for row in splits.membership:
        out.setdefault(row["group"], set()).add(row["split"])
    return out


def test_a_grouped_carve_moves_whole_groups_and_stays_stratified():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 3)  # 60 lesions, 3 images each
    labels = np.repeat(rng.integers(0, 3, 60), 3)
    keep, carved = grouped_carve(labels, groups, 0.25, seed=1)
    assert not set(groups[keep]) & set(groups[carved]) and len(keep) + len(carved) == len(labels)
    assert set(labels[carved]) == set(labels)  # every class reaches the carve
    assert abs(len(carved) / len(labels) - 0.25) < 0.1
    same = grouped_carve(labels, None, 0.25, seed=1)
    assert len(same[1]) == round(0.25 * len(labels))  # no groups: the plain stratified carve


def test_duplicates_are_found_by_their_pixels_and_look_alikes_are_not():
    rng = np.random.default_rng(0)
    a = layouts.picture(rng, 0, 5, 64)
    b = layouts.picture(rng, 3, 5, 64)
    alike = layouts.picture(rng, 0, 5, 64)  # the same class: the same disc at about the same place, other noise
    re_encoded = a.resize((60, 60)).resize((64, 64))
    pairs = near_duplicates([fingerprint(x) for x in (a, b, re_encoded, a.copy(), alike)], 4)
    assert (0, 2) in pairs and (0, 3) in pairs and (2, 3) in pairs
    assert not any(1 in p or 4 in p for p in pairs), pairs
    assert list(combine(np.array(["x", "y", "z", "x"]), np.array([0, 1, 0, 3]))) == [0, 1, 0, 0]


@pytest.fixture
def isic_with_lesions(tmp_path):
    root = layouts.isic(tmp_path / "isic", 12, 48, np.random.default_rng(0))
    with open(root / "ISIC2018_Task3_Training_GroundTruth.csv") as f:
        images = [row["image"] for row in csv.DictReader(f)]
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:  # 3 images per lesion, as HAM10000 often has
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx"])
        writer.writerows([[f"HAM_{i // 3:07d}", image, "x"] for i, image in enumerate(images)])
    return root


def test_no_lesion_crosses_a_split_and_the_membership_is_written(isic_with_lesions, tmp_path):
    cfg = {"name": "isic2018", "root": str(isic_with_lesions), "image_size": 48, "cache": False}
    splits = build_splits(cfg, seed=0)
    sides = _sides(splits)
    assert len(sides) == 28 and all(len(s) == 1 for s in sides.values()), sides
    assert "by lesion_id (28 lesions for 84 images)" in splits.grouping
    for carve in (1, 2):  # the finalists' validation re-carves keep groups whole too
        again = build_splits({**cfg, "val_carve": carve}, seed=0)
        assert all(len(s) == 1 for s in _sides(again).values())
        assert [r for r in again.membership if r["split"] == "test"] == \
            [{**r, "carve": carve} for r in splits.membership if r["split"] == "test"]
    per_image = build_splits({**cfg, "group_column": None}, seed=0)
    assert any(len(s) > 1 for s in _sides(per_image).values()) or per_image.membership[0]["group"] == ""
    session = LocalSession(tmp_path / "run")
    session.start({"dataset": cfg})
    session.write_splits(splits.membership)
    with open(tmp_path / "run" / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 84 and set(rows[0]) == {"image", "group", "split", "carve"}
    assert rows[0]["image"].startswith("images/")  # relative to the root: the same on every node


def test_aptos_duplicates_go_together(tmp_path):
    root = layouts.aptos(tmp_path / "aptos", 8, 48, np.random.default_rng(1))
    with open(root / "train.csv") as f:
        rows = list(csv.reader(f))
    extra = []
    for i, (code, grade) in enumerate(rows[1:9]):  # 8 images uploaded twice: once byte for byte, once re-saved
        shutil.copy(root / "train_images" / f"{code}.png", root / "train_images" / f"dup{i}.png")
        Image.open(root / "train_images" / f"{code}.png").resize((44, 44)).save(root / "train_images" / f"re{i}.png")
        extra += [[f"dup{i}", grade], [f"re{i}", grade]]
    with open(root / "train.csv", "a", newline="") as f:
        csv.writer(f).writerows(extra)
    splits = build_splits({"name": "aptos2019", "root": str(root), "image_size": 48, "cache": False}, seed=0)
    sides = _sides(splits)
    assert all(len(s) == 1 for s in sides.values())
    assert "duplicates merged: 16 image(s)" in splits.grouping


def test_a_generated_dataset_writes_its_membership_too():
    """The synthetic set has no files, yet its split is written like any other (each image by stream and index)."""
    from helpers import TINY, compose
    cfg = compose(TINY)
    data = build_splits(cfg["dataset"], seed=0)
    sides = {r["image"]: r["split"] for r in data.membership if r["split"] != "test"}
    assert len(sides) == len(data.train) + len(data.val)  # no image on both train and val
    assert sum(r["split"] == "test" for r in data.membership) == len(data.test)
