"""Data layer: loaders for every source format, splits, transforms, synthetic set, and bad input -> DataError."""
from __future__ import annotations

import collections
import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmic.data import DataError, DataSplits, build_splits, eval_transform, load_image
from diffmic.data.config import resolve_config
from diffmic.data.safe_pickle import load_list_file
from diffmic.data.sources import APTOS_CLASSES, ISIC_CLASSES
from diffmic.data.splits import stratified_carve
from diffmic.data.transforms import CenterSquareCrop, train_transform
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
S = 32  # image_size used with the file fixtures


# ------------------------------------------------------------------ fixture writers (tiny images, made per test)
def write_image(path: Path, label: int = 0, size=(24, 18)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[..., label % 3] = 200
    Image.fromarray(arr).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_isic(root: Path, per_class: int = 10, csv_name="ISIC2018_Task3_Training_GroundTruth.csv") -> Path:
    rows = []
    for i in range(per_class * 7):
        name, label = f"ISIC_{i:07d}", i % 7
        write_image(root / "images" / f"{name}.jpg", label)
        rows.append([name] + [f"{float(j == label):.1f}" for j in range(7)])
    write_csv(root / csv_name, ["image", *ISIC_CLASSES], rows)
    return root


def make_aptos(root: Path, per_class: int = 8, folder: str = "train") -> Path:
    rows = []
    for i in range(per_class * 5):
        code = f"{i:04x}abcd"
        write_image(root / folder / f"{code}.png", i % 5)
        rows.append([code, i % 5])
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    return root


def make_folder(root: Path, classes=("cat", "dog", "eel"), n_train=8, n_test=3) -> Path:
    for ci, c in enumerate(classes):
        for i in range(n_train):
            write_image(root / "train" / c / f"{c}{i}.png", ci)
        for i in range(n_test):
            write_image(root / "test" / c / f"{c}{i}.jpg", ci)
    return root


def make_pkl(tmp: Path, n_train=24, n_test=9, classes=3) -> tuple[Path, Path, Path]:
    root = tmp / "isic_data"
    lists = {}
    for split, n in (("train", n_train), ("test", n_test)):
        items = []
        for i in range(n):
            write_image(root / "images" / f"{split}_{i}.png", i % classes)
            items.append({"img_root": f"./dataset/isic2018/images/{split}_{i}.png", "label": i % classes})
        lists[split] = tmp / f"isic2018_{split}.pkl"
        lists[split].write_bytes(pickle.dumps(items))
    return root, lists["train"], lists["test"]


def make_named_csv(root: Path, names=("benign", "malignant", "nevus"), n_train=9, n_test=3) -> Path:
    tr, te = [], []
    for i in range(n_train * len(names)):
        name = names[i % len(names)]
        write_image(root / "imgs" / f"a{i}.png", i % len(names))
        tr.append([f"imgs/a{i}.png", name])
    for i in range(n_test * len(names)):
        write_image(root / "imgs" / f"b{i}.png", i % len(names))
        te.append([str(root / "imgs" / f"b{i}.png"), names[i % len(names)]])  # absolute paths work too
    write_csv(root / "train.csv", ["image", "label"], tr)
    write_csv(root / "test.csv", ["image", "label"], te)
    return root


def paths(ds) -> list[str]:
    return list(ds.paths)


def assert_valid_splits(s: DataSplits, size: int = S) -> None:
    for name in ("train", "val", "test"):
        ds = getattr(s, name)
        assert isinstance(ds.labels, np.ndarray) and ds.labels.dtype == np.int64 and len(ds.labels) == len(ds)
        x, y = ds[0]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert isinstance(y, int) and y == ds.labels[0] and 0 <= y < s.num_classes
    if hasattr(s.train, "paths"):
        tr, va, te = set(paths(s.train)), set(paths(s.val)), set(paths(s.test))
        assert not tr & va and not tr & te and not va & te


# ------------------------------------------------------------------ loaders
def test_isic_csv_carves_test_and_val(tmp_path):
    root = make_isic(tmp_path / "isic")
    cfg = {"name": "isic2018", "root": str(root), "image_size": S}
    s = build_splits(cfg)
    assert s.class_names == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"] and s.num_classes == 7
    assert (len(s.train), len(s.val), len(s.test)) == (42, 7, 21)  # 70 -> test 21 -> val round(.15*49)=7
    assert s.class_counts()["val"] == [1] * 7 and s.class_counts()["test"] == [3] * 7
    for ds in (s.train, s.val, s.test):  # label = index of the one-hot column
        for p, y in zip(ds.paths, ds.labels):
            assert int(Path(p).stem.split("_")[1]) % 7 == y and p.endswith(".jpg")
    assert_valid_splits(s)
    again = build_splits(cfg)
    assert paths(again.val) == paths(s.val) and paths(again.test) == paths(s.test)
    other = build_splits({**cfg, "split_seed": 1})
    assert paths(other.val) != paths(s.val) and paths(other.test) != paths(s.test)
    # another validation carve (finalists with search.repeat_mode=folds): val moves, stratified; test stays
    fold = build_splits({**cfg, "val_carve": 1})
    assert paths(fold.test) == paths(s.test) and paths(fold.val) != paths(s.val)
    assert fold.class_counts()["val"] == [1] * 7 and not set(paths(fold.val)) & set(paths(fold.train))
    assert build_splits({**cfg, "val_carve": 0}).val.paths == s.val.paths  # 0 is the usual carve
    with pytest.raises(DataError, match=r"dataset.val_carve = -1 is invalid; expected an integer >= 0"):
        build_splits({**cfg, "val_carve": -1})
    names = [type(t).__name__ for t in s.train.transform.transforms]
    assert "RandomHorizontalFlip" in names and "RandomVerticalFlip" not in names  # ISIC: H-flip only


def test_isic_separate_test_csv(tmp_path):
    root = make_isic(tmp_path / "isic")
    make_isic(tmp_path / "isic", per_class=2, csv_name="test.csv")  # reuses the first 14 images as a test list
    s = build_splits({"name": "isic2018", "root": str(root), "image_size": S, "test_csv": "test.csv",
                      "verify_images": False})
    assert len(s.test) == 14 and len(s.train) + len(s.val) == 70


def test_aptos_csv_train_folder_fallback_and_vflip(tmp_path):
    root = make_aptos(tmp_path / "aptos")  # images in train/ (official layout), not train_images/
    s = build_splits({"name": "aptos2019", "root": str(root), "image_size": S})
    assert s.class_names == APTOS_CLASSES and s.class_names[4].startswith("4")
    assert len(s.test) == 12 and len(s.train) + len(s.val) == 28 and set(s.val.labels) == set(range(5))
    assert all(Path(p).parent.name == "train" for p in s.train.paths)
    names = [type(t).__name__ for t in s.train.transform.transforms]
    assert "RandomVerticalFlip" in names and "RandomHorizontalFlip" in names and "RandomRotation" in names
    assert "RandomVerticalFlip" not in [type(t).__name__ for t in s.val.transform.transforms]
    assert_valid_splits(s)


def test_official_pkl_lists_with_path_remap(tmp_path):
    root, tr, te = make_pkl(tmp_path)
    s = build_splits({"name": "pkl", "root": str(root), "train_list": str(tr), "test_list": str(te),
                      "image_size": S})
    assert s.class_names == ["class_0", "class_1", "class_2"]
    assert len(s.test) == 9 and len(s.train) + len(s.val) == 24
    assert all(p.startswith(str(root)) for p in s.test.paths)
    assert Path(s.test.paths[4]).name == "test_4.png" and s.test.labels[4] == 1
    assert_valid_splits(s)
    named = build_splits({"name": "pkl", "root": str(root), "train_list": str(tr), "image_size": S,
                          "class_names": ["a", "b", "c"], "path_remap": {"from": "./dataset/isic2018/", "to": None}})
    assert named.class_names == ["a", "b", "c"] and len(named.test) == round(0.3 * 24)


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "f")
    s = build_splits({"name": "folder", "root": str(root), "image_size": S})
    assert s.class_names == ["cat", "dog", "eel"]
    assert len(s.test) == 9 and s.class_counts()["test"] == [3, 3, 3]
    assert len(s.val) == 4 and set(s.val.labels) == {0, 1, 2}  # round(.15 * 24) = 4, every class present
    for ds in (s.train, s.val, s.test):
        for p, y in zip(ds.paths, ds.labels):
            assert Path(p).parent.name == s.class_names[y]
    assert_valid_splits(s)


