"""The loader's fast path: prepared images (diffmic/data/prepared.py) and the DataLoader worker count (engine)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.config import ConfigError, validate_config
from diffmic.data import DataError, ImageListDataset, build_splits, eval_transform, load_image, train_transform
from diffmic.data import prepared
from diffmic.data.prepared import PreparedImages
from diffmic.engine import loader_workers

ROOT = Path(__file__).resolve().parents[1]
S = 32  # image_size: the tiny sources below are 64x48


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIFFMIC_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache" / "prepared"


def write_images(folder: Path, seed: int = 0, prefix: str = "") -> list[str]:
    """A JPEG, an RGB PNG and a grey PNG of 64x48 with random pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{n}" for n in ("a.jpg", "b.png", "c.png")]
    pixels = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels[0]).save(paths[0], quality=90)
    Image.fromarray(pixels[1]).save(paths[1])
    Image.fromarray(pixels[2, ..., 0]).save(paths[2])
    return [str(p) for p in paths]


def entries(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.npy")}


def tensors(dataset, seeds=range(4)) -> list[torch.Tensor]:
    """Every item under each seed: the same seed before each read gives the same flips and angle."""
    out = []
    for seed in seeds:
        for i in range(len(dataset)):
            torch.manual_seed(seed)
            out.append(dataset[i][0])
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("transform", [train_transform(S, hflip=True, vflip=True, rotation=30), eval_transform(S)],
                         ids=["train", "eval"])
def test_cached_tensors_are_the_uncached_ones(tmp_path, node_cache, transform):
    paths = write_images(tmp_path / "img")
    labels = [0, 1, 0]
    today = tensors(ImageListDataset(paths, labels, transform))  # the file decoded in full, every step in the transform
    prepared = tensors(ImageListDataset(paths, labels, transform, PreparedImages(S)))
    reader = PreparedImages(S, cache=True)
    cached = ImageListDataset(paths, labels, transform, reader)
    first, again = tensors(cached, seeds=[0]), tensors(cached)
    assert (reader.misses, reader.hits) == (3, 12) and len(entries(node_cache)) == 3
    assert all(np.load(e, allow_pickle=False).shape == (S, S, 3) for e in node_cache.rglob("*.npy"))  # plain .npy
    assert same(prepared, today) and same(again, today) and same(first, today[:3])
    # draft decoding: its own entries, the same tensors cached or not
    draft = ImageListDataset(paths, labels, transform, PreparedImages(S, jpeg_draft=True, cache=True))
    assert same(tensors(draft), tensors(ImageListDataset(paths, labels, transform, PreparedImages(S, True))))
    assert len(entries(node_cache)) == 6 and {Path(k).parts[0] for k in entries(node_cache)} == {"v1-32-full",
                                                                                                  "v1-32-draft"}


def test_draft_decoding_keeps_the_short_side_at_least_the_target(tmp_path):
    Image.fromarray(np.full((192, 256, 3), 90, np.uint8)).save(tmp_path / "big.jpg")
    assert load_image(tmp_path / "big.jpg").size == (256, 192)
    assert load_image(tmp_path / "big.jpg", min_size=48).size == (64, 48)  # 1/4: 1/8 would leave 24 < 48
    assert load_image(tmp_path / "big.jpg", min_size=96).size == (128, 96)
    assert load_image(tmp_path / "big.jpg", min_size=100).size == (256, 192)  # 1/2 would leave 96 < 100
    Image.fromarray(np.full((192, 256, 3), 90, np.uint8)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", min_size=48).size == (256, 192)  # PNG has no reduced decode


def test_a_changed_source_is_prepared_again(tmp_path, node_cache, monkeypatch):
    paths = write_images(tmp_path / "img")
    transform = train_transform(S, hflip=True, vflip=False, rotation=30)
    reader = PreparedImages(S, cache=True)
    cached = ImageListDataset(paths, [0, 1, 0], transform, reader)
    old = tensors(cached)
    assert not reader._hashes  # files written moments ago are hashed on every read: their stamps may not move yet
    monkeypatch.setattr(prepared, "RACY_S", -1.0)
    tensors(cached)
    assert sorted(reader._hashes) == sorted(paths)  # now remembered with their size, inode, mtime and ctime

    later = time.time() + 5  # as a file system stamps a later write
    for path in paths[:2]:
        Image.open(path).transpose(Image.FLIP_TOP_BOTTOM).save(path)
        os.utime(path, (later, later))
    new = tensors(cached)
    expected = tensors(ImageListDataset(paths, [0, 1, 0], transform))
    assert same(new, expected) and not torch.equal(new[0], old[0]) and not torch.equal(new[1], old[1])
    assert len(entries(node_cache)) == 5  # two new entries; the old ones are never read again
    assert same(tensors(ImageListDataset(paths, [0, 1, 0], transform, PreparedImages(S, cache=True))), expected)


def test_a_damaged_or_unwritable_cache_never_changes_a_tensor(tmp_path, node_cache, monkeypatch):
    paths = write_images(tmp_path / "img")
    transform = eval_transform(S)
    expected = tensors(ImageListDataset(paths, [0, 1, 0], transform), seeds=[0])
    reader = PreparedImages(S, cache=True)
    tensors(ImageListDataset(paths, [0, 1, 0], transform, reader), seeds=[0])
    truncated, foreign, _ = sorted(node_cache.rglob("*.npy"))
    truncated.write_bytes(truncated.read_bytes()[:100])
    np.save(foreign, np.zeros((2, 2, 3), np.uint8))
    fresh = PreparedImages(S, cache=True)
    assert same(tensors(ImageListDataset(paths, [0, 1, 0], transform, fresh), seeds=[0]), expected)
    assert fresh.misses == 2 and fresh.hits == 1  # the two bad entries were rewritten
    assert PreparedImages(S, cache=True)(paths[0]).tobytes() == fresh(paths[0]).tobytes()

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DIFFMIC_CACHE", str(tmp_path / "a-file"))  # the cache's folder cannot be made
    unwritable = PreparedImages(S, cache=True)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        got = tensors(ImageListDataset(paths, [0, 1, 0], transform, unwritable), seeds=[0, 1])
    assert same(got, expected * 2)
    with pytest.raises(DataError, match="image file not found: .*absent.png"):
        unwritable(str(tmp_path / "absent.png"))


TRIAL = """
import json, sys
from diffmic.data import build_splits
splits = build_splits({"name": "folder", "root": sys.argv[1], "image_size": 32, "verify_images": False})
reader, items = splits.train.reader, 0
for ds in (splits.train, splits.val, splits.test):
    for i in range(len(ds)):
        ds[i]
        items += 1
print(json.dumps({"hits": reader.hits, "misses": reader.misses, "items": items}))
"""


def test_two_trials_on_a_node_share_the_cache(tmp_path, node_cache):
    """Two processes (two trials' loaders) with the node's DIFFMIC_CACHE: the second prepares nothing."""
    root = tmp_path / "folder"
    for k, name in enumerate(("cat", "dog")):
        for j in range(5):
            write_images(root / "train" / name, seed=10 * k + j, prefix=f"{j}-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def trial() -> dict:
        out = subprocess.run([sys.executable, "-c", TRIAL, str(root)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = trial()
    written = entries(node_cache)
    assert first["items"] == 30 and (first["hits"], first["misses"]) == (0, 30) and len(written) == 30
    second = trial()
    assert (second["hits"], second["misses"]) == (30, 0) and entries(node_cache) == written  # only read


def test_dataset_cache_keys_are_checked(tmp_path):
    for key in ("cache", "jpeg_draft"):
        with pytest.raises(DataError, match=rf"^dataset\.{key} = 'yes' is invalid; expected true or false$"):
            build_splits({"name": "synthetic", key: "yes"})


def cfg(num_workers="auto", ray_workers=1, resources=None) -> dict:
    return {"train": {"num_workers": num_workers},
            "scaling": {"num_workers": ray_workers, "resources_per_worker": resources}}


def test_loader_workers_follow_the_trials_cpus(monkeypatch):
    gpu_trial = cfg(resources={"CPU": 4, "GPU": 1})  # cluster/aws.yaml's g5.xlarge, scaling=gpu
    assert loader_workers(gpu_trial, "cuda") == 4 and loader_workers(gpu_trial, "cpu") == 3
    assert loader_workers(cfg(resources={"CPU": 8}), "cpu") == 7
    assert loader_workers(cfg(resources={"CPU": 1}), "cpu") == 0  # scaling=cpu: the training process loads
    assert loader_workers(cfg(resources=None), "cpu") == 0 and loader_workers(cfg(resources={}), "cuda") == 1
    assert loader_workers(cfg(resources={"CPU": 0.5}), "cpu") == 0
    assert loader_workers(cfg(2, resources={"CPU": 4}), "cuda") == 2  # an explicit count wins
    assert loader_workers(cfg(0, resources={"CPU": 4}), "cuda") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert loader_workers(cfg(ray_workers=0, resources={"CPU": 1}), "cpu") == 5  # no Ray: the CPUs this process has
    assert loader_workers(cfg(ray_workers=0), "cuda") == 6


def test_a_worker_count_or_augmentation_place_that_cannot_be_is_one_line():
    from helpers import compose
    for bad in ("four", -1, 1.5, True):
        with pytest.raises(ConfigError, match=rf"^train\.num_workers={bad!r}: expected auto \(one DataLoader worker"):
            validate_config(compose([f"train.num_workers={bad}"]))
    with pytest.raises(ConfigError, match=r"^train\.augment_on='gpu': expected auto, loader or device$"):
        validate_config(compose(["train.augment_on=gpu"]))


def test_the_configs_default_to_auto_and_a_gpu_trial_gets_its_4_cpus():
    from helpers import compose
    gpu = compose(["dataset=isic2018", "scaling=gpu"])
    assert gpu["train"]["num_workers"] == "auto" and loader_workers(gpu, "cuda") == 4
    assert loader_workers(compose(["dataset=isic2018", "scaling.num_workers=1"]), "cpu") == 0  # scaling=cpu
    assert compose()["train"]["num_workers"] == 0  # the synthetic preset's CPU budget (budget/cpu.yaml)
    for name in ("isic2018", "aptos2019", "isic2018_pkl", "aptos2019_pkl", "folder", "csv", "pkl"):
        d = compose([f"dataset={name}"])["dataset"]
        assert d["cache"] is True and d["jpeg_draft"] is False, name
    assert compose()["dataset"]["cache"] is False  # the synthetic set reads no file


# ------------------------------------------------------------------------------------------ augmentation on the device
def test_batch_augment_draws_the_paper_augmentation_per_batch():
    from diffmic.data.transforms import BatchAugment, ToNormalizedTensor, ToUint8Tensor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(64)]
    batch = torch.stack([ToUint8Tensor()(im) for im in images])
    assert batch.dtype == torch.uint8 and batch.shape == (64, 3, 32, 32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # without flips or rotation: exactly the loader's normalised tensors
    plain = BatchAugment(False, False, 0, mean, std)(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(plain, torch.stack([ToNormalizedTensor(mean, std)(im) for im in images]), atol=1e-6)
    # flips: about half of the batch, each exactly mirrored
    flipped = BatchAugment(True, False, 0, mean, std)(batch, torch.Generator().manual_seed(1))
    mirrored = torch.isclose(flipped, plain.flip(3)).flatten(1).all(1)
    assert torch.equal(mirrored | torch.isclose(flipped, plain).flatten(1).all(1), torch.ones(64, dtype=torch.bool))
    assert 16 <= int(mirrored.sum()) <= 48
    # rotation: the same draws give the same batch; the corners go black (the normalised value of 0)
    a = BatchAugment(True, True, 30, mean, std)
    first, again = a(batch, torch.Generator().manual_seed(2)), a(batch, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, a(batch, torch.Generator().manual_seed(3)))
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    corners = first[:, :, 0, 0]  # a corner is outside the rotated image for most angles
    assert (torch.isclose(corners, black.view(1, 3)).all(1)).float().mean() > 0.5


def test_training_with_the_augmentation_on_the_device_reads_uint8_images(monkeypatch):
    from helpers import TINY, compose

    from diffmic.engine import device_augment
    from diffmic.data import build_splits
    from diffmic.session import Session

    cfg = compose([*TINY, "train.augment_on=device"])
    data = build_splits(cfg["dataset"], seed=0)
    augment = device_augment(cfg, data, Session(amp=False))
    x, _ = data.train[0]
    assert augment is not None and x.dtype == torch.uint8 and x.shape == (3, 48, 48)
    assert data.val[0][0].dtype == torch.float32  # validation keeps the loader's normalised tensors
    auto = compose(TINY)
    data = build_splits(auto["dataset"], seed=0)
    assert device_augment(auto, data, Session(amp=False)) is None  # auto on a CPU: the loader augments
    assert data.train[0][0].dtype == torch.float32
