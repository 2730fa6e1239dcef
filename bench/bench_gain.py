#!/usr/bin/env python
"""bench/bench_gain.py [--quick] [--json FILE]: does the diffusion head beat its own DCG and a plain classifier?

Each arm is one `python -m diffmic.train` run (its own process, 2 threads, nothing else running) on the same split,
read back from its metrics.json: the head's test figures, its DCG's (`dcg_*`, same split and rule, its own
temperature), the gain (head − DCG), and the plain control trained by the same command with the search's control
overrides (tune/selection/controls.py: the DCG's global backbone + linear head, same epochs and optimiser; read out alone).

Datasets: BreastMNIST (real ultrasound, ../shared/data/medmnist/breastmnist.npz, the official split; the official
validation images join train and the project carves its own validation, as the acceptance check does), the built-in
synthetic set, and the generated ISIC2018 / APTOS2019 layouts of tests/layouts.py. Settings are named override sets
(SETTINGS); `--settings`, `--datasets`, `--sizes`, `--seeds` and `--epochs` choose the grid. The figures printed are
test figures of the best validation epoch; the means are over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
NPZ = ROOT.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"

from tune.selection.controls import CONTROL_OVERRIDES  # noqa: E402

# What was measured (bench/RESULTS.md, "The diffusion gain"): the paper's ε head against the residual head (the
# default since), and the official optional CE term on top of each.
SETTINGS = {
    "eps": ["model.denoiser.output=eps"],
    "eps+ce": ["model.denoiser.output=eps", "train.ce_weight=1.0"],
    "residual": ["model.denoiser.output=residual"],
    "residual+ce": ["model.denoiser.output=residual", "train.ce_weight=1.0"],
    # DiffMIC-v2 (issue 25): as its official code (DDIM-10, focal weight, uniform start, the noise head), and as its
    # paper
    "v2": ["model=diffmic_v2", "model.denoiser.output=eps"],
    # v2 with a DCG trained as long as v1's at the budget: jointly (v1's recipe), or pre-trained for as many epochs
    "v2-joint": ["model=diffmic_v2", "model.denoiser.output=eps", "train.joint_dcg=true"],
    "v2-pre10": ["model=diffmic_v2", "model.denoiser.output=eps", "train.dcg_pretrain_epochs=10"],
    # v2 with v1's fix, its default since: a residual head on the prior map (ŷ0 = P + r), official otherwise
    "v2-residual": ["model=diffmic_v2", "model.denoiser.output=residual"],
    "v2-paper": ["model=diffmic_v2", "model.denoiser.output=eps", "model.denoiser.focal_alpha=0", "model.denoiser.start=gaussian",
                 "model.denoiser.guidance=probs"],
}
METRICS = ("macro_f1", "accuracy", "auc")


def breast_layout(out: Path, npz: Path = NPZ) -> list[str]:
    """BreastMNIST as the csv dataset reads it (images/*.png, train.csv with train+val, test.csv)."""
    import numpy as np
    from PIL import Image

    if not (out / "test.csv").exists():
        d = np.load(npz)
        (out / "images").mkdir(parents=True, exist_ok=True)
        rows = {"train": ["image,label"], "test": ["image,label"]}
        for split, dest in (("train", "train"), ("val", "train"), ("test", "test")):
            for i, (x, y) in enumerate(zip(d[f"{split}_images"], d[f"{split}_labels"][:, 0])):
                name = f"images/{split}_{i:04d}.png"
                Image.fromarray(x).convert("RGB").save(out / name)
                rows[dest].append(f"{name},{['malignant', 'benign'][int(y)]}")
        for dest, r in rows.items():
            (out / f"{dest}.csv").write_text("\n".join(r) + "\n")
    return ["dataset=csv", f"dataset.root={out}", "dataset.test_csv=test.csv", "dataset.val_fraction=0.125"]


def fixture(kind: str, out: Path) -> list[str]:
    import numpy as np

    import layouts
    if kind == "isic2018":
        root = layouts.isic(out / "isic", 30, 64, np.random.default_rng(0))
        return ["dataset=isic2018", f"dataset.root={root}"]
    root = layouts.aptos(out / "aptos", 30, 64, np.random.default_rng(1))
    return ["dataset=aptos2019", f"dataset.root={root}"]


def dataset_args(name: str, cache: Path, npz: Path = NPZ) -> list[str]:
    if name == "breastmnist":
        return breast_layout(cache / "breastmnist", npz)
    if name == "synthetic":
        return ["dataset=synthetic"]
    return fixture(name, cache)


def run(args: list[str], out: Path) -> dict:
    """One training run in its own process; its test metrics and wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffmic.train", *args, f"output_dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench_gain: run failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    import pandas as pd
    history = pd.read_csv(out / "history.csv")
    curve = {k: [round(float(v), 4) for v in history[k]] for k in ("val_macro_f1", "val_dcg_macro_f1") if k in history}
    return {"test": metrics["test"], "val": metrics["val"], "wall_s": time.perf_counter() - start, "curve": curve}


INFERENCE = [  # (sampler, steps, eta, S): what the official method and CARD leave open at prediction time
    ("official", None, 0.0, 1), ("official", None, 0.0, 8), ("ddpm", None, 0.0, 1), ("ddim", 10, 0.0, 1),
    ("ddim", 10, 1.0, 1), ("ddim", 10, 1.0, 8), ("ddim", 50, 0.0, 1), ("dcg", None, 0.0, 1)]


def inference(run_dir: Path) -> None:
    """One trained run evaluated on validation and test at each INFERENCE point, the S chains combined by the mean
    of their probabilities (the project's rule) and by a majority vote of their argmaxes (CARD's)."""
    import numpy as np
    import torch

    from diffmic.calibration import class_probabilities, fit_temperature
    from diffmic.compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from diffmic.config import split_seed
    from diffmic.data import build_splits
    from diffmic.evaluate import load_for_evaluation
    from diffmic.metrics import classification_metrics

    torch.set_num_threads(2)
    model, cfg, _ = load_for_evaluation(run_dir, [])
    data = build_splits(cfg["dataset"], seed=split_seed(cfg))
    splits = {s: getattr(data, s) for s in ("val", "test")}
    images = {s: (torch.stack([d[i][0] for i in range(len(d))]), np.array([d[i][1] for i in range(len(d))]))
              for s, d in splits.items()}
    print(f"{run_dir}: sampler steps eta S | val f1 (mean, vote) | test f1 (mean, vote), acc, auc")
    for sampler, steps, eta, S in INFERENCE:
        chains, line = {}, f"  {sampler:8s} {str(steps):4s} {eta:3.1f} {S:2d}"
        for split, (x, y) in images.items():
            with torch.no_grad():
                pred = model.predict(x, sampler, steps, eta, S, torch.Generator().manual_seed(0))
            chains[split] = (pred.samples.numpy(), y)
        tau = fit_temperature(*chains["val"])
        for split, (samples, y) in chains.items():
            mean = classification_metrics(y, class_probabilities(samples, tau))
            votes = np.eye(samples.shape[2])[samples.argmax(2)].mean(0)  # share of chains per class
            vote = classification_metrics(y, votes + 1e-6 * class_probabilities(samples, tau))  # ties: the mean
            line += f" | {split} {mean['macro_f1']:.3f}, {vote['macro_f1']:.3f}"
            if split == "test":
                line += f", acc {mean['accuracy']:.3f}, auc {mean['auc']:.3f}"
        print(line, flush=True)


def overrides(values: dict) -> list[str]:
    return [f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="BreastMNIST at 32 px, one seed, residual + control")
    p.add_argument("--datasets", default="breastmnist,synthetic,isic2018,aptos2019")
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: budget=cpu's)")
    p.add_argument("--no-control", action="store_true")
    p.add_argument("--json", help="write every arm's figures here")
    p.add_argument("--npz", type=Path, default=NPZ, help=f"BreastMNIST's npz (default: {NPZ})")
    p.add_argument("--inference", type=Path, nargs="+", metavar="RUN_DIR",
                   help="instead of training: evaluate these runs at every INFERENCE point (sampler, eta, S, vote)")
    p.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary folder)")
    a = p.parse_args()
    if a.inference:
        for run_dir in a.inference:
            inference(run_dir)
        return
    if a.quick:
        a.datasets, a.sizes, a.settings, a.seeds = "breastmnist", "32", "residual", "0"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.keep or Path(tmp)
        for name in a.datasets.split(","):
            base = dataset_args(name, cache, a.npz)
            for size in (int(s) for s in a.sizes.split(",")):
                budget = ["budget=cpu", f"dataset.image_size={size}"] + (
                    [f"train.epochs={a.epochs}"] if a.epochs else [])
                arms = [(s, SETTINGS[s]) for s in a.settings.split(",")]
                if not a.no_control:
                    arms.append(("control", overrides(CONTROL_OVERRIDES)))
                for seed in (int(s) for s in a.seeds.split(",")):
                    for setting, extra in arms:
                        out = cache / f"{name}-{size}-{setting}-{seed}"
                        r = run([*base, *budget, f"seed={seed}", *extra], out)
                        t = r["test"]
                        row = {"dataset": name, "size": size, "setting": setting, "seed": seed,
                               **{f"head_{m}": t[m] for m in METRICS}, **{f"dcg_{m}": t[f"dcg_{m}"] for m in METRICS},
                               "gain_macro_f1": t["gain_macro_f1"], "wall_s": round(r["wall_s"], 1)}
                        rows.append({**row, "val_curve": r["curve"]})
                        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                              "| val f1 per epoch, head:", r["curve"].get("val_macro_f1"), "DCG:",
                              r["curve"].get("val_dcg_macro_f1"), flush=True)
    summarize(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def summarize(rows: list[dict]) -> None:
    """Means over seeds: head, its DCG and the gain per setting; the control beside them."""
    import pandas as pd

    frame = pd.DataFrame(rows).drop(columns="val_curve")
    cols = [f"{w}_{m}" for w in ("head", "dcg") for m in METRICS] + ["gain_macro_f1", "wall_s"]
    means = frame.groupby(["dataset", "size", "setting"], sort=False)[cols].agg(["mean", "std"])
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 3):
        print("\n== test figures, mean (sd) over seeds; the control's are its DCG read-out (head = dcg) ==")
        print(means.to_string())


if __name__ == "__main__":
    main()
