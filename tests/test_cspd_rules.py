"""CSpD verification pieces: residual sampler, surrogate ratio, the diffusion head's Gaussian steps."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mulosd.decoding.cspd_rules import (
    accept_continuous,
    gaussian_log_density,
    residual_sample,
    surrogate_log_ratio,
)
from mulosd.errors import MulosdError
from mulosd.models.diffusion import DiffusionHead, DiffusionHeadConfig


def _pdf(x, m, s):
    return np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))


def _draws(n, tries, d, g):
    return (torch.randn(n, tries, d, generator=g, dtype=torch.float64),
            torch.rand(n, tries, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("qm,qs,scale", [(1.0, 1.0, 1.0), (0.5, 0.6, 1.0), (-0.3, 1.4, 1.3)])
def test_residual_sampler_1d_matches_the_integrated_residual(qm, qs, scale):
    n = 20_000
    g = torch.Generator().manual_seed(0)
    pm, ps = torch.zeros(n, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)
    x, tries, fell = residual_sample(pm, ps, torch.full_like(pm, qm), torch.full_like(ps, qs), math.log(scale),
                                     *_draws(n, 200, 1, g))
    assert not fell.any() and tries.min() >= 1
    grid = np.linspace(-10, 10, 200_001)
    dens = np.clip(scale * _pdf(grid, 0, 1) - _pdf(grid, qm, qs), 0, None)
    cdf = np.cumsum(dens)
    cdf /= cdf[-1]
    ks = stats.kstest(x[:, 0].numpy(), lambda v: np.interp(v, grid, cdf))
    assert ks.pvalue > 1e-3, ks


def test_residual_sampler_2d_binned_chi_square():
    n = 20_000
    g = torch.Generator().manual_seed(1)
    pm, ps = torch.zeros(n, 2, dtype=torch.float64), torch.ones(n, 2, dtype=torch.float64)
    qm = torch.tensor([0.6, -0.4], dtype=torch.float64).expand(n, 2)
    qs = torch.tensor([0.8, 1.1], dtype=torch.float64).expand(n, 2)
    x, _, fell = residual_sample(pm, ps, qm, qs, 0.0, *_draws(n, 200, 2, g))
    assert not fell.any()
    edges = np.linspace(-4, 4, 9)
    fine = np.linspace(-6, 6, 1201)
    X, Y = np.meshgrid(fine, fine, indexing="ij")
    dens = np.clip(_pdf(X, 0, 1) * _pdf(Y, 0, 1) - _pdf(X, 0.6, 0.8) * _pdf(Y, -0.4, 1.1), 0, None)
    ix, iy = np.digitize(fine, edges), np.digitize(fine, edges)
    cells = {}
    for a in range(len(edges) + 1):
        for b in range(len(edges) + 1):
            cells[(a, b)] = dens[np.ix_(ix == a, iy == b)].sum()
    total = sum(cells.values())
    sx, sy = np.digitize(x[:, 0].numpy(), edges), np.digitize(x[:, 1].numpy(), edges)
    obs, exp = [], []
    for (a, b), mass in cells.items():
        if mass / total * n >= 5:
            obs.append(((sx == a) & (sy == b)).sum())
            exp.append(mass / total * n)
    obs, exp = np.array(obs, float), np.array(exp)
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_residual_sampler_flags_rows_that_never_accept():
    # p == q: the residual is empty, no proposal is ever accepted; the fallback is reported, not hidden
    m, s = torch.zeros(5, 2), torch.ones(5, 2)
    noise, u = _draws(5, 7, 2, torch.Generator().manual_seed(0))
    x, tries, fell = residual_sample(m, s, m, s, 0.0, noise, u)
    assert fell.all() and (tries == 7).all() and torch.equal(x, noise[:, -1])  # the fallback: p's last proposal
    with pytest.raises(MulosdError, match="noise"):
        residual_sample(m, s, m, s, 0.0, noise[:, :, :1], u)


def test_residual_sampler_rows_depend_on_their_own_draws_only():
    g = torch.Generator().manual_seed(3)
    pm, ps = torch.randn(6, 2, generator=g), torch.rand(6, 2, generator=g) + 0.5
    qm, qs = pm + 0.7, ps * 0.9
    noise, u = _draws(6, 50, 2, g)
    x, tries, _ = residual_sample(pm, ps, qm, qs, 0.1, noise, u)
    x1, tries1, _ = residual_sample(pm[2:3], ps[2:3], qm[2:3], qs[2:3], 0.1, noise[2:3], u[2:3])
    assert torch.equal(x[2:3], x1) and torch.equal(tries[2:3], tries1)


def _chain(means, stds):
    return {"last_mean": means[-1], "last_std": stds[-1], "log_std_prefix": stds[:-1].log().sum((0, -1))}


def test_surrogate_ratio_is_one_for_identical_chains_and_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    means, stds = torch.randn(5, 3, 2, generator=g), torch.rand(5, 3, 2, generator=g) + 0.1
    x0 = means[-1] + stds[-1] * torch.randn(3, 2, generator=g)
    draft = _chain(means, stds)
    assert torch.equal(surrogate_log_ratio(x0, draft, draft), torch.zeros(3))
    tm, ts = means + 0.3, stds * 1.5
    target = _chain(tm, ts)
    want = (stds[:-1].log() - ts[:-1].log()).sum((0, 2))
    want += (torch.distributions.Normal(tm[-1], ts[-1]).log_prob(x0).sum(-1)
             - torch.distributions.Normal(means[-1], stds[-1]).log_prob(x0).sum(-1))
    assert torch.allclose(surrogate_log_ratio(x0, draft, target), want, atol=1e-5)
    assert accept_continuous(torch.zeros(4), torch.rand(4)).all()
    assert not accept_continuous(torch.full((4,), -50.0), torch.full((4,), 0.5)).any()
    # relaxation (the public code's inner temperature) divides the standardised distances, normalisers unchanged
    relaxed = surrogate_log_ratio(x0, draft, target, relax=42.0)
    zt, zd = (x0 - tm[-1]) / ts[-1] / 42, (x0 - means[-1]) / stds[-1] / 42
    want_relaxed = (stds[:-1].log() - ts[:-1].log()).sum((0, 2)) + (-0.5 * zt**2 - ts[-1].log() + 0.5 * zd**2
                                                                     + stds[-1].log()).sum(-1)
    assert torch.allclose(relaxed, want_relaxed, atol=1e-5)
    assert not torch.allclose(relaxed, surrogate_log_ratio(x0, draft, target))
    with pytest.raises(MulosdError, match="relaxation temperature must be >= 1"):
        surrogate_log_ratio(x0, draft, target, relax=0.5)


def test_gaussian_log_density_matches_torch():
    x, m, s = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 3) + 0.2
    assert torch.allclose(gaussian_log_density(x, m, s), torch.distributions.Normal(m, s).log_prob(x).sum(-1), atol=1e-5)


def _head(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = {"token_dim": 2, "cond_dim": 8, "width": 32, "depth": 2, "train_steps": 100, "sample_steps": 10, **kw}
    return DiffusionHead(DiffusionHeadConfig(**cfg))


def test_head_steps_are_gaussian_and_shared_noise_aligns_identical_heads():
    head = _head()
    z = torch.randn(6, 8)
    a = head.sample(z)
    assert a["x"].shape == a["last_mean"].shape == a["last_std"].shape == (6, 2) and a["log_std_prefix"].shape == (6,)
    assert (a["last_std"] > 0).all()
    b = head.sample(z, noise=a["noise"])
    assert torch.equal(a["x"], b["x"])  # same noise, same head: the same trajectory
    r = surrogate_log_ratio(a["x"], a, b)
    assert torch.equal(r, torch.zeros(6))  # identical heads: acceptance 100 %
    other = _head(seed=1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c = other.sample(z, noise=a["noise"])
    assert not torch.equal(c["x"], a["x"])
    with pytest.raises(MulosdError, match="noise must have shape"):
        head.sample(z, noise=torch.randn(3, 6, 2))


def test_head_sampling_matches_its_step_function_and_guidance_mixes_the_noise():
    """sample() (batched modulation, float constants) walks exactly the chain step() defines; with cfg_scale the
    guided chain equals a head whose noise prediction is uncond + s (cond - uncond)."""
    head = _head(seed=2, clip_x0=0.0)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
        z = torch.randn(4, 8)
        a = head.sample(z)
        x, prefix = a["noise"][0], torch.zeros(4)
        for k, i in enumerate(range(9, -1, -1)):
            mean, std = head.step(x, i, z)
            prefix = prefix + (std.log().sum(-1) if k < 9 else 0)
            x = mean + std * a["noise"][k + 1]
        assert torch.allclose(a["x"], x, atol=1e-5) and torch.allclose(a["log_std_prefix"], prefix, atol=1e-5)
        zu = torch.randn(4, 8)
        guided = head.sample(torch.cat([z, zu]), noise=a["noise"], cfg_scale=1.0)
        assert torch.allclose(guided["x"], a["x"], atol=1e-5)  # s = 1: the conditional chain
        g3 = head.sample(torch.cat([z, zu]), noise=a["noise"], cfg_scale=3.0)
        assert not torch.allclose(g3["x"], a["x"], atol=1e-3)
        with pytest.raises(MulosdError, match="temperature > 0"):
            head.sample(z, temperature=0.0)


def test_head_reports_nan_steps():
    head = _head()
    with torch.no_grad():
        head.cond.bias.fill_(float("nan"))
    with pytest.raises(MulosdError, match="produced NaN"):
        head.sample(torch.randn(2, 8))


def test_head_learns_a_conditional_gaussian():
    """A few hundred steps: z = +1 -> N(1.5, 0.3^2), z = -1 -> N(-1, 0.5^2) per dimension."""
    head = _head(sample_steps=20)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        sign = torch.randint(0, 2, (128, 1), generator=g).float() * 2 - 1
        z = sign.expand(-1, 8)
        x0 = torch.where(sign > 0, 1.5 + 0.3 * torch.randn(128, 2, generator=g), -1 + 0.5 * torch.randn(128, 2, generator=g))
        loss, _ = head.loss(x0, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pos = head.sample(torch.ones(1000, 8))["x"]
        neg = head.sample(-torch.ones(1000, 8))["x"]
    assert abs(pos.mean() - 1.5) < 0.15 and abs(neg.mean() + 1) < 0.15
    assert 0.15 < pos.std() < 0.5 and 0.3 < neg.std() < 0.75


def test_bad_head_config():
    with pytest.raises(MulosdError, match="sample_steps"):
        DiffusionHeadConfig(train_steps=10, sample_steps=20)
    with pytest.raises(MulosdError, match="token_dim must be an integer >= 1"):
        DiffusionHeadConfig(token_dim=0)
