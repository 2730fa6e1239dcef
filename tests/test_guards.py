"""Issue 22's guards on two fixes that nothing else would catch if they regressed: the priors of the diffusion loss
come from the DCG in eval mode, and the loss's MSE branch is the one fed the fused prior."""
import pytest
import torch

from diffmic.config import with_values
from diffmic.diffusion import antithetic_timesteps
from diffmic.models import build_model
from helpers import TINY, compose


def _model(output: str):
    torch.manual_seed(0)
    return build_model(with_values(compose(TINY), {"model.denoiser.output": output}), 3, 48, initial_weights=False)


def test_the_loss_takes_its_priors_from_the_dcg_in_eval_mode():
    model = _model("residual").train()
    for m in model.dcg.modules():  # running statistics far from any batch's: eval- and train-mode priors differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    x, y = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 0])
    seen = []
    original = model.loss
    model.loss = lambda x_, y_, priors, *a, **k: seen.append(priors) or original(x_, y_, priors, *a, **k)
    model(x, y, phase="diffusion", guidance="eval", mmd_weight=0.0)
    assert model.dcg.training  # put back as it was
    model.dcg.eval()
    with torch.no_grad():
        eval_priors = model.priors(x).fused
    model.dcg.train()
    with torch.no_grad():
        train_priors = model.priors(x).fused
    assert not torch.allclose(eval_priors, train_priors, atol=1e-3)
    torch.testing.assert_close(seen[0].fused, eval_priors)


@pytest.mark.parametrize("output", ["eps", "residual"])
def test_the_mse_branch_is_fed_the_fused_prior(output):
    model = _model(output).eval()
    model.denoiser.forward = lambda emb, y_t, prior, t, branches=1: prior  # the output is the prior each row got
    x, y = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        priors = model.priors(x)
    priors.global_, priors.local = torch.full_like(priors.fused, 0.9), torch.full_like(priors.fused, -0.4)
    g = torch.Generator().manual_seed(0)
    loss = model.loss(x, y, priors, mmd_weight=0.5, generator=torch.Generator().manual_seed(0))
    t = antithetic_timesteps(4, model.schedule.timesteps, g)
    noise = torch.randn((4, 3), generator=g)
    y0 = torch.nn.functional.one_hot(y, 3).float()
    if output == "eps":  # ε̂ = the fused prior itself
        expected = ((priors.fused - noise) ** 2).mean()
    else:  # ŷ0 = prior + r with r = the fused prior
        expected = ((y0 - 2 * priors.fused) ** 2).mean()
    assert loss["mse"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert t.shape == (4,)
