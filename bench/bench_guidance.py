#!/usr/bin/env python
"""bench/bench_guidance.py [--quick]: where the diffusion loss's priors come from, side by side on the same data and
seed — `train.guidance=eval` (the official trainer: priors from the DCG in eval mode, then a train-mode DCG pass for
its CE step) against `shared` (one train-mode pass serves both) — and bf16 autocast against fp32 on this CPU.

Each guidance arm trains the search's per-trial budget (48 px, ResNet-10t streams, 4 epochs; `--quick`: 2) on the
built-in synthetic data and on data generated in the ISIC2018 and APTOS2019 layouts (tests/layouts.py); the bf16 pair
a smaller one (bf16 is emulated on this CPU). Each prints the best validation macro-F1, the test accuracy and ECE,
the median training step time (ms per batch of 16) and the wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from diffmic.compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before timm (and torchvision) are imported
from diffmic.engine import train  # noqa: E402
from diffmic.session import LocalSession  # noqa: E402
from helpers import compose  # noqa: E402

BUDGET = ["dataset.image_size=48", "model.dcg.backbone=resnet10t", "model.denoiser.encoder=resnet10t",
          "model.dcg.pretrained=false", "model.denoiser.feature_dim=256", "train.dcg_pretrain_epochs=1",
          "train.batch_size=16", "train.num_workers=0", "deterministic=true", "train.test_at_end=true"]


class CpuBf16Session(LocalSession):
    """bf16 autocast on the CPU (the project enables it on CUDA only), to measure its effect on accuracy."""

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


def arm(dataset: list[str], extra: list[str], epochs: int, bf16: bool = False) -> dict:
    cfg = compose([*dataset, *BUDGET, f"train.epochs={epochs}", *extra])
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(open("/dev/null", "w")):
        session = (CpuBf16Session if bf16 else LocalSession)(Path(tmp) / "run")
        start = time.perf_counter()
        result = train(cfg, session)
        wall = time.perf_counter() - start
    rates = [row["train_samples_per_s"] for row in result.history]
    step_ms = 1000 * cfg["train"]["batch_size"] / (sorted(rates)[len(rates) // 2])
    return {"val_macro_f1": result.val["macro_f1"], "test_accuracy": result.test["accuracy"],
            "test_ece": result.test["ece"], "step_ms": step_ms, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--only", choices=("guidance", "bf16"), help="run one of the two comparisons")
    args = p.parse_args()
    epochs = 2 if args.quick else 4
    import numpy as np
    import layouts
    data = Path(tempfile.mkdtemp(prefix="bench-guidance-"))
    rng = np.random.default_rng(0)
    isic, aptos = layouts.isic(data / "isic", 40, 64, rng), layouts.aptos(data / "aptos", 40, 64, rng)
    datasets = {"synthetic": ["dataset=synthetic", "dataset.num_train=960"],
                "isic2018 layout": ["dataset=isic2018", f"dataset.root={isic}"],
                "aptos2019 layout": ["dataset=aptos2019", f"dataset.root={aptos}"]}
    arms = [(name, label, dataset, [f"train.guidance={label.split('=')[1]}"], epochs, False)
            for name, dataset in datasets.items() for label in ("guidance=eval", "guidance=shared")]
    out: dict = {}
    if args.only == "bf16":
        arms = []
    print(f"{'data':18} {'arm':22} {'val F1':>7} {'test acc':>9} {'test ECE':>9} {'step ms':>8} {'wall s':>7}")
    for name, label, dataset, extra, n_epochs, bf16 in arms:
        r = arm(dataset, extra, n_epochs, bf16)
        out[f"{name} / {label}"] = r
        print(f"{name:18} {label:22} {r['val_macro_f1']:7.3f} {r['test_accuracy']:9.3f} {r['test_ece']:9.3f} "
              f"{r['step_ms']:8.0f} {r['wall_s']:7.0f}", flush=True)
    if args.only != "guidance":
        out["bf16 inference"] = bf16_inference(datasets["synthetic"], epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def bf16_inference(dataset: list[str], epochs: int) -> dict:
    """bf16 autocast on this CPU has no bf16 units behind it (about 28x slower than fp32 here: a bf16 training run of
    the budget above would take an hour), so its effect is measured where it is cheap: the same fp32-trained model
    evaluated on val and test with and without bf16 autocast, same sampler seed."""
    from diffmic.checkpoint import fitted_temperature, load_eval_model, load_state
    from diffmic.config import split_seed
    from diffmic.data import build_splits
    from diffmic.engine import evaluate
    from diffmic.session import Session

    cfg = compose([*dataset, *BUDGET, f"train.epochs={epochs}", "train.guidance=eval"])
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(open("/dev/null", "w")):
        train(cfg, LocalSession(Path(tmp) / "run"))
        state = load_state(Path(tmp) / "run" / "checkpoint")
    data = build_splits(cfg["dataset"], seed=split_seed(cfg))
    model = load_eval_model(state, data.num_classes)
    out = {}
    print(f"\nbf16 autocast at inference, the same fp32-trained model (synthetic, {epochs} epochs):")
    print(f"{'precision':10} {'val acc':>8} {'val F1':>7} {'test acc':>9} {'test F1':>8} {'test ECE':>9} {'eval s':>7}")
    for label, session in (("fp32", Session(amp=False)), ("bf16", CpuBf16Session(Path(tempfile.mkdtemp()) / "unused"))):
        start = time.perf_counter()
        val = evaluate(model, data.val, cfg, session, generator_seed=cfg["seed"], temperature=fitted_temperature(state))
        test = evaluate(model, data.test, cfg, session, generator_seed=cfg["seed"],
                        temperature=fitted_temperature(state))
        seconds = time.perf_counter() - start
        out[label] = {"val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                      "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "test_ece": test["ece"],
                      "eval_s": seconds}
        print(f"{label:10} {val['accuracy']:8.3f} {val['macro_f1']:7.3f} {test['accuracy']:9.3f} "
              f"{test['macro_f1']:8.3f} {test['ece']:9.3f} {seconds:7.0f}", flush=True)
    return out


if __name__ == "__main__":
    main()
