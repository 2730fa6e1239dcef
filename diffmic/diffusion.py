"""Label diffusion with a prior mean (CARD / DiffMIC): schedules, forward process, posterior, samplers.

The diffusion runs over the C-dim label vector, not the image. The forward process pulls the one-hot y0 towards a
prior ŷ given by the guidance network:

    y_t = √ᾱ_t · y0 + (1 − √ᾱ_t) · ŷ + √(1 − ᾱ_t) · ε

Arrays are indexed t = 0..T−1 as in the official code (index 0 is the paper's t = 1). Schedule arrays are built in
float64 and cast once to the working dtype. Pinned against numbers from the official code (tests/data/): β and ᾱ of
every schedule to ~1e-10, and the posterior coefficients, one reverse step and the sampling loop for the linear
schedule, the only one with official vectors; for the others those follow the same formulas, unpinned.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from diffmic.choices import SAMPLERS, SCHEDULES, USABLE_SCHEDULES

# eps_fn(y_t, prior, t) -> predicted noise; t is a LongTensor of shape (N,)
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_beta_schedule(name: str, timesteps: int, start: float = 1e-4, end: float = 2e-2) -> torch.Tensor:
    """β_0..β_{T−1} in float64, with the official code's definitions (quirks included, see the reference)."""
    T = timesteps
    f64 = dict(dtype=torch.float64)
    if name == "linear":
        return torch.linspace(start, end, T, **f64)
    if name == "const":
        return torch.full((T,), end, **f64)
    if name == "quad":
        return torch.linspace(start**0.5, end**0.5, T, **f64) ** 2
    if name == "jsd":
        return 1.0 / torch.linspace(T, 1, T, **f64)
    if name == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, **f64)) * (end - start) + start
    if name in ("cosine", "cosine_reverse"):  # Nichol & Dhariwal; the official 'reverse' is not reversed
        s = 0.008
        steps = torch.arange(T + 1, **f64) / T
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    if name == "cosine_anneal":
        i = torch.arange(T, **f64)
        return start + 0.5 * (end - start) * (1 - torch.cos(math.pi * i / (T - 1)))
    raise ValueError(f"diffusion.schedule={name!r}: expected one of {', '.join(SCHEDULES)}")


