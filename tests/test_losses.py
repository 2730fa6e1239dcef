"""diffmic.losses: MMD parity with the official kernel and its behaviour."""
import json
from pathlib import Path

import torch

from diffmic.losses import diffusion_loss, gaussian_kernel, mmd

CASES = json.loads((Path(__file__).parent / "data" / "mmd.json").read_text())["cases"]


def test_mmd_matches_official_float64():
    for case in CASES:
        x, y = torch.tensor(case["x"], dtype=torch.float64), torch.tensor(case["y"], dtype=torch.float64)
        torch.testing.assert_close(mmd(x, y), torch.tensor(case["mmd_float64"], dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)
        if case["kernel_xy_float64"] is not None:
            torch.testing.assert_close(gaussian_kernel(x, y), torch.tensor(case["kernel_xy_float64"], dtype=torch.float64),
                                       rtol=1e-9, atol=1e-12)


def test_mmd_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    assert mmd(x, x).item() == 0.0
    assert mmd(x, torch.randn(32, 5, generator=g) * 2 + 1).item() > 0


def test_bandwidth_sets_how_strongly_mmd_separates_sets():
    """The official bandwidth (C² divisor) is wider than the data scale (‖x−y‖² ≈ 2C): a narrower kernel near the
    median distance separates a shifted set more, a much wider one hardly at all."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 7, generator=g), torch.randn(64, 7, generator=g) + 0.5
    assert mmd(x, y, [0.3]) > mmd(x, y, [1.0]) > mmd(x, y, [3.0]) > mmd(x, y, [20.0]) > 0
    multi = mmd(x, y, [0.3, 1.0, 3.0])
    assert mmd(x, y, [3.0]) < multi < mmd(x, y, [0.3])


def test_loss_with_zero_mmd_weight_is_plain_mse():
    noise, pred = torch.zeros(4, 3), torch.ones(4, 3)
    out = diffusion_loss(noise, pred, None, None, mmd_weight=0.0)
    assert out["loss"].item() == 1.0 and out["mmd"].item() == 0.0



def test_loss_puts_mse_on_the_fused_branch_and_mmd_on_global_and_local():
    g = torch.Generator().manual_seed(2)
    noise, fused, glob, local = (torch.randn(16, 4, generator=g, dtype=torch.float64) * s for s in (1, 1.2, 2, 0.5))
    out = diffusion_loss(noise, fused, glob, local, mmd_weight=0.25)
    expected_mmd = mmd(noise, glob) + mmd(noise, local)
    torch.testing.assert_close(out["mse"], ((fused - noise) ** 2).mean())
    torch.testing.assert_close(out["mmd"], expected_mmd)
    torch.testing.assert_close(out["loss"], ((fused - noise) ** 2).mean() + 0.25 * expected_mmd)
    swapped = diffusion_loss(noise, glob, fused, local, mmd_weight=0.25)["loss"]  # a branch mix-up shows
    assert abs(swapped.item() - out["loss"].item()) > 1e-3
