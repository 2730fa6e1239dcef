"""diffmic.diffusion: parity with the official implementation (tests/data/*.json) and the invariants beyond it."""
import json
from pathlib import Path

import pytest
import torch

from diffmic.choices import SCHEDULES
from diffmic.diffusion import NoiseSchedule, antithetic_timesteps, make_beta_schedule, sample

DATA = Path(__file__).parent / "data"
F64 = dict(rtol=1e-9, atol=1e-12)


def load(name):
    return json.loads((DATA / f"{name}.json").read_text())


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), t64(expected), **(tol or F64))


SCHED = load("schedules")


@pytest.mark.parametrize("name", list(SCHED["schedules"]))
def test_schedules_match_official_float64(name):
    ref = SCHED["schedules"][name]["float64"]
    for T, key in ((10, "T10"), (1000, "T1000")):
        betas = make_beta_schedule(name, T, SCHED["start"], SCHED["end"])
        ac = torch.cumprod(1 - betas, 0)
        r = ref[key]
        if T == 10:
            close(betas, r["betas"])
            close(ac, r["alphas_cumprod"])
        else:
            idx = SCHED["indices_T1000"]
            close(betas[idx], r["betas_at_indices"])
            close(ac[idx], r["alphas_cumprod_at_indices"])
        for stat in ("sum", "min", "max"):
            close(getattr(betas, stat)(), r[f"betas_{stat}"], rtol=1e-9, atol=1e-9)
            close(getattr(ac, stat)(), r[f"alphas_cumprod_{stat}"], rtol=1e-9, atol=1e-12)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="diffusion.schedule='nope'.*linear"):
        make_beta_schedule("nope", 10)


def test_jsd_is_refused_where_it_would_sample_nan():
    """jsd's last β is 1, so ᾱ_T = 0 and the first reverse step divides by √ᾱ (once accepted, NaN)."""
    assert make_beta_schedule("jsd", 10)[-1] == 1.0 and torch.cumprod(1 - make_beta_schedule("jsd", 10), 0)[-1] == 0
    with pytest.raises(ValueError, match="jsd ends at alpha_bar = 0"):
        NoiseSchedule("jsd", 10)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid", "quad"])
def test_alpha_bar_is_monotone_with_known_endpoints(name):
    s = NoiseSchedule(name, 1000, dtype=torch.float64)
    ac = s.alphas_cumprod
    assert torch.all(ac[1:] < ac[:-1])
    assert 0.99 < ac[0] < 1 and ac[-1] < 0.01


def test_q_sample_matches_official():
    ref = load("q_sample")
    s = NoiseSchedule("linear", ref["T"], ref["start"], ref["end"], dtype=torch.float64)
    for case in ref["cases"]:
        prior = torch.softmax(t64(case["prior_logits"]), 1)
        close(prior, case["float64"]["prior_yhat_softmax"])
        y = s.q_sample(t64(case["y0_one_hot"]), prior, torch.tensor(case["t"]), t64(case["noise"]))
        close(y, case["float64"]["y_t"])


def test_q_sample_at_last_step_is_prior_plus_noise():
    s = NoiseSchedule("linear", 1000, dtype=torch.float64)
    y0 = torch.eye(5)[torch.arange(4000) % 5].double()
    prior = torch.softmax(torch.randn(4000, 5, dtype=torch.float64), 1)
    y = s.q_sample(y0, prior, torch.full((4000,), 999), torch.zeros(4000, 5, dtype=torch.float64))
    assert (y - prior).abs().max() < 0.01  # √ᾱ_999 ≈ 0.0064
    noisy = s.q_sample(y0, prior, torch.full((4000,), 999), torch.randn(4000, 5, dtype=torch.float64))
    assert abs((noisy - prior).std().item() - 1) < 0.03


POST = load("posterior")


def test_posterior_coefficients_and_step_match_official():
    s = NoiseSchedule("linear", POST["T"], POST["start"], POST["end"], dtype=torch.float64)
    ref, inp = POST["float64"], POST["step_inputs"]
    idx = torch.tensor(POST["indices"])
    for ours, theirs in (("gamma_0", "gamma_0"), ("gamma_1", "gamma_1"), ("gamma_2", "gamma_2"),
                         ("beta_tilde", "beta_tilde"), ("alphas", "alpha_t"), ("bar_sqrt", "sqrt_alpha_bar_t")):
        close(getattr(s, ours)[idx], ref[theirs])
    close(s.bar_sqrt[idx - 1], ref["sqrt_alpha_bar_t_m_1"])
    prior = torch.softmax(t64(inp["prior_logits"]), 1)
    y_t, eps, z = t64(inp["y_t"]), t64(inp["eps_theta"]), t64(inp["z"])
    for k, i in enumerate(POST["indices"]):
        t = torch.full((len(y_t),), i)
        y0 = s.predict_y0(y_t, prior, eps, t)
        close(y0, ref["y_0_reparam"][k])
        close(s.posterior_mean(y_t, y0, prior, t), ref["posterior_mean"][k])
        close(s.p_sample(y_t, prior, eps, t, z), ref["y_t_minus_1"][k])
    close(s.predict_y0(y_t, prior, eps, torch.zeros(len(y_t), dtype=torch.long)), ref["final_step_t0"]["y_0"])