def antithetic_timesteps(n: int, timesteps: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """⌊n/2⌋+1 uniform draws followed by their mirrors T−1−t, cut to n (the official rule, odd/even quirk kept)."""
    draws = torch.randint(0, timesteps, (n // 2 + 1,), generator=generator)
    return torch.cat([draws, timesteps - 1 - draws])[:n].to(device)


class NoiseSchedule:
    """One small object holding β/ᾱ and the CARD posterior coefficients; the denoiser knows nothing about it."""

    def __init__(self, name: str = "linear", timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 2e-2, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 beta_steps: int | None = None):
        if timesteps < 2:
            raise ValueError(f"diffusion.timesteps={timesteps}: expected an integer >= 2")
        if name not in USABLE_SCHEDULES:
            raise ValueError(f"diffusion.schedule={name!r}: expected one of {', '.join(USABLE_SCHEDULES)}"
                             + (" (jsd ends at alpha_bar = 0, where the reverse chain divides by zero)"
                                if name == "jsd" else ""))
        if beta_steps:  # the range is given for a beta_steps-long chain: rescale so y_T is as noisy for every T
            beta_start, beta_end = (b * beta_steps / timesteps for b in (beta_start, beta_end))
        if not 0 < beta_start < beta_end < 1 and name not in ("jsd", "cosine", "cosine_reverse", "const"):
            raise ValueError(f"diffusion beta range [{beta_start}, {beta_end}]: expected 0 < beta_start < beta_end < 1")
        self.name, self.timesteps = name, timesteps
        self.reference_steps = beta_steps or timesteps  # the chain length that β and the official start refer to
        betas = make_beta_schedule(name, timesteps, beta_start, beta_end)
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        one_minus_bar_sqrt = torch.sqrt(1 - alphas_cumprod)
        if name == "cosine":  # the official trainer's code shrinks this for 'cosine' only (keeps t=T−1 finite)
            one_minus_bar_sqrt = one_minus_bar_sqrt * 0.9999
        # The official p_sample recomputes √ᾱ from √(1−ᾱ) rather than reading it; do the same for parity.
        bar_sqrt = torch.sqrt(1 - one_minus_bar_sqrt**2)
        # Posterior terms as the official p_sample forms them: from squares of √(1−ᾱ), never from ᾱ directly.
        var = one_minus_bar_sqrt**2
        var_prev = torch.cat([torch.zeros(1, dtype=torch.float64), var[:-1]])
        bar_sqrt_prev = torch.cat([torch.ones(1, dtype=torch.float64), bar_sqrt[:-1]])
        arrays64 = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_bar_sqrt": torch.sqrt(alphas_cumprod),
            "one_minus_alphas_bar_sqrt": one_minus_bar_sqrt,
            "bar_sqrt": bar_sqrt,
            # CARD posterior q(y_{t−1} | y_t, y0, ŷ) = γ0·y0 + γ1·y_t + γ2·ŷ, variance β̃ ("fixedsmall")
            "gamma_0": (1 - alphas) * bar_sqrt_prev / var,
            "gamma_1": var_prev * torch.sqrt(alphas) / var,
            # √ᾱ_t written as √α_t·√ᾱ_{t−1}: γ2 ≈ 1e-9 at t=1 is a cancellation, and this form reproduces the
            # official value to its last digit
            "gamma_2": 1 + (torch.sqrt(alphas) * bar_sqrt_prev - 1) * (torch.sqrt(alphas) + bar_sqrt_prev) / var,
            "beta_tilde": var_prev / var * (1 - alphas),
        }
        self.dtype, self.device = dtype, torch.device(device)
        for key, value in arrays64.items():
            setattr(self, key, value.to(device=self.device, dtype=dtype))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NoiseSchedule":
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if device == self.device and dtype == self.dtype:
            return self
        out = object.__new__(NoiseSchedule)
        out.__dict__.update({k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v)
                             for k, v in self.__dict__.items()})
        out.device, out.dtype = device, dtype
        return out

    def official_start(self, steps: int) -> int:
        """The official sampler's start index for this chain: `steps` counts on the reference chain (the paper's
        250 of 1000 for ISIC) and scales to T as β does, so the chain starts equally noisy for every T."""
        return max(1, min(self.timesteps, round(steps * self.timesteps / self.reference_steps)))

    @staticmethod
    def _at(array: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return array.gather(0, t.to(array.device)).view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def q_sample(self, y0: torch.Tensor, prior: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """y_t = √ᾱ_t y0 + (1 − √ᾱ_t) ŷ + √(1−ᾱ_t) ε."""
        a = self._at(self.alphas_bar_sqrt, t, y0)
        s = self._at(self.one_minus_alphas_bar_sqrt, t, y0)
        return a * y0 + (1 - a) * prior + s * noise

    def predict_y0(self, y_t: torch.Tensor, prior: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Invert the forward process for y0 given a noise estimate (the official 'y_0_reparam')."""
        a = self._at(self.bar_sqrt, t, y_t)
        s = self._at(self.one_minus_alphas_bar_sqrt, t, y_t)
        return (y_t - (1 - a) * prior - s * eps) / a

    def posterior_mean(self, y_t: torch.Tensor, y0: torch.Tensor, prior: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g0, g1, g2 = (self._at(g, t, y_t) for g in (self.gamma_0, self.gamma_1, self.gamma_2))
        return g0 * y0 + g1 * y_t + g2 * prior

    def p_sample(self, y_t: torch.Tensor, prior: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                 z: torch.Tensor) -> torch.Tensor:
        """One ancestral step t → t−1 (t ≥ 1) with the CARD posterior and variance β̃."""
        y0 = self.predict_y0(y_t, prior, eps, t)
        return self.posterior_mean(y_t, y0, prior, t) + self._at(self.beta_tilde, t, y_t).sqrt() * z

    def ddim_step(self, y_t: torch.Tensor, prior: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                  t_prev: torch.Tensor, eta: float, z: torch.Tensor) -> torch.Tensor:
        """DDIM on the prior-centred variable y − ŷ, which follows the standard DDPM marginals."""
        y0 = self.predict_y0(y_t, prior, eps, t)
        a_t = self._at(self.alphas_cumprod, t, y_t)
        a_s = self._at(self.alphas_cumprod, t_prev, y_t)
        sigma = eta * torch.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        direction = torch.sqrt(torch.clamp(1 - a_s - sigma**2, min=0)) * eps
        return prior + a_s.sqrt() * (y0 - prior) + direction + sigma * z


def sample(schedule: NoiseSchedule, eps_fn: EpsFn, prior: torch.Tensor, sampler: str = "official",
           steps: int | None = None, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run a reverse chain from the prior and return the y0 estimate (N×C).

    official: the official truncated chain — starts at index s−1 of the T-step schedule from ŷ + N(0, I) and
              steps down one index at a time; `steps` counts on the reference chain (`beta_steps`), s = its share
              of T (`NoiseSchedule.official_start`; s = steps when T is the reference length).
    ddpm:     the full ancestral chain over all T indices.
    ddim:     `steps` respaced indices from T−1 to 0, deterministic for eta=0.
    dcg:      no chain: log ŷ, the DCG's own logits up to a constant (its probabilities after the softmax).
    """
    T = schedule.timesteps
    if sampler not in SAMPLERS:
        raise ValueError(f"diffusion.sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if sampler == "dcg":
        return prior.clamp_min(1e-12).log()
    limit = schedule.reference_steps if sampler == "official" else T
    steps = limit if (sampler == "ddpm" or steps is None) else int(steps)
    if not 1 <= steps <= limit:
        raise ValueError(f"diffusion.sample_steps={steps}: expected 1..{limit} "
                         f"({'diffusion.beta_steps' if sampler == 'official' and limit != T else 'diffusion.timesteps'})")
    if sampler == "official":
        steps = schedule.official_start(steps)

    def randn() -> torch.Tensor:
        return torch.randn(prior.shape, generator=generator, device=prior.device, dtype=prior.dtype)

    def index(i: int) -> torch.Tensor:
        return torch.full((prior.shape[0],), i, dtype=torch.long, device=prior.device)

    if sampler in ("official", "ddpm"):
        y = prior + randn()
        for i in range(steps - 1, 0, -1):
            t = index(i)
            y = schedule.p_sample(y, prior, eps_fn(y, prior, t), t, randn())
        t = index(0)
        return schedule.predict_y0(y, prior, eps_fn(y, prior, t), t)

    ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive().tolist()
    y = prior + schedule.one_minus_alphas_bar_sqrt[ts[0]].to(prior.dtype) * randn()
    for i, i_prev in zip(ts[:-1], ts[1:]):
        y = schedule.ddim_step(y, prior, eps_fn(y, prior, index(i)), index(i), index(i_prev), eta, randn())
    t = index(ts[-1])
    return schedule.predict_y0(y, prior, eps_fn(y, prior, t), t)
