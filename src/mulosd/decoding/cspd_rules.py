"""Continuous speculative decoding (CSpD, Wang et al. 2024), the verification pieces as pure batched functions.

A continuous token x_0 is the end of a diffusion trajectory x_S -> ... -> x_1 -> x_0 whose reverse steps are
Gaussians N(mu_k, sigma_k^2). The drafter's head samples x_0 recording its noises; the target's head re-runs the same
steps **with the same noises** (trajectory alignment), giving its own means and stds. The marginal densities
p(x_0), q(x_0) have no closed form, so CSpD accepts with the surrogate ratio

    r~(x_0) = prod_{steps before the last} prod_d sigma_q / sigma_p  *  N(x_0; mu_p, sigma_p) / N(x_0; mu_q, sigma_q)

(last-step Gaussians of each model's own aligned path), in log space here. It is biased in general (measured in
docs/CSPD.md); with identical heads it is exactly 1. Rejected tokens are replaced by acceptance-rejection sampling
from the residual norm(max(0, S p_1 - q_1)) with the target's last step p_1 as proposal, S the std-ratio product.
"""

from __future__ import annotations

import math

import torch

from mulosd.errors import MulosdError

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, relax: float = 1.0) -> torch.Tensor:
    """Sum over the last axis of log N(x; mean, std^2); ``relax`` > 1 divides the standardised distance
    z = (x - mean) / std (so z^2 by relax^2), as the public code's inner temperature does: normalisers unchanged,
    so it is not a density any more."""
    z = (x - mean) / (std * relax) if relax != 1 else (x - mean) / std
    return (-0.5 * z.pow(2) - std.log() - 0.5 * LOG_2PI).sum(-1)


def surrogate_log_ratio(x0: torch.Tensor, draft: dict, target: dict, relax: float = 1.0) -> torch.Tensor:
    """log r~ for drafted tokens x0 [..., d]. ``draft`` / ``target``: each chain's "last_mean", "last_std" [..., d]
    (the Gaussian of the step that produced x0 on that model's own aligned path) and "log_std_prefix" [...] (the
    sum of log std over every earlier step and dimension), as :meth:`DiffusionHead.sample` returns them.
    relax = 1 is the paper's ratio; > 1 the public code's relaxation (approximate)."""
    if not relax >= 1:
        raise MulosdError(f"the relaxation temperature must be >= 1 (1 = the paper's ratio), got {relax}")
    steps = draft["log_std_prefix"] - target["log_std_prefix"]
    last = (gaussian_log_density(x0, target["last_mean"], target["last_std"], relax)
            - gaussian_log_density(x0, draft["last_mean"], draft["last_std"], relax))
    return steps + last


def accept_continuous(log_ratio: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept where u <= min(1, r~) (u uniform in [0, 1))."""
    return u.clamp_min(torch.finfo(u.dtype).tiny).log() <= log_ratio.clamp(max=0.0)


def residual_sample(p_mean: torch.Tensor, p_std: torch.Tensor, q_mean: torch.Tensor, q_std: torch.Tensor,
                    log_scale: torch.Tensor | float, noise: torch.Tensor,
                    u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw x ~ norm(max(0, S p(x) - q(x))), p = N(p_mean, p_std^2), q = N(q_mean, q_std^2), S = exp(log_scale),
    for every row [n, d] at once by acceptance-rejection with p as proposal: proposal j of row r is
    p_mean + p_std * noise[r, j], accepted when u[r, j] < max(0, 1 - q(x) / (S p(x))); the first accepted proposal
    is returned. The densities are the true Gaussians even when the accept test was relaxed (as in the public
    code). ``noise`` [n, T, d] and ``u`` [n, T] are pre-drawn (T = the bound on attempts), so all attempts are
    scored in one batched pass and a row's result depends on its own draws only.

    Fallback (documented in docs/CSPD.md): a row with no accepted proposal among its T returns its last proposal, a
    plain draw from p, and is flagged. Returns (x [n, d], tries [n] (attempts used), fell_back [n] bool)."""
    if noise.dim() != 3 or noise.shape[0] != p_mean.shape[0] or noise.shape[2] != p_mean.shape[1] or u.shape != noise.shape[:2]:
        raise MulosdError(f"residual sampling needs noise [n, T, d] and u [n, T] for {tuple(p_mean.shape)} rows; "
                          f"got {tuple(noise.shape)} and {tuple(u.shape)}")
    if noise.shape[1] < 1:
        raise MulosdError("residual sampling needs at least one attempt per row")
    x = p_mean[:, None] + p_std[:, None] * noise  # [n, T, d]
    log_scale = torch.as_tensor(log_scale, dtype=p_mean.dtype)
    log_scale = log_scale[:, None] if log_scale.dim() else log_scale
    log_p = gaussian_log_density(x, p_mean[:, None], p_std[:, None]) + log_scale
    log_q = gaussian_log_density(x, q_mean[:, None], q_std[:, None])
    alpha = (1 - (log_q - log_p).exp()).clamp_min(0)
    ok = u < alpha
    T = noise.shape[1]
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], T - 1, dtype=torch.long))
    out = x[torch.arange(len(x), device=x.device), first]
    fell_back = ~ok.any(1)
    return out, first + 1, fell_back