def test_generic_csv_with_class_names(tmp_path):
    root = make_named_csv(tmp_path / "c")
    cfg = {"name": "csv", "root": str(root), "train_csv": "train.csv", "test_csv": "test.csv", "image_size": S}
    s = build_splits(cfg)
    assert s.class_names == ["benign", "malignant", "nevus"]
    assert len(s.test) == 9 and len(s.train) + len(s.val) == 27 and set(s.val.labels) == {0, 1, 2}
    assert_valid_splits(s)
    fixed = build_splits({**cfg, "class_names": ["nevus", "malignant", "benign"]})
    assert fixed.test.labels.tolist() == [2, 1, 0] * 3
    # no root: paths relative to the CSV's folder; no test_csv: carve it
    s2 = build_splits({"name": "csv", "train_csv": str(root / "train.csv"), "image_size": S, "split_seed": 3})
    assert len(s2.test) == 8 and len(s2.train) + len(s2.val) == 19


def test_dataloader_workers_and_pickling(tmp_path):
    root = make_folder(tmp_path / "f")
    s = build_splits({"name": "folder", "root": str(root), "image_size": S})
    loader = torch.utils.data.DataLoader(s.val, batch_size=4, num_workers=2)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, S, S) and y.tolist() == s.val.labels[:4].tolist()
    # a fresh interpreter (like a Ray worker) unpickles the splits without importing anything first
    code = "import pickle,sys; s=pickle.load(sys.stdin.buffer); print(tuple(s.test[0][0].shape), s.num_classes)"
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(s), capture_output=True, check=True)
    assert out.stdout.decode().split() == ["(3,", f"{S},", f"{S})", "3"]