def test_official_sampling_loop_matches_official():
    ex = POST["p_sample_loop_example"]
    s = NoiseSchedule("linear", POST["T"], POST["start"], POST["end"], dtype=torch.float64)
    draws = iter(t64(d) for d in ex["randn_draws_in_order"])
    eps_calls = iter(t64(e) for e in ex["eps_theta_per_model_call"])
    seen_t = []

    def eps_fn(y_t, prior, t):
        seen_t.append(int(t[0]))
        return next(eps_calls)

    import diffmic.diffusion as dd
    real_randn = torch.randn
    try:  # feed the official draws in order instead of fresh noise
        dd.torch.randn = lambda *a, **k: next(draws)
        y0 = sample(s, eps_fn, torch.softmax(t64(ex["prior_logits"]), 1), "official", ex["n_steps"])
    finally:
        dd.torch.randn = real_randn
    assert [[t] for t in seen_t] == ex["float64"]["t_passed_to_model_in_order"]
    close(y0, ex["float64"]["y_0_only_last_sample"])


def test_posterior_is_consistent_with_forward_process():
    """The CARD posterior mean at the true y0 equals E[y_{t−1} | y_t, y0], checked against a float64 derivation."""
    s = NoiseSchedule("linear", 1000, dtype=torch.float64)
    y0 = torch.eye(3, dtype=torch.float64)
    prior = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    for i in (1, 10, 500, 999):
        t = torch.full((3,), i)
        a_t, a_prev, b = s.alphas_cumprod[i], s.alphas_cumprod[i - 1], s.betas[i]
        y_t = s.q_sample(y0, prior, t, torch.randn(3, 3, dtype=torch.float64))
        # Gaussian posterior of the prior-centred variable x = y − ŷ (standard DDPM form)
        mean = (a_prev.sqrt() * b / (1 - a_t)) * (y0 - prior) + ((1 - b).sqrt() * (1 - a_prev) / (1 - a_t)) * (y_t - prior)
        torch.testing.assert_close(s.posterior_mean(y_t, y0, prior, t), prior + mean, rtol=1e-10, atol=1e-12)


def test_ddim_with_all_steps_and_eta_one_is_the_ddpm_step():
    s = NoiseSchedule("linear", 1000, dtype=torch.float64)
    prior = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    y_t, eps = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    zero = torch.zeros_like(y_t)
    for i in (1, 50, 999):
        t, t_prev = torch.full((4,), i), torch.full((4,), i - 1)
        ddpm_mean = s.p_sample(y_t, prior, eps, t, zero)
        torch.testing.assert_close(s.ddim_step(y_t, prior, eps, t, t_prev, 1.0, zero), ddpm_mean, rtol=1e-7, atol=1e-9)
        # and the noise scales agree: σ(η=1) = √β̃
        unit = torch.ones_like(y_t)
        torch.testing.assert_close(s.ddim_step(y_t, prior, eps, t, t_prev, 1.0, unit) - s.ddim_step(y_t, prior, eps, t, t_prev, 1.0, zero),
                                   s.beta_tilde[i].sqrt().expand_as(y_t), rtol=1e-9, atol=1e-12)


def test_samplers_recover_y0_with_an_oracle_denoiser():
    """With the true noise as ε̂, every sampler returns the clean one-hot label."""
    s = NoiseSchedule("linear", 100, dtype=torch.float64)
    y0 = torch.eye(4, dtype=torch.float64)
    prior = torch.softmax(torch.randn(4, 4, dtype=torch.float64), 1)

    def oracle(y_t, p, t):
        a = s.alphas_bar_sqrt[t].view(-1, 1)
        return (y_t - a * y0 - (1 - a) * p) / s.one_minus_alphas_bar_sqrt[t].view(-1, 1)

    g = torch.Generator().manual_seed(0)
    for sampler, steps in (("ddpm", None), ("ddim", 10), ("ddim", 100), ("official", 100)):
        y = sample(s, oracle, prior, sampler, steps, generator=g)
        torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)


def test_sampler_errors_name_the_value():
    s = NoiseSchedule("linear", 10)
    with pytest.raises(ValueError, match="sample_steps=11: expected 1..10"):
        sample(s, lambda y, p, t: y, torch.zeros(1, 2), "official", 11)
    with pytest.raises(ValueError, match="sampler='ddim2'"):
        sample(s, lambda y, p, t: y, torch.zeros(1, 2), "ddim2", 5)
    with pytest.raises(ValueError, match="timesteps=1"):
        NoiseSchedule("linear", 1)


def test_antithetic_timesteps_structure_and_official_draws():
    ref = load("timesteps")
    for ex in ref["examples"]:
        torch.manual_seed(ex["torch_manual_seed"])
        t = antithetic_timesteps(ex["batch_size_n"], ex["T"])
        assert t.tolist() == ex["t"]
    t = antithetic_timesteps(9, 50, torch.Generator().manual_seed(1))
    assert len(t) == 9 and torch.equal(t[5:], 49 - t[:4])


def test_schedule_names_are_all_buildable():
    for name in SCHEDULES:
        assert make_beta_schedule(name, 20).shape == (20,)


def test_beta_steps_rescales_the_range_so_every_chain_ends_equally_noisy():
    full = NoiseSchedule("linear", 1000, beta_steps=1000, dtype=torch.float64)
    assert torch.equal(full.betas, NoiseSchedule("linear", 1000, dtype=torch.float64).betas)  # official at T=1000
    short = NoiseSchedule("linear", 100, beta_steps=1000, dtype=torch.float64)
    assert short.betas[0].item() == pytest.approx(1e-3) and short.betas[-1].item() == pytest.approx(0.2)
    unscaled = NoiseSchedule("linear", 100, dtype=torch.float64)
    # √ᾱ_T: the share of y0 left at the chain's start; ≈0 means y_T ≈ ŷ + N(0, I), what sampling starts from
    assert short.alphas_bar_sqrt[-1] < 0.01 < 0.5 < unscaled.alphas_bar_sqrt[-1]
