#!/usr/bin/env python
"""bench/bench_branches.py [BATCH]: side by side in one run, the three prior branches through the denoiser MLP
as three calls in one graph (before) vs one stacked pass (now); forward + backward into the weights, at the paper
config (feature_dim 6144, 7 classes, T 1000). Prints the median of 7 rounds of each, alternating."""
import statistics
import sys
import time

import torch

from diffmic.models.denoiser import Denoiser

B = int(sys.argv[1]) if len(sys.argv) > 1 else 4
torch.manual_seed(0)
den = Denoiser(7, 1000, encoder="test_resnet", feature_dim=6144).train()
emb = torch.randn(B, 6144, requires_grad=True)
y, p, t = torch.randn(3, B, 7), torch.softmax(torch.randn(3, B, 7), 2), torch.randint(0, 1000, (B,))
def separate():
    sum(den(emb, y[i], p[i], t).square().sum() for i in range(3)).backward()
def stacked():
    den(emb, y.flatten(0, 1), p.flatten(0, 1), t.repeat(3), branches=3).square().sum().backward()
fns = {"three calls": separate, "stacked": stacked}
times = {k: [] for k in fns}
for r in range(8):
    for k, f in fns.items():
        den.zero_grad(set_to_none=True); emb.grad = None
        s = time.perf_counter(); f(); dt = time.perf_counter() - s
        if r: times[k].append(dt)
med = {k: statistics.median(v) * 1000 for k, v in times.items()}
print(f"batch {B}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in med.items()) + f"; ratio {med['three calls'] / med['stacked']:.2f}")
