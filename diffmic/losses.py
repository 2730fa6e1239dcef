"""DiffMIC's objective: noise MSE on the fused-prior branch plus MMD between true and predicted noise on the
global- and local-prior branches (the paper's condition-specific MMD regulariser)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Mean over bandwidths s of exp(−‖a_i − b_j‖² / (s · C²)).

    s = 1 alone is the official kernel, exp(−mean_c (a_c − b_c)² / C); several values give a multi-scale kernel.
    """
    c = a.shape[1]
    sq = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return torch.stack([torch.exp(-sq / (s * c * c)) for s in bandwidths]).mean(0)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Biased (V-statistic) squared MMD, diagonals included, no square root — as in the official code."""
    return (gaussian_kernel(x, x, bandwidths).mean() + gaussian_kernel(y, y, bandwidths).mean()
            - 2 * gaussian_kernel(x, y, bandwidths).mean())


def diffusion_loss(noise: torch.Tensor, eps_fused: torch.Tensor, eps_global: torch.Tensor | None,
                   eps_local: torch.Tensor | None, mmd_weight: float,
                   bandwidths: Sequence[float] = (1.0,), mmd_target: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """L = ‖ε − ε̂‖² + λ · (MMD(ε, ε̂_g) + MMD(ε, ε̂_l)); with λ = 0 the two extra branches are not needed.
    `mmd_target` is the true noise when the MSE compares something else (ŷ0 against y0 for a residual head)."""
    mse = F.mse_loss(eps_fused, noise)
    noise = noise if mmd_target is None else mmd_target
    if mmd_weight == 0 or eps_global is None or eps_local is None:
        zero = mse.new_zeros(())
        return {"loss": mse, "mse": mse, "mmd": zero}
    reg = mmd(noise, eps_global, bandwidths) + mmd(noise, eps_local, bandwidths)
    return {"loss": mse + mmd_weight * reg, "mse": mse, "mmd": reg}
