#!/usr/bin/env python
"""bench/bench_v2.py [--config small|paper] [--device cpu|cuda] [--batch N] [--repeats N]: DiffMIC against
DiffMIC-v2 at their papers' network sizes, side by side in one run: a training step (DCG frozen, as v2 trains) and
prediction per image, v1 with its official 250-step chain and with DDIM-10, v2 with its DDIM-10. Each time is a
median, timed round-robin (bench/bench_core.py:time_round_robin), and printed as a ratio to v2's; never pass/fail.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_core import model_config, time_round_robin  # noqa: E402  (also fixes torchvision, sets HF offline)

import torch  # noqa: E402
import yaml  # noqa: E402

from diffmic.models import build_model  # noqa: E402

CONFIGS = {  # the papers' networks: ResNet-50 DCG and 6144-wide denoiser (v1); ResNet-18 DCG, K = Np = 6 (v2)
    "paper": {"image_size": 224, "v1_dcg": "resnet50", "v2_dcg": "resnet18", "feature_dim": 6144, "batch": 8},
    "small": {"image_size": 64, "v1_dcg": "resnet18", "v2_dcg": "resnet18", "feature_dim": 512, "batch": 16},
}


def models(spec: dict, device: torch.device):
    base = {"image_size": spec["image_size"], "num_classes": 4, "feature_dim": spec["feature_dim"],
            "dcg": {"backbone": spec["v1_dcg"], "output_stride": None, "roi_count": 6, "crop_size": None}}
    v1 = model_config(base)
    v2 = model_config({**base, "dcg": {**base["dcg"], "backbone": spec["v2_dcg"]}})
    configs = Path(__file__).resolve().parents[1] / "configs"
    own = yaml.safe_load((configs / "model" / "diffmic_v2.yaml").read_text())
    v2["model"] = {**own, "dcg": {**own["dcg"], **v2["model"]["dcg"], "crop_channels": own["dcg"]["crop_channels"]},
                   "denoiser": {**own["denoiser"], "feature_dim": spec["feature_dim"], "encoder": "resnet18"}}
    torch.manual_seed(0)
    return (build_model(v1, 4, spec["image_size"]).to(device), build_model(v2, 4, spec["image_size"]).to(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    spec, device = CONFIGS[a.config], torch.device(a.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    v1, v2 = models(spec, device)
    batch = a.batch or spec["batch"]
    x = torch.randn(batch, 3, spec["image_size"], spec["image_size"], device=device)
    y = torch.arange(batch, device=device) % 4
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opts = {m: torch.optim.Adam(m.denoiser.parameters(), lr=1e-4) for m in (v1, v2)}

    def step(model, **kw):
        def go() -> None:
            model.train()
            model.dcg.eval()
            loss = model(x, y, phase="diffusion", joint_dcg=False, **kw)["loss"]
            opts[model].zero_grad(set_to_none=True)
            loss.backward()
            opts[model].step()
        return go

    def predict(model, sampler, steps):
        def go() -> None:
            model.eval()
            model.predict(x, sampler=sampler, steps=steps)
        return go

    train = time_round_robin({"v1 (MSE + MMD, 3 branches)": (None, step(v1, mmd_weight=0.5)),
                              "v2 (weighted MSE, 36 cells)": (None, step(v2))}, a.repeats, sync)
    pred = time_round_robin({"v1 official, 250 steps": (None, predict(v1, "official", 250)),
                             "v1 DDIM-10": (None, predict(v1, "ddim", 10)),
                             "v2 DDIM-10 (official)": (None, predict(v2, "official", None))}, a.repeats, sync)
    print(f"{a.config} config on {device} ({torch.get_num_threads()} threads), batch {batch}, "
          f"{spec['image_size']} px, feature_dim {spec['feature_dim']}")
    base = train["v2 (weighted MSE, 36 cells)"]
    for name, s in train.items():
        print(f"  train step  {name:32s} {s * 1e3:9.1f} ms  {s / base:5.2f}x v2")
    base = pred["v2 DDIM-10 (official)"]
    for name, s in pred.items():
        print(f"  predict     {name:32s} {s / batch * 1e3:9.2f} ms/img  {s / base:5.2f}x v2")


if __name__ == "__main__":
    main()
