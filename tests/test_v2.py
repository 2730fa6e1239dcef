"""DiffMIC-v2 (diffmic/models/diffmic_v2.py) against numbers computed here, in float64 numpy, from the official code's
equations as ../shared/reference/diffmic-v2-method.md gives them (file:line of scott-yjyang/DiffMICv2 in comments):
the guidance map, the forward process, the DDIM chain diffusers 0.20 runs, the loss weighting and the read-out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmic.diffusion import NoiseSchedule
from diffmic.models.diffmic_v2 import CellConv, ddim, ddim_timesteps, guidance_map, q_sample
from helpers import TINY, compose

RNG = np.random.default_rng(7)


def official_alphas_cumprod(T: int = 1000) -> np.ndarray:
    """option/diff_DDIM.yaml:1-8: linear β from 1e-4 to 0.02 over the 1000 training steps."""
    return np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def official_guidance_map(y_g: np.ndarray, y_l: np.ndarray, n: int) -> np.ndarray:
    """diffuser_trainer.py:107-121, loops and all: Eq. 5 per cell, then the diagonal and the two anti-corners set
    again per sample (no-ops, the spec says; kept here so that the claim is tested too)."""
    b, c = y_g.shape
    m = np.zeros((b, c, n, n))
    for i in range(n):
        for j in range(n):
            d = abs(i - j) / (n - 1)
            m[:, :, i, j] = (1 - d) * y_g + d * y_l
    for s in range(b):
        for i in range(n):
            m[s, :, i, i] = y_g[s]
        m[s, :, 0, n - 1] = y_l[s]
        m[s, :, n - 1, 0] = y_l[s]
    return m


def test_the_guidance_map_is_eq5_with_the_official_loops():
    y_g, y_l = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    for n in (2, 6):
        ours = guidance_map(torch.tensor(y_g), torch.tensor(y_l), n).numpy()
        np.testing.assert_allclose(ours, official_guidance_map(y_g, y_l, n), rtol=0, atol=1e-12)
        assert np.allclose(ours, ours.transpose(0, 1, 3, 2))  # symmetric


def test_the_forward_process_has_no_prior_term_and_a_timestep_per_cell():
    """pipeline.py:53: y_t = √ᾱ_t·y0 + √(1−ᾱ_t)·ε, t of shape B×Np×Np (diffuser_trainer.py:144)."""
    ab = official_alphas_cumprod()
    np.testing.assert_allclose(np.sqrt(ab[[0, 100, 500, 900]]), [1.00, 0.946, 0.279, 0.016], atol=5e-3)  # §4.5
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02, dtype=torch.float64, beta_steps=1000)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), ab, rtol=1e-12)
    y0 = np.eye(4)[[1, 3]][:, :, None, None].repeat(6, 2).repeat(6, 3)
    t = RNG.integers(0, 1000, size=(2, 6, 6))
    eps = RNG.normal(size=y0.shape)
    expected = np.sqrt(ab[t])[:, None] * y0 + np.sqrt(1 - ab[t])[:, None] * eps
    ours = q_sample(schedule, torch.tensor(y0), torch.tensor(t), torch.tensor(eps)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def official_ddim(eps_fn, y: np.ndarray, steps: int, T: int = 1000) -> np.ndarray:
    """diffusers 0.20.2 DDIMScheduler built with T = 1000 (diffuser_trainer.py:69-71, not the 10-step factory of
    pipeline.py:59), set_timesteps(steps), eta 0: leading spacing, clip_sample, set_alpha_to_one."""
    ab = official_alphas_cumprod(T)
    ratio = T // steps
    for t in (np.arange(0, steps) * ratio)[::-1]:
        prev = t - ratio
        a_t, a_prev = ab[t], (ab[prev] if prev >= 0 else 1.0)
        e = eps_fn(y, t)
        x0 = np.clip((y - np.sqrt(1 - a_t) * e) / np.sqrt(a_t), -1, 1)
        y = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
    return y


def test_one_ddim_chain_matches_the_official_scheduler():
    assert ddim_timesteps(1000, 10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02, dtype=torch.float64, beta_steps=1000)
    w = RNG.normal(size=(4, 4)) * 0.3

    def eps_np(y, t):  # any fixed ε̂: a linear map of y_t plus a term in t
        return np.einsum("bcij,cd->bdij", y, w) + 0.001 * t

    def eps_torch(y, t):
        return torch.einsum("bcij,cd->bdij", y, torch.tensor(w)) + 0.001 * t.view(-1, 1, 1, 1).double()

    start = RNG.uniform(size=(2, 4, 6, 6))
    for steps in (10, 4):
        ours = ddim(schedule, eps_torch, torch.tensor(start), steps).numpy()
        np.testing.assert_allclose(ours, official_ddim(eps_np, start, steps), rtol=1e-10, atol=1e-12)
    assert np.abs(ours).max() <= 1.0  # the last step returns the clipped x̂0


def test_cells_never_interact_and_time_is_per_cell():
    """model.py:26-40: Conv1×1 ⊙ Embedding[t] per cell: a change of one cell's t or input changes that cell alone."""
    torch.manual_seed(0)
    layer = CellConv(8, 16, 50).double()
    u, t = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randint(0, 50, (2, 6, 6))
    out = layer(u, t)
    t2, u2 = t.clone(), u.clone()
    t2[1, 2, 3] = (t[1, 2, 3] + 1) % 50
    u2[0, :, 4, 4] += 1
    changed = (layer(u2, t2) != out).any(dim=1)
    assert out.shape == (2, 16, 6, 6) and changed.nonzero().tolist() == [[0, 4, 4], [1, 2, 3]]


