"""The training loader's img/s per CPU core and per trial, side by side with what the trial's GPU consumes.

    python bench/bench_data.py [--quick] [--json FILE] [--gpu-json BENCH_CORE_JSON]

Generated images at the real sets' sizes and formats (ISIC 2018: 600x450 JPEG; APTOS 2019: fundus PNGs of about
2000x2000) go through the project's own `ImageListDataset` and the paper's training transform at 224 px (centre square
crop, resize, flips, rotation U(-30, 30), normalise), read in three ways:

  uncached  the file decoded in full, then every transform (the official loader's path; `dataset.cache: false`)
  draft     JPEGs decoded at a reduced DCT scale that still covers 224 px (`dataset.jpeg_draft: true`), no cache
  cached    the node's prepared-image cache (`dataset.cache: true`, the default): a 224x224 uint8 .npy

each in the two places the random augmentation can run (`train.augment_on`):

  on the device  (unprefixed figures; the default on a GPU) the loader reads and hands over uint8 tensors; flips,
                 rotation and normalisation run per batch in the GPU step (BatchAugment, whose cost on this CPU is
                 printed apart)
  in the loader  (`loader_augment_` figures; the default on a CPU; the official pixels) flips, PIL rotation and
                 normalisation in the DataLoader worker; `in_memory`, prepared images held in memory through that
                 tail, is the floor of any cache on this path

Per core: one process, one torch thread, the CPU seconds of this process per image (other processes on a shared
machine then slow a figure down less than its wall time), median of round-robin passes over the variants after a
warm-up round, each variant drawing the same random flips and angles. Per trial: the per-core figure times the CPUs
a GPU trial has on cluster/aws.yaml (4 on a g5.xlarge, scaling=gpu), which `train.num_workers: auto` gives the
DataLoader; next to it, a DataLoader with those 4 workers measured on this machine (wall clock; on a
machine with fewer cores than workers the workers share them).

The GPU side: with --gpu-json, the paper config's training step measured by `bench/bench_core.py --config paper
--device cuda --json FILE` on a GPU; otherwise an estimate: the FLOPs of one training step per image at the paper
config (counted with torch.utils.flop_counter on this CPU) over a stated share of an A10G's bf16 peak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from diffmic.data import ImageListDataset, train_transform  # noqa: E402
from diffmic.data.transforms import BatchAugment, device_transform  # noqa: E402
from diffmic.data.prepared import RACY_S, PreparedImages  # noqa: E402

SIZE = 224
ISIC = {"name": "ISIC-like", "size": (600, 450), "format": "JPEG", "quick": 64, "full": 256}
APTOS = {"name": "APTOS-like", "size": (2000, 2000), "format": "PNG", "quick": 4, "full": 16}
JPEG_QUALITY = 95
# The GPU estimate's assumptions (cluster/aws.yaml's gpu_1x node is a g5.xlarge: one A10G).
A10G_BF16_TFLOPS = 70.0  # dense tensor-core peak of the A10G (the A10 is rated 125)
GPU_UTILISATION = 0.4  # share of that peak a training step sustains: above the ~20-30 % ResNet-50 training reaches,
# so the GPU figure errs high and "the loader keeps up" errs strict


# ---------------------------------------------------------------------------------------------------------- images
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, channels: int = 1) -> np.ndarray:
    """Noise correlated over about `cell` pixels (block noise, bilinearly upsampled by PIL)."""
    small = rng.normal(0, 1, (h // cell + 2, w // cell + 2, channels)).astype(np.float32)
    planes = [np.asarray(Image.fromarray(small[..., c]).resize((w + 2 * cell, h + 2 * cell), Image.BILINEAR))
              [cell:cell + h, cell:cell + w] for c in range(channels)]
    return np.stack(planes, -1)


def isic_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Dermoscopy-like: skin-tone shading, a darker lesion with a ragged border, skin texture, sensor grain."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([205, 150, 125], np.float32) + rng.normal(0, 12, 3)
    shading = 1 - 0.25 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    cx, cy, r = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65), min(w, h) * rng.uniform(0.2, 0.35)
    ragged = r * (1 + 0.25 * _smooth_noise(rng, h, w, 40)[..., 0])
    lesion = 1 / (1 + np.exp((np.hypot(xx - cx, yy - cy) - ragged) / 6))
    pigment = np.array([95, 55, 40], np.float32) * (1 + 0.2 * _smooth_noise(rng, h, w, 12, 3))
    img = (skin * shading[..., None]) * (1 - lesion[..., None]) + pigment * lesion[..., None]
    img += 10 * _smooth_noise(rng, h, w, 3, 3) + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def aptos_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A fundus-like picture: a bright disc on black with a radial gradient, an optic disc, vessels, grain."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rad = np.hypot(xx - w / 2, yy - h / 2) / (0.47 * min(w, h))
    base = np.array([180, 85, 35], np.float32) * (1.1 - 0.5 * rad[..., None] ** 2)
    ox, oy = w * rng.uniform(0.3, 0.4), h * rng.uniform(0.45, 0.55)
    base += 70 * np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * (0.05 * w) ** 2))[..., None]
    vessels = np.abs(_smooth_noise(rng, h, w, 60)[..., 0]) < 0.06
    base[vessels] *= 0.55
    base += 6 * _smooth_noise(rng, h, w, 4, 3) + rng.normal(0, 2, (h, w, 3))
    base[rad > 1] = 0
    return np.clip(base, 0, 255).astype(np.uint8)


def write_set(spec: dict, n: int, folder: Path, seed: int) -> list[str]:
    folder.mkdir(parents=True)
    rng, (w, h) = np.random.default_rng(seed), spec["size"]
    draw = isic_like if spec["format"] == "JPEG" else aptos_like
    paths = []
    for i in range(n):
        path = folder / f"{i:04d}.{spec['format'].lower().replace('jpeg', 'jpg')}"
        kwargs = {"quality": JPEG_QUALITY} if spec["format"] == "JPEG" else {}
        Image.fromarray(draw(rng, w, h)).save(path, **kwargs)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------------------- timing
def read_all(dataset) -> None:
    for i in range(len(dataset)):
        dataset[i]


def per_core(variants: dict[str, ImageListDataset], repeats: int) -> dict[str, dict[str, float]]:
    """Round-robin passes over every image of each variant; medians of CPU and wall seconds per image."""
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(repeats + 1):  # round 0 warms up (page cache, allocator)
        for name, ds in variants.items():
            torch.manual_seed(round_)  # every variant draws the same flips and angles
            c0, w0 = time.process_time(), time.perf_counter()
            read_all(ds)
            if round_:
                cpu[name].append((time.process_time() - c0) / len(ds))
                wall[name].append((time.perf_counter() - w0) / len(ds))
    return {k: {"cpu_s_per_img": statistics.median(cpu[k]), "wall_s_per_img": statistics.median(wall[k])}
            for k in variants}


def loader_rate(dataset, workers: int, epochs: int) -> float:
    """img/s (wall) of a DataLoader with `workers` persistent worker processes, after a warm-up epoch; batches small
    enough that every worker gets one."""
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: measured so
    loader = DataLoader(dataset, batch_size=max(1, min(16, len(dataset) // workers)), shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for _ in loader:  # workers start, caches warm
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * len(dataset) / (time.perf_counter() - start)


class InMemory:
    """Prepared images held in memory, through the transform: what is left of an item once reading costs nothing."""

    def __init__(self, images: list[Image.Image], transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), 0


# The two places the random augmentation can run (train.augment_on), each a key prefix of the figures.
PIPELINES = {"": "augmentation on the device (train.augment_on: device, the default on a GPU): the loader reads and "
                 "hands over uint8 tensors; flips, rotation and normalisation run per batch in the GPU step",
             "loader_augment_": "augmentation in the loader (train.augment_on: loader, the default on a CPU; the "
                                "official pixels): flips, rotation (PIL) and normalisation in the DataLoader worker"}
READS = ("uncached", "draft", "cached")


def bench_set(spec: dict, paths: list[str], cache: Path, repeats: int, trial_cpus: int, epochs: int) -> dict:
    """Every figure of one image set, keyed `<pipeline prefix><read>_...` (PIPELINES, READS)."""
    labels = [i % 7 for i in range(len(paths))]
    augmented = train_transform(SIZE, hflip=True, vflip=spec is APTOS, rotation=30)  # configs/dataset/*: APTOS flips
    # both ways
    reader = PreparedImages(SIZE, cache=cache)
    readers = {"uncached": None, "draft": PreparedImages(SIZE, jpeg_draft=True), "cached": reader}
    variants = {}
    for prefix, tf in (("", device_transform(SIZE)), ("loader_augment_", augmented)):
        for read, r in readers.items():
            variants[prefix + read] = ImageListDataset(paths, labels, tf, *([r] if r else []))
    # the floor of any cache with augmentation in the loader: prepared images in memory, through the random tail
    variants["loader_augment_in_memory"] = InMemory([PreparedImages(SIZE)(p) for p in paths], augmented)
    c0 = time.process_time()
    read_all(variants["cached"])  # the first epoch on a node: every image prepared once and written
    fill = (time.process_time() - c0) / len(paths)
    assert reader.misses == len(paths) and reader.hits == 0, (reader.misses, reader.hits)
    timed = per_core(variants, repeats)
    assert reader.hits == 2 * (repeats + 1) * len(paths), reader.hits  # every timed pass hit the cache
    out = {"images": len(paths), "width": spec["size"][0], "height": spec["size"][1], "format": spec["format"],
           "mean_file_kb": statistics.mean(os.path.getsize(p) for p in paths) / 1024,
           "cache_fill_img_per_s_per_core": 1 / fill}
    for name, t in timed.items():
        out[f"{name}_img_per_s_per_core"] = 1 / t["cpu_s_per_img"]
        out[f"{name}_ms_per_img_cpu"] = 1e3 * t["cpu_s_per_img"]
        out[f"{name}_ms_per_img_wall"] = 1e3 * t["wall_s_per_img"]
    for prefix in PIPELINES:
        uncached = out[f"{prefix}uncached_img_per_s_per_core"]
        out[f"{prefix}draft_speedup_per_core"] = out[f"{prefix}draft_img_per_s_per_core"] / uncached
        out[f"{prefix}cache_speedup_per_core"] = out[f"{prefix}cached_img_per_s_per_core"] / uncached
        for read in ("uncached", "cached"):
            out[f"{prefix}{read}_trial_img_per_s"] = out[f"{prefix}{read}_img_per_s_per_core"] * trial_cpus
            out[f"{prefix}{read}_dataloader_{trial_cpus}_workers_img_per_s"] = loader_rate(
                variants[prefix + read], trial_cpus, epochs)
    out["loader_augment_in_memory_speedup_per_core"] = (out["loader_augment_in_memory_img_per_s_per_core"]
                                                        / out["loader_augment_uncached_img_per_s_per_core"])
    out["device_augment_ms_per_img_this_cpu"] = 1e3 * batch_augment_s_per_img(variants["cached"], spec is APTOS)
    return out


def batch_augment_s_per_img(dataset, vflip: bool, batch: int = 64) -> float:
    """CPU seconds per image of BatchAugment on a batch of `batch` uint8 images on this CPU, one thread (on a GPU it
    is a handful of kernels per batch, next to the two ResNet-50 passes of the step)."""
    x = torch.stack([dataset[i % len(dataset)][0] for i in range(batch)])
    augment = BatchAugment(True, vflip, 30, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    augment(x, torch.Generator().manual_seed(0))  # warm-up
    c0 = time.process_time()
    for r in range(3):
        augment(x, torch.Generator().manual_seed(r))
    return (time.process_time() - c0) / (3 * batch)


# ---------------------------------------------------------------------------------------------------------- GPU side
def trial_cpus_per_gpu() -> int:
    """CPUs per GPU of cluster/aws.yaml's single-GPU worker (the node one scaling=gpu trial fills)."""
    node = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())["available_node_types"]["gpu_1x"]
    return int(node["resources"]["CPU"] // node["resources"]["GPU"])


def train_flops_per_image() -> float:
    """FLOPs (multiply-adds count 2) of one diffusion-phase training step per image at the paper config: the model
    of bench_core's `paper` spec (ResNet-50 DCG, ResNet-18 encoder, 6144-wide denoiser, 224 px, 7 classes), DCG
    joint, guidance eval (configs/train/paper.yaml), forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffmic.compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from bench_core import MMD_WEIGHT, SPECS, model_config  # bench/ is on sys.path when run as a script
    from diffmic.models import build_model

    spec, batch = SPECS["paper"], 2  # BatchNorm needs two images
    torch.manual_seed(0)
    model = build_model(model_config(spec), spec["num_classes"], spec["image_size"]).train()
    x = torch.randn(batch, 3, spec["image_size"], spec["image_size"])
    y = torch.arange(batch) % spec["num_classes"]
    with FlopCounterMode(display=False) as counter:
        losses = model(x, y, phase="diffusion", joint_dcg=True, mmd_weight=MMD_WEIGHT, guidance="eval")
        losses["loss"].backward()
    return counter.get_total_flops() / batch


def gpu_rate(gpu_json: Path | None) -> tuple[float, str, float | None]:
    """(img/s the GPU trains on at the paper config, how that figure was obtained, FLOPs per image or None)."""
    if gpu_json is not None:
        record = json.loads(gpu_json.read_text())
        paper = next(r for r in record["results"] if r["config"] == "paper")
        row = next(r for r in paper["rows"] if r["label"] == "train step, DCG joint")
        return paper["batch"] / row["time"], (f"measured: bench_core.py paper train step (DCG joint), batch "
                                              f"{paper['batch']}, {record['meta'].get('gpu')}, {gpu_json}"), None
    flops = train_flops_per_image()
    rate = A10G_BF16_TFLOPS * 1e12 * GPU_UTILISATION / flops
    return rate, (f"estimate: {flops / 1e9:.1f} GFLOPs per training image at the paper config (FlopCounterMode, "
                  f"fwd+bwd, DCG joint) over {GPU_UTILISATION:.0%} of an A10G's {A10G_BF16_TFLOPS:.0f} TFLOPS bf16 "
                  "dense peak (g5.xlarge, cluster/aws.yaml)"), flops


# ---------------------------------------------------------------------------------------------------------- report
def print_table(label: str, r: dict, trial_cpus: int) -> None:
    print(f"\n== {label}: {r['images']} x {r['width']}x{r['height']} {r['format']} (mean {r['mean_file_kb']:.0f} KB) "
          f"-> {SIZE} px, paper augmentation ==")
    print(f"{'read':<12}{'ms/img CPU':>12}{'ms/img wall':>13}{'img/s/core':>12}{'x uncached':>12}"
          f"{f'trial ({trial_cpus} CPUs)':>18}{f'{trial_cpus} workers here':>18}")
    for prefix, what in PIPELINES.items():
        print(what + ":")
        uncached = r[f"{prefix}uncached_img_per_s_per_core"]
        for read in READS + (("in_memory",) if prefix else ()):
            k = prefix + read
            trial = r.get(f"{k}_trial_img_per_s")
            measured = r.get(f"{k}_dataloader_{trial_cpus}_workers_img_per_s")
            print(f"{read:<12}{r[f'{k}_ms_per_img_cpu']:>12.2f}{r[f'{k}_ms_per_img_wall']:>13.2f}"
                  f"{r[f'{k}_img_per_s_per_core']:>12.0f}{r[f'{k}_img_per_s_per_core'] / uncached:>12.2f}"
                  f"{'-' if trial is None else f'{trial:.0f}':>18}{'-' if measured is None else f'{measured:.0f}':>18}")
    print("BatchAugment on this CPU (one thread; on a GPU part of its step): "
          f"{r['device_augment_ms_per_img_this_cpu']:.2f} ms/img")
    print(f"cache fill (first epoch on a node, decode + prepare + write): {r['cache_fill_img_per_s_per_core']:.0f} "
          f"img/s per core; '{trial_cpus} workers here': a DataLoader with the trial's {trial_cpus} worker processes "
          f"on this machine's {os.cpu_count()} cores (wall clock)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{ISIC['quick']} ISIC-like and {APTOS['quick']} APTOS-like "
                                                        "images, 3 rounds (about a minute)")
    p.add_argument("--repeats", type=int, help="timed rounds per figure (median); default 3 quick, 7 otherwise")
    p.add_argument("--gpu-json", type=Path, help="a bench_core.py --device cuda --config paper JSON: the GPU's "
                                                 "measured img/s replaces the estimate")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # per core: the loader's work in one process on one thread, as in a DataLoader worker
    size = "quick" if args.quick else "full"
    repeats = args.repeats or (3 if args.quick else 7)
    trial_cpus = trial_cpus_per_gpu()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        specs = {"isic": ISIC, "aptos": APTOS}
        paths = {key: write_set(spec, spec[size], Path(tmp) / key, seed)
                 for seed, (key, spec) in enumerate(specs.items())}
        time.sleep(max(0.0, RACY_S + 0.1 - (time.time() - Path(paths["aptos"][-1]).stat().st_mtime)))  # as on a
        # dataset's disk: files older than the cache's racy window, whose hashes a process then remembers
        sets = {}
        for key, spec in specs.items():
            sets[key] = bench_set(spec, paths[key], Path(tmp) / "cache", repeats, trial_cpus, 2 if args.quick else 4)
            print_table(spec["name"], sets[key], trial_cpus)
    gpu_img_per_s, basis, flops = gpu_rate(args.gpu_json)
    isic, aptos = sets["isic"], sets["aptos"]
    figures = {
        **isic,
        **{f"aptos_{k}": v for k, v in aptos.items()},
        "pipeline": "unprefixed: " + PIPELINES[""] + "; loader_augment_*: " + PIPELINES["loader_augment_"],
        "trial_cpus": trial_cpus,
        "gpu_img_per_s": gpu_img_per_s,
        "gpu_img_per_s_estimate" if args.gpu_json is None else "gpu_img_per_s_measured": gpu_img_per_s,
        "gpu_estimate_basis": basis,
        "gpu_train_flops_per_image": flops,
    }
    print(f"\nGPU ({basis}): {gpu_img_per_s:.0f} img/s")
    for set_prefix, label in (("", "ISIC-like"), ("aptos_", "APTOS-like")):
        for prefix, where in (("", "augmentation on the GPU"), ("loader_augment_", "augmentation in the loader")):
            for read in ("cached", "uncached"):
                rate = figures[f"{set_prefix}{prefix}{read}_trial_img_per_s"]
                figures[f"{set_prefix}{prefix}{read}_keeps_up"] = rate >= gpu_img_per_s
                print(f"{label} loader per trial, {read}, {where} ({trial_cpus} CPUs x per-core figure): "
                      f"{rate:.0f} img/s = {rate / gpu_img_per_s:.2f} x the GPU's")
        figures[f"{set_prefix}trial_loader_img_per_s"] = figures[f"{set_prefix}cached_trial_img_per_s"]  # the default
    print(f"targets: cached >= 5 x uncached per core (ISIC-like JPEG, a GPU trial's pipeline): "
          f"{figures['cache_speedup_per_core']:.2f} (augmentation in the loader: "
          f"{figures['loader_augment_cache_speedup_per_core']:.2f}); loader per trial >= GPU: "
          f"{'yes' if figures['cached_keeps_up'] else 'no'} (ISIC-like), "
          f"{'yes' if figures['aptos_cached_keeps_up'] else 'no'} (APTOS-like)")
    figures["meta"] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                       "pillow": Image.__version__, "numpy": np.__version__, "platform": platform.platform(),
                       "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "repeats": repeats,
                       "image_size": SIZE, "jpeg_quality": JPEG_QUALITY, "argv": sys.argv[1:],
                       "total_s": time.perf_counter() - start}
    print(f"total {figures['meta']['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
