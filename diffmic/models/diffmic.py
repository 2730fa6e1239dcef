"""DiffMIC = DCG guidance + conditional denoiser + label diffusion; the pieces a training step and a prediction need."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffmic.choices import OUTPUTS
from diffmic.diffusion import NoiseSchedule, antithetic_timesteps, sample
from diffmic.losses import diffusion_loss
from diffmic.models.dcg import DCG, DCGOutput
from diffmic.models.denoiser import Denoiser


@dataclass
class Priors:
    fused: torch.Tensor   # probabilities ŷ (softmax of the DCG logits)
    global_: torch.Tensor
    local: torch.Tensor
    logits: DCGOutput


@dataclass
class Prediction:
    probs: torch.Tensor        # N×C, mean over samples of softmax(y0 / temperature) (diffmic.calibration)
    dcg_probs: torch.Tensor    # N×C, the DCG's fused prior alone
    entropy: torch.Tensor      # N, predictive entropy of `probs` (nats)
    sample_std: torch.Tensor   # N, std over samples of the predicted class's probability (0 for one sample)
    samples: torch.Tensor      # S×N×C, the chains' raw outputs ŷ0 (to fit the temperature on)
    guidance: DCGOutput | None = None  # the DCG's own pass over the images: CAMs and crop positions (diffmic.explain)


def start_at_zero(layer: nn.Module) -> None:
    """A residual head's last layer: r = 0 until trained, so the head starts on its DCG's prior, not on a random
    offset (v1 and v2 alike)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class DiffMIC(nn.Module):
    """`output` says what the denoiser's last layer means. "eps" (the paper): the noise ε̂, trained by its MSE.
    "residual": a correction r to the prior, ŷ0 = ŷ + r, trained by the MSE of ŷ0 against the one-hot label, the
    noise ε̂ = (y_t − ŷ − √ᾱ_t·r)/√(1−ᾱ_t) then follows from the forward process, so every sampler runs unchanged.
    An untrained residual head ends every chain on the prior itself: the head starts where its DCG is and training
    only has to learn where the image says the prior is wrong (bench/bench_gain.py measures both)."""

    def __init__(self, dcg: DCG, denoiser: Denoiser, schedule: NoiseSchedule, num_classes: int,
                 output: str = "eps"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"model.denoiser.output={output!r}: expected one of {', '.join(OUTPUTS)}")
        self.dcg, self.denoiser, self.schedule, self.num_classes = dcg, denoiser, schedule, num_classes
        self.output = output
        if output == "residual":
            start_at_zero(denoiser.out)

    def noise_estimate(self, out: torch.Tensor, y_t: torch.Tensor, prior: torch.Tensor, t: torch.Tensor
                       ) -> torch.Tensor:
        """ε̂ from the denoiser's output (itself for "eps"; derived from ŷ0 = ŷ + r for "residual")."""
        if self.output == "eps":
            return out
        a = self.schedule._at(self.schedule.bar_sqrt, t, y_t)
        s = self.schedule._at(self.schedule.one_minus_alphas_bar_sqrt, t, y_t)
        return (y_t - prior - a * out) / s

    def _apply(self, fn, recurse=True):  # keep the (non-module) schedule on the module's device
        super()._apply(fn, recurse)
        probe = next(self.parameters())
        self.schedule = self.schedule.to(device=probe.device)
        return self

    def priors(self, x: torch.Tensor) -> Priors:
        out = self.dcg(x)
        soft = lambda z: torch.softmax(z.float(), dim=1)  # noqa: E731 — priors live in probability space
        return Priors(soft(out.fused), soft(out.global_), soft(out.local), out)

    def loss(self, x: torch.Tensor, labels: torch.Tensor, priors: Priors, mmd_weight: float,
             mmd_bandwidths=(1.0,), generator: torch.Generator | None = None, ce_weight: float = 0.0
             ) -> dict[str, torch.Tensor]:
        """Noise MSE on the fused branch + MMD on the global/local branches, one encoder pass for all three.
        With the "residual" output the fused branch's MSE is taken on ŷ0 instead (every t weighs alike, so the
        noisy steps, where only the image and the prior can tell the class, are learnt as much as the clean ones).
        `ce_weight` adds the official code's optional λ_ce · CE(−(ŷ0 − 1)², label) on the fused branch."""
        y0 = nn.functional.one_hot(labels, self.num_classes).float()
        t = antithetic_timesteps(len(labels), self.schedule.timesteps, generator, device=x.device)
        noise = torch.randn(y0.shape, generator=generator, device="cpu" if generator is not None else x.device)
        noise = noise.to(x.device)
        embedding = self.denoiser.encode(x)
        # global and local first, then fused: the order in which separate calls updated BN's running statistics
        branches = (priors.global_, priors.local, priors.fused) if mmd_weight else (priors.fused,)
        y_t = torch.cat([self.schedule.q_sample(y0, p, t, noise) for p in branches])
        stacked, times = torch.cat(branches), t.repeat(len(branches))
        out = self.denoiser(embedding, y_t, stacked, times, len(branches)).float()
        eps = self.noise_estimate(out, y_t.float(), stacked.float(), times)
        *mmd_branches, fused = eps.chunk(len(branches))
        mmd_branches = mmd_branches or (None, None)
        if self.output == "residual":  # the MSE on ŷ0 = ŷ + r, the MMD still on the noise
            y0_hat = priors.fused.float() + out.chunk(len(branches))[-1]
            losses = diffusion_loss(y0, y0_hat, *mmd_branches, mmd_weight=mmd_weight, bandwidths=mmd_bandwidths,
                                    mmd_target=noise)
        else:
            losses = diffusion_loss(noise, fused, *mmd_branches, mmd_weight=mmd_weight, bandwidths=mmd_bandwidths)
            if ce_weight:  # ŷ0 of the ε head, only for the CE term
                y_t_fused = y_t.chunk(len(branches))[-1].float()
                y0_hat = self.schedule.predict_y0(y_t_fused, priors.fused.float(), fused, t)
        if ce_weight:
            ce = nn.functional.cross_entropy(-(y0_hat - 1) ** 2, labels)
            losses["ce"] = ce.detach()
            losses["loss"] = losses["loss"] + ce_weight * ce
        return losses

    def forward(self, x: torch.Tensor, labels: torch.Tensor, phase: str = "diffusion", joint_dcg: bool = True,
                mmd_weight: float = 0.5, mmd_bandwidths=(1.0,), guidance: str = "eval", ce_weight: float = 0.0
                ) -> dict[str, torch.Tensor]:
        """One training step's losses, as a single forward so that DDP sees every parameter it syncs.

        phase "dcg": DCG pre-training, cross-entropy on the fused logits only.
        phase "diffusion": the diffusion loss with priors detached from it (the official code back-propagates it
        through the DCG only to zero those gradients afterwards). `guidance` says where the priors come from:
        "eval" (the official trainer) takes them from the DCG in eval mode (BatchNorm running statistics, as at test
        time) and, with `joint_dcg`, runs a second, train-mode DCG pass for the joint CE step; "shared" lets one
        train-mode pass serve both (one DCG pass fewer, but priors normalised with batch statistics).
        """
        ce = None
        if phase == "dcg" or (joint_dcg and guidance == "shared"):
            out = self.priors(x)
            ce = nn.functional.cross_entropy(out.logits.fused.float(), labels)
            if phase == "dcg":
                return {"loss": ce, "dcg_ce": ce.detach()}
            priors = Priors(out.fused.detach(), out.global_.detach(), out.local.detach(), out.logits)
        else:
            was_training = self.dcg.training
            self.dcg.eval()
            with torch.no_grad():
                priors = self.priors(x)
            self.dcg.train(was_training)
            if joint_dcg:
                ce = nn.functional.cross_entropy(self.dcg(x).fused.float(), labels)
        losses = self.loss(x, labels, priors, mmd_weight, mmd_bandwidths, ce_weight=ce_weight)
        if ce is not None:
            losses["dcg_ce"] = ce.detach()
            losses["loss"] = losses["loss"] + ce
        return losses

    @torch.no_grad()
    def predict(self, x: torch.Tensor, sampler: str = "official", steps: int | None = None, eta: float = 0.0,
                num_samples: int = 1, generator: torch.Generator | None = None, temperature: float = 1.0
                ) -> Prediction:
        """Reverse chain from the fused prior; the image embedding is computed once and reused at every step.
        `temperature` is the model's fitted τ (diffmic.calibration), stored in its checkpoint and bundle."""
        priors = self.priors(x)
        embedding = self.denoiser.encode(x).repeat(num_samples, 1)
        prior = priors.fused.repeat(num_samples, 1)

        def eps_fn(y_t: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.denoiser(embedding, y_t.to(embedding.dtype), p.to(embedding.dtype), t).float()
            return self.noise_estimate(out, y_t, p, t)

        y0 = sample(self.schedule, eps_fn, prior, sampler, steps, eta, generator).view(num_samples, len(x), -1)
        probs = torch.softmax(y0 / temperature, dim=2)
        mean = probs.mean(0)
        entropy = -(mean * mean.clamp_min(1e-12).log()).sum(1)
        picked = probs.gather(2, mean.argmax(1).view(1, -1, 1).expand(num_samples, -1, 1)).squeeze(2)
        std = picked.std(0) if num_samples > 1 else torch.zeros_like(entropy)
        return Prediction(mean, priors.fused, entropy, std, y0, priors.logits)