@pytest.fixture(scope="module")
def v2():
    from diffmic.models import build_model
    cfg = compose([*TINY, "model=diffmic_v2", "model.dcg.pretrained=false", "diffusion.timesteps=1000",
                   "model.denoiser.output=eps"])  # the official noise head, whose equations the tests below check
    torch.manual_seed(0)
    return build_model(cfg, 4, cfg["dataset"]["image_size"]), cfg


@pytest.fixture(scope="module")
def v2_residual():
    from diffmic.models import build_model
    cfg = compose([*TINY, "model=diffmic_v2", "model.dcg.pretrained=false", "diffusion.timesteps=1000",
                   "model.denoiser.output=residual"])
    torch.manual_seed(0)
    return build_model(cfg, 4, cfg["dataset"]["image_size"]), cfg


def test_an_untrained_residual_head_ends_every_chain_on_the_prior_map(v2_residual):
    """ŷ0 = P + r with r = 0 at the start: DDIM (any steps, eta 0) lands on P, the probability-space guidance map,
    whose mean over the cells mixes the DCG's global and local priors."""
    model, cfg = v2_residual
    model.eval()
    x = torch.randn(3, 3, cfg["dataset"]["image_size"], cfg["dataset"]["image_size"])
    priors = model.priors(x)
    expected = guidance_map(priors.global_, priors.local, model.grid).mean(dim=(2, 3))
    for steps in (10, 3):
        pred = model.predict(x, sampler="ddim", steps=steps, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(pred.samples[0], expected, atol=1e-5)


def test_the_residual_loss_is_the_weighted_mse_of_y0_against_the_one_hot_map(v2_residual, monkeypatch):
    model, cfg = v2_residual
    model.train()
    x = torch.randn(4, 3, cfg["dataset"]["image_size"], cfg["dataset"]["image_size"])
    labels = torch.tensor([0, 1, 2, 3])
    r = torch.full((4, 4, model.grid, model.grid), 0.25)
    monkeypatch.setattr(model.denoiser, "forward", lambda f, y_t, m, t: r)
    priors = model._frozen_priors(x)
    p_map = guidance_map(priors.global_, priors.local, model.grid)
    y0 = torch.eye(4)[labels][:, :, None, None]
    w = 1 + model.focal_alpha * (1 - priors.fused.gather(1, labels[:, None]).squeeze(1))
    expected = (w * ((p_map + r - y0) ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(model(x, labels, generator=torch.Generator().manual_seed(3))["loss"], expected, rtol=1e-5)


def test_the_loss_weights_each_image_by_the_dcg_confidence_in_its_label(v2, monkeypatch):
    """diffuser_trainer.py:97-103,157: L = mean over (b, c, i, j) of (1 + 10·(1 − p_b))·(ε̂ − ε)²."""
    model, cfg = v2
    x = torch.randn(4, 3, cfg["dataset"]["image_size"], cfg["dataset"]["image_size"])
    labels = torch.tensor([0, 1, 2, 3])
    monkeypatch.setattr(model.denoiser, "forward", lambda f, y_t, m, t: torch.zeros_like(y_t))  # ε̂ = 0
    g = torch.Generator().manual_seed(3)
    out = model(x, labels, generator=g)
    h = torch.Generator().manual_seed(3)
    torch.randint(0, 1000, (4, model.grid, model.grid), generator=h)  # the timesteps, drawn first as forward does
    noise = torch.randn((4, 4, model.grid, model.grid), generator=h)
    p = model._frozen_priors(x).fused.gather(1, labels[:, None]).squeeze(1)
    expected = ((1 + 10 * (1 - p)) * (noise ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    model.focal_alpha = 0.0  # the paper's plain MSE
    assert torch.allclose(model(x, labels, generator=torch.Generator().manual_seed(3))["loss"], (noise ** 2).mean(),
                          rtol=1e-5)
    model.focal_alpha = 10.0


def test_joint_dcg_adds_the_dcgs_ce_and_keeps_the_guidance_detached(v2):
    """train.joint_dcg=true (not the official default): the DCG learns from its own CE, never from the noise loss."""
    model, cfg = v2
    model.train()
    x = torch.randn(4, 3, cfg["dataset"]["image_size"], cfg["dataset"]["image_size"])
    labels = torch.tensor([0, 1, 2, 3])
    frozen = model(x, labels, generator=torch.Generator().manual_seed(3))
    assert "dcg_ce" not in frozen
    model.zero_grad()
    frozen["loss"].backward()
    assert all(p.grad is None for p in model.dcg.parameters())  # official: the noise loss never reaches the DCG
    model.zero_grad()
    joint = model(x, labels, joint_dcg=True, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(joint["loss"], frozen["loss"].detach() + joint["dcg_ce"], rtol=1e-5)
    model.zero_grad()
    ce_only = torch.nn.functional.cross_entropy(model.dcg(x).fused.float(), labels)
    ce_only.backward()
    expected = [p.grad.clone() for p in model.dcg.parameters() if p.grad is not None]
    model.zero_grad()
    model(x, labels, joint_dcg=True, generator=torch.Generator().manual_seed(3))["loss"].backward()
    got = [p.grad for p in model.dcg.parameters() if p.grad is not None]
    assert len(got) == len(expected) > 0 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))
    model.zero_grad()


def test_the_readout_is_the_mean_over_the_cells(v2, monkeypatch):
    model, cfg = v2
    model.eval()
    x = torch.randn(3, 3, cfg["dataset"]["image_size"], cfg["dataset"]["image_size"])
    seen = {}

    def chain(schedule, eps_fn, y, steps, eta=0.0, generator=None):
        seen["steps"], seen["shape"] = steps, tuple(y.shape)
        return torch.arange(y.numel(), dtype=y.dtype).view_as(y)

    monkeypatch.setattr("diffmic.models.diffmic_v2.ddim", chain)
    pred = model.predict(x, sampler="official")
    grid = model.grid
    cells = torch.arange(3 * 4 * grid * grid, dtype=torch.float32).view(3, 4, grid, grid).mean(dim=(2, 3))
    assert seen == {"steps": 10, "shape": (3, 4, grid, grid)}  # the official 10 DDIM steps over the whole map
    assert torch.allclose(pred.samples[0], cells) and torch.allclose(pred.probs, torch.softmax(cells, 1))


@pytest.mark.slow  # two epochs of training (make test-fast skips it)
def test_v2_trains_evaluates_and_exports_through_the_engine(tmp_path):
    """The same training loop, checkpoint and bundle as DiffMIC; the bundle predicts with v2's DDIM-10."""
    import json

    from diffmic.bundle import load_bundle
    from diffmic.engine import train
    from diffmic.session import LocalSession

    cfg = compose([*TINY, "model=diffmic_v2", "model.dcg.pretrained=false", "train.epochs=2"])
    own = compose(["model=diffmic_v2"])["diffusion"]  # its own sampler over the preset's (synthetic: ddpm)
    assert (own["sampler"], own["sample_steps"], cfg["diffusion"]["sampler"]) == ("ddim", 10, "ddim")
    result = train(cfg, LocalSession(tmp_path / "run"))
    assert {"macro_f1", "dcg_macro_f1", "gain_macro_f1"} <= set(result.test)
    bundle = load_bundle(tmp_path / "run" / "model")
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model"]["kind"] == "diffmic_v2"
    x = torch.randn(2, 3, cfg["dataset"]["image_size"], cfg["dataset"]["image_size"])
    assert bundle.model.predict(x, sampler="ddim", steps=10).probs.shape == (2, 4)


def test_a_search_of_v2_takes_its_own_space_and_one_study_can_hold_both():
    from diffmic.config import validate_config, with_values
    from tune.study.space import check_against_config, parse_space

    cfg = compose(["model=diffmic_v2", "budget=cpu"], "search")
    params = parse_space(cfg["search"]["space"], cfg)
    assert {p.key for p in params} == {"diffusion.timesteps", "diffusion.schedule", "model.dcg.roi_count",
                                       "model.denoiser.focal_alpha", "model.denoiser.encoder"}  # no MMD weight
    check_against_config(params, cfg)
    assert {p["sampler"] for p in cfg["search"]["pareto"]} == {"ddim"}
    both = compose(["+search.space.model={key: model.kind, choice: [diffmic, diffmic_v2]}"], "search")
    check_against_config(parse_space(both["search"]["space"], both), both)
    v2 = with_values(both, {"model.kind": "diffmic_v2"})  # a v2 trial of a v1-composed config: v2's keys filled
    validate_config(v2)
    assert v2["model"]["denoiser"]["focal_alpha"] == 10.0 and v2["model"]["dcg"] == both["model"]["dcg"]


def test_the_report_compares_the_two_models_of_one_study():
    from types import SimpleNamespace

    import pandas as pd

    from tune.pages.selection import models_section

    summary = pd.DataFrame([{"model.kind": k, "val_macro_f1": v, "val_dcg_macro_f1": 0.5, "val_gain_macro_f1": v - 0.5}
                            for k, v in (("diffmic", 0.6), ("diffmic", 0.7), ("diffmic_v2", 0.8))])
    res = SimpleNamespace(trials=lambda d: summary, metric=lambda d: "val_macro_f1",
                          searches={"d": {"mode": "max"}})
    page = models_section(res, "d")
    assert "DiffMIC against DiffMIC-v2" in page and "<td>diffmic_v2</td><td>1</td><td>0.8</td>" in page
    assert "<td>diffmic</td><td>2</td><td>0.7</td><td>0.65</td>" in page
    assert models_section(SimpleNamespace(**{**vars(res), "trials": lambda d: summary.iloc[:2]}), "d") == ""