# ------------------------------------------------------------------ synthetic
def test_synthetic_default_deterministic_balanced():
    s = build_splits({"name": "synthetic"})
    assert s.num_classes == 4 and len(s.class_names) == 4
    assert (len(s.train), len(s.val), len(s.test)) == (680, 120, 240)
    assert s.class_counts() == {"train": [170] * 4, "val": [30] * 4, "test": [60] * 4}
    x, y = s.test[7]
    assert x.shape == (3, 64, 64) and y == 3
    assert torch.equal(build_splits({"name": "synthetic"}).test[7][0], x)
    assert not torch.equal(build_splits({"name": "synthetic", "seed": 1}).test[7][0], x)
    torch.manual_seed(0)
    a = s.train[3][0]
    torch.manual_seed(0)
    assert torch.equal(s.train[3][0], a)
    assert not set(s.train.indices.tolist()) & set(s.val.indices.tolist())
    other = build_splits({"name": "synthetic", "split_seed": 5})
    assert other.val.indices.tolist() != s.val.indices.tolist()


def test_synthetic_knobs():
    s = build_splits({"name": "synthetic", "num_classes": 7, "num_train": 70, "num_test": 14, "image_size": 48,
                      "val_fraction": 0.2})
    assert s.num_classes == 7 and len(s.val) == 14 and set(s.val.labels) == set(range(7))
    assert s.train[0][0].shape == (3, 48, 48)


