#!/usr/bin/env python
"""bench/bench_branches.py [BATCH]: the training step's three prior branches (fused, global, local) through the
denoiser MLP, side by side in one run: three calls in one graph (before 2026-12-01) vs one stacked pass
(`Denoiser.forward(..., branches=3)`, now). Forward + backward into the weights at the paper config (feature_dim
6144, 7 classes, T 1000); prints the median of 7 alternating rounds of each, after a warm-up round."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch

from diffmic.models.denoiser import Denoiser

ROUNDS = 7


def main(batch: int) -> None:
    torch.manual_seed(0)
    den = Denoiser(7, 1000, encoder="test_resnet", feature_dim=6144).train()  # the encoder is not timed
    emb = torch.randn(batch, 6144, requires_grad=True)
    y_t, prior = torch.randn(3, batch, 7), torch.softmax(torch.randn(3, batch, 7), 2)
    t = torch.randint(0, 1000, (batch,))

    def three_calls() -> None:
        sum(den(emb, y_t[i], prior[i], t).square().sum() for i in range(3)).backward()

    def stacked() -> None:
        den(emb, y_t.flatten(0, 1), prior.flatten(0, 1), t.repeat(3), branches=3).square().sum().backward()

    fns: dict[str, Callable[[], None]] = {"three calls": three_calls, "stacked": stacked}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(ROUNDS + 1):
        for name, fn in fns.items():
            den.zero_grad(set_to_none=True)
            emb.grad = None
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(v) * 1000 for name, v in times.items()}
    print(f"batch {batch}: " + ", ".join(f"{name} {v:.0f} ms" for name, v in ms.items())
          + f"; ratio {ms['three calls'] / ms['stacked']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
