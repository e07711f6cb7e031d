"""How biased is CSpD's surrogate acceptance ratio? A 1-D toy where every density is known.

Each "model" is a DDPM chain whose noise prediction is the *exact* posterior mean for a Gaussian-mixture data
distribution (no network, no training error), run with the same schedule and the same reverse-step code as the
shipped diffusion heads (:meth:`DiffusionHead._gaussian`, S respaced steps of a 1000-step cosine schedule), and a
fixed variance interpolation v. The target chain's output distribution p is what exact speculative sampling would
reproduce; one CSpD step (draft from q with recorded noises, target replay with the same or fresh noises,
surrogate ratio, residual acceptance-rejection) gives some other distribution, and the total-variation distance
between the two (histograms of many samples, minus nothing: the sampling-noise floor, two independent batches of
p, is reported beside it) is the bias. ``scripts/cspd_bias.py`` writes the table in docs/CSPD.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mulosd.decoding.cspd_rules import accept_continuous, residual_sample, surrogate_log_ratio
from mulosd.models.diffusion import DiffusionHead, Schedule, cosine_alpha_bar


@dataclass
class MixtureChain:
    """A DDPM chain with the exact denoiser of sum_k w_k N(m_k, s_k^2) data (1-D tokens)."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    v: float = 0.5  # variance interpolation between beta~ (0) and beta (1)
    clip_x0: float = 5.0

    def eps(self, x: torch.Tensor, ab: float) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=x.dtype)
        m = torch.tensor(self.means, dtype=x.dtype)
        s2 = torch.tensor(self.stds, dtype=x.dtype) ** 2
        var = ab * s2 + 1 - ab  # x_t | component k
        log_r = torch.log(w) - 0.5 * torch.log(var) - 0.5 * (x - math.sqrt(ab) * m) ** 2 / var
        r = torch.softmax(log_r, dim=-1)
        x0 = (r * (m + math.sqrt(ab) * s2 / var * (x - math.sqrt(ab) * m))).sum(-1, keepdim=True)
        return (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)

    def sample(self, noise: torch.Tensor, sched: Schedule) -> dict:
        """noise [S + 1, n, 1] -> the same dict as DiffusionHead.sample."""
        S = len(sched)
        x, prefix = noise[0], torch.zeros(noise.shape[1], dtype=noise.dtype)
        for k, i in enumerate(range(S - 1, -1, -1)):
            eps = self.eps(x, float(sched.alpha_bar[i]))
            mean, std = DiffusionHead._gaussian(x, eps, torch.full_like(x, self.v), i, sched, self.clip_x0)
            if k < S - 1:
                prefix = prefix + std.log().sum(-1)
            x = mean + std * noise[k + 1]
        return {"x": x, "last_mean": mean, "last_std": std, "log_std_prefix": prefix}


def schedule(sample_steps: int, train_steps: int = 1000) -> Schedule:
    ts = torch.linspace(1, train_steps, sample_steps).round().long() if sample_steps > 1 else torch.tensor([train_steps])
    return Schedule(cosine_alpha_bar(train_steps), ts)


def total_variation(a: torch.Tensor, b: torch.Tensor, lo: float = -5.0, hi: float = 5.0, bins: int = 100) -> float:
    """TV distance between the histograms of two 1-D samples (outside [lo, hi] pooled into the end bins)."""
    ha = torch.histc(a.clamp(lo, hi).flatten().double(), bins, lo, hi) / a.numel()
    hb = torch.histc(b.clamp(lo, hi).flatten().double(), bins, lo, hi) / b.numel()
    return 0.5 * float((ha - hb).abs().sum())


def cspd_step(target: MixtureChain, drafter: MixtureChain, n: int, sched: Schedule, align: bool = True,
              relax: float = 1.0, max_tries: int = 100, seed: int = 0) -> dict:
    """One CSpD token for n independent problems: acceptance rate, fallbacks, and the bias (TV to the target chain)."""
    g = torch.Generator().manual_seed(seed)
    S = len(sched)
    shape = (S + 1, n, 1)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    q = drafter.sample(noise, sched)
    p = target.sample(noise if align else torch.randn(shape, generator=g, dtype=torch.float64), sched)
    log_ratio = surrogate_log_ratio(q["x"], q, p, relax)
    accept = accept_continuous(log_ratio, torch.rand(n, generator=g, dtype=torch.float64))
    resid, _, fell = residual_sample(p["last_mean"], p["last_std"], q["last_mean"], q["last_std"],
                                     q["log_std_prefix"] - p["log_std_prefix"],
                                     torch.randn(n, max_tries, 1, generator=g, dtype=torch.float64),
                                     torch.rand(n, max_tries, generator=g, dtype=torch.float64))
    out = torch.where(accept[:, None], q["x"], resid)
    ref = target.sample(torch.randn(shape, generator=g, dtype=torch.float64), sched)["x"]
    ref2 = target.sample(torch.randn(shape, generator=g, dtype=torch.float64), sched)["x"]
    return {"acceptance": float(accept.double().mean()), "fallback_rate": float((fell & ~accept).double().mean()),
            "tv_cspd": total_variation(out, ref), "tv_floor": total_variation(ref2, ref),
            "tv_draft": total_variation(q["x"], ref)}


# the scenarios of docs/CSPD.md: (name, target, drafter)
BASE = MixtureChain(weights=(0.6, 0.4), means=(-1.0, 1.2), stds=(0.5, 0.3))
SCENARIOS = [
    ("identical models", BASE, BASE),
    ("drafter means shifted by 0.2", BASE, MixtureChain((0.6, 0.4), (-0.8, 1.4), (0.5, 0.3))),
    ("drafter mixture weights 0.4 / 0.6", BASE, MixtureChain((0.4, 0.6), (-1.0, 1.2), (0.5, 0.3))),
    ("drafter 30 % wider", BASE, MixtureChain((0.6, 0.4), (-1.0, 1.2), (0.65, 0.39))),
    ("same data, drafter variance v = 0.9 (target 0.5)", BASE, MixtureChain((0.6, 0.4), (-1.0, 1.2), (0.5, 0.3), v=0.9)),
]