# ------------------------------------------------------------------ splits and transforms
def test_stratified_carve():
    labels = np.array([0] * 20 + [1] * 6 + [2] * 2 + [3])
    keep, carved = stratified_carve(labels, 0.25, seed=0)
    assert sorted(keep.tolist() + carved.tolist()) == list(range(len(labels)))
    assert set(labels[carved]) == {0, 1, 2} and 3 in labels[keep]  # singleton class stays in keep
    assert all((labels[keep] == c).sum() >= 1 for c in range(4))
    assert abs(len(carved) - 0.25 * len(labels)) <= 1
    assert np.array_equal(stratified_carve(labels, 0.25, seed=0)[1], carved)
    assert not np.array_equal(stratified_carve(labels, 0.25, seed=1)[1], carved)


def test_transforms_and_load_image(tmp_path):
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, 5:35] = 255  # the centre 30x30 square is white, the outer 5-px bands black
    img = Image.fromarray(arr)
    assert CenterSquareCrop()(img).size == (30, 30) and np.asarray(CenterSquareCrop()(img)).min() == 255
    x = eval_transform(S)(img)
    assert x.shape == (3, S, S)
    white = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[:, 0, 0], white, atol=1e-4)
    plain = train_transform(S, hflip=False, vflip=False, rotation=0)
    assert torch.equal(plain(img), x)
    black = -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    torch.manual_seed(0)
    rotated = [train_transform(S, rotation=30)(img) for _ in range(8)]
    assert any(torch.allclose(r[:, 0, 0], black, atol=1e-4) for r in rotated)  # black corners, no expand
    gray = tmp_path / "g.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gray)
    assert load_image(gray).mode == "RGB"


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0 .. 64512 over the 16-bit range
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # what PIL makes of a 16-bit grey PNG
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))  # not 255 almost everywhere
    assert (rgb == 255).mean() < 0.05


def test_transforms_match_torchvision():
    """The data path's own transforms give exactly torchvision's tensors, random draws included."""
    from diffmic.compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    bilinear = InterpolationMode.BILINEAR
    reference = T.Compose([CenterSquareCrop(), T.Resize((S, S), interpolation=bilinear), T.RandomHorizontalFlip(0.5),
                           T.RandomVerticalFlip(0.5), T.RandomRotation(30.0, interpolation=bilinear, fill=0),
                           T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ours = train_transform(S, hflip=True, vflip=True, rotation=30)
    for seed in range(6):
        torch.manual_seed(seed)
        expected = reference(img)
        torch.manual_seed(seed)
        assert torch.equal(ours(img), expected), seed
    assert torch.equal(eval_transform(S)(img), T.Compose([*reference.transforms[:2], *reference.transforms[-2:]])(img))


def test_a_few_keys_get_the_rest_from_the_dataset_yaml():
    yaml = pytest.importorskip("yaml")
    configs = Path(__file__).parents[1] / "configs" / "dataset"
    aptos = resolve_config({"name": "aptos2019", "root": "/data/aptos"})
    assert aptos == resolve_config({**yaml.safe_load((configs / "aptos2019.yaml").read_text()), "root": "/data/aptos"})
    assert aptos["augment"]["vflip"] and aptos["csv"] == "train.csv"  # what the file says
    for f in sorted(configs.glob("*_pkl.yaml")):  # the official lists of a dataset: the pkl reader, its settings
        d = yaml.safe_load(f.read_text())
        assert d["name"] == "pkl" and resolve_config(d)["class_names"], f


# ------------------------------------------------------------------ bad input -> one-line DataError
def raises(cfg_or_fn, *needles):
    with pytest.raises(DataError) as e:
        cfg_or_fn() if callable(cfg_or_fn) else build_splits(cfg_or_fn)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def test_bad_config_values():
    raises({"name": "imagenet"}, "'imagenet'", "synthetic", "isic2018", "aptos2019", "pkl", "folder", "csv")
    for v in (0, 0.0, 1, 1.5, -0.1):
        raises({"name": "synthetic", "val_fraction": v}, "val_fraction", repr(v))
    raises({"name": "synthetic", "test_fraction": 0}, "test_fraction", "0")
    raises({"name": "synthetic", "image_size": 16}, "image_size", "16", "32")
    raises({"name": "synthetic", "num_classes": 99}, "num_classes", "99")
    raises({"name": "synthetic", "augment": {"rotation": "lots"}}, "rotation", "lots")
    raises({"name": "synthetic", "std": [0.2, 0.0, 0.2]}, "std")
    raises({"name": "synthetic", "num_train": 2, "num_classes": 2}, "val", "empty")
    raises({"name": "synthetic", "num_train": 3, "num_classes": 4}, "'3_hollow_square'", "no training example")


def test_missing_paths(tmp_path):
    raises({"name": "isic2018", "root": str(tmp_path / "nope")}, str(tmp_path / "nope"))
    raises({"name": "isic2018", "root": None}, "dataset.root")
    root = make_isic(tmp_path / "isic", per_class=4)
    raises({"name": "isic2018", "root": str(root), "csv": "gt.csv"}, "gt.csv")
    raises({"name": "isic2018", "root": str(root), "images_dir": "imgs"}, str(root / "imgs"))
    for i in (0, 3, 5):
        (root / "images" / f"ISIC_{i:07d}.jpg").unlink()
    raises({"name": "isic2018", "root": str(root), "image_size": S}, "ISIC_0000000.jpg", "2 other")
    raises({"name": "pkl", "root": str(root), "train_list": "missing_train.pkl"}, "missing_train.pkl")
    raises({"name": "folder", "root": str(root)}, str(root / "train"))
    raises({"name": "csv", "root": str(root), "train_csv": "t.csv"}, "t.csv")


def test_corrupt_image(tmp_path):
    root = make_folder(tmp_path / "f")
    bad = root / "train" / "dog" / "dog3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    (root / "test" / "cat" / "cat1.jpg").write_bytes(b"not a jpeg at all")
    msg = raises({"name": "folder", "root": str(root), "image_size": S}, "1 other")
    assert "dog3.png" in msg or "cat1.jpg" in msg
    s = build_splits({"name": "folder", "root": str(root), "image_size": S, "verify_images": False})
    assert len(s.test) == 9  # existence is still checked, decoding is not
    raises(lambda: load_image(bad), "dog3.png")
    raises(lambda: load_image(tmp_path / "absent.png"), "absent.png")


def test_bad_labels(tmp_path):
    root = make_aptos(tmp_path / "aptos", per_class=2)
    rows = list(csv.reader(open(root / "train.csv")))
    rows[3][1] = "7"
    write_csv(root / "train.csv", rows[0], rows[1:])
    raises({"name": "aptos2019", "root": str(root)}, "7", rows[3][0], "[0, 4]")
    rows[3][1] = "severe"
    write_csv(root / "train.csv", rows[0], rows[1:])
    raises({"name": "aptos2019", "root": str(root)}, "'severe'", rows[3][0])

    iroot = make_isic(tmp_path / "isic", per_class=1)
    rows = list(csv.reader(open(iroot / "ISIC2018_Task3_Training_GroundTruth.csv")))
    rows[2][1:] = ["1.0"] * 7
    write_csv(iroot / "ISIC2018_Task3_Training_GroundTruth.csv", rows[0], rows[1:])
    raises({"name": "isic2018", "root": str(iroot)}, "ISIC_0000001", "one-hot")

    proot, tr, te = make_pkl(tmp_path / "p")
    pkl = {"name": "pkl", "root": str(proot), "train_list": str(tr)}
    raises({**pkl, "num_classes": 2}, "label 2", "train_2.png", "[0, 1]")
    raises({**pkl, "class_names": ["a", "b"]}, "label 2", "[0, 1]")
    raises({**pkl, "class_names": ["a", "b"], "num_classes": 3}, "class_names", "3")

    croot = make_named_csv(tmp_path / "c")
    cfg = {"name": "csv", "root": str(croot), "train_csv": "train.csv", "test_csv": "test.csv"}
    rows = list(csv.reader(open(croot / "test.csv")))
    rows[2][1] = "melanoma"
    write_csv(croot / "test.csv", rows[0], rows[1:])
    raises(cfg, "'melanoma'", "benign", "malignant", "nevus")
    raises({**cfg, "test_csv": None, "class_names": ["benign", "malignant"]}, "'nevus'", "benign")
    write_csv(croot / "ints.csv", ["image", "label"], [[f"imgs/a{i}.png", i % 3 * 2] for i in range(9)])
    raises({**cfg, "train_csv": "ints.csv", "test_csv": None}, "'class_1'", "no training example")
    raises({**cfg, "train_csv": "ints.csv", "test_csv": None, "class_names": ["a", "b", "c", "d"]}, "4", "[0, 3]")


def test_bad_folders(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "train" / "fox").mkdir()
    raises({"name": "folder", "root": str(root)}, "'fox'", "no training example")
    (root / "train" / "fox").rmdir()
    write_image(root / "test" / "yak" / "y.png")
    raises({"name": "folder", "root": str(root)}, "'yak'", "not a training class")
    empty = make_folder(tmp_path / "g", n_test=0)
    for c in ("cat", "dog"):
        (empty / "test" / c).mkdir(parents=True)
    raises({"name": "folder", "root": str(empty)}, "test split is empty")
    one = make_folder(tmp_path / "one", classes=("cat",))  # nothing to classify: every metric would read 1.000
    raises({"name": "folder", "root": str(one)}, "1 class ('cat')", "expected at least 2")


@pytest.mark.timeout(60)
def test_list_file_bombs_give_one_line(tmp_path):
    shared = []
    for _ in range(60):  # 2**60 elements when walked, a few hundred bytes on disk (the memo shares them)
        shared = [shared, shared]
    bomb = tmp_path / "bomb.pkl"
    bomb.write_bytes(pickle.dumps([shared]))
    assert bomb.stat().st_size < 1000
    raises(lambda: load_list_file(bomb), "item 0 is a list of 2 items")
    deep = tmp_path / "deep.pkl"  # a 100 000-deep list, written by hand (Python's pickler would recurse)
    deep.write_bytes(b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")
    raises(lambda: load_list_file(deep), "item 0 is a list of 1 items")
    big = tmp_path / "big.pkl"
    with big.open("wb") as f:
        f.truncate((64 << 20) + 1)
    raises(lambda: load_list_file(big), "at most 67108864 bytes")


def test_restricted_unpickler(tmp_path):
    od = tmp_path / "od.pkl"
    od.write_bytes(pickle.dumps([collections.OrderedDict(img_root="x.png", label=0)]))
    raises(lambda: load_list_file(od), "collections.OrderedDict", str(od))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([{"img_root": "x.png", "label": Evil()}]))
    raises(lambda: load_list_file(evil), "system", "not allowed")
    assert not marker.exists()
    raises({"name": "pkl", "train_list": str(evil)}, "evil.pkl")

    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"img_root": "x.png", "label": 0}))
    raises(lambda: load_list_file(wrong), "dict", "list of dicts")
    badlab = tmp_path / "badlab.pkl"
    badlab.write_bytes(pickle.dumps([{"img_root": "x.png", "label": "0"}]))
    raises(lambda: load_list_file(badlab), "item 0")
    ok = tmp_path / "ok.pkl"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        ok.write_bytes(pickle.dumps([{"img_root": "a.png", "label": 1}], protocol=protocol))
        assert load_list_file(ok) == [{"img_root": "a.png", "label": 1}]
