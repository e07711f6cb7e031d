"""Verification rules: pure, batched tensor functions (no models, no Python loops over tokens).

A rule takes the target's probabilities p at the drafted cells (plus one extra "bonus" cell after them), the
drafted tokens, and the draft probabilities q they were actually sampled from, and returns which drafts are
accepted and the token to place at the first rejected cell. Uniforms come from the caller's per-image random
streams, so a rule is a deterministic function of its inputs.

Shapes: p [B, G + 1, V], q [B, G, V], draft [B, G], u_accept [B, G], u_resample [B].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mulosd.decoding.sampling import sample


@dataclass
class Verdict:
    accept: torch.Tensor  # [B, G] bool: each draft's own accept decision (before truncation at the first reject)
    num_accepted: torch.Tensor  # [B] long: length of the accepted prefix
    next_token: torch.Tensor  # [B] long: residual sample at the first rejected cell, or the bonus sample


def acceptance_probability(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) for drafted tokens x (q(x) > 0 because x was drawn from q)."""
    return (p_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny)).clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis. Where p <= q everywhere (then p == q and rejection has probability
    zero) the result falls back to p, so it is always a distribution."""
    r = (p - q).clamp_min(0.0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(torch.finfo(p.dtype).tiny), p)


def first_rejection(accept: torch.Tensor) -> torch.Tensor:
    """[B, G] bool -> [B] length of the all-accepted prefix."""
    return accept.long().cumprod(-1).sum(-1)


def verify_exact(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor,
                 u_resample: torch.Tensor) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft i with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection j sample norm(max(0, p_j - q_j)); if all G are accepted,
    sample the bonus token from p_G. The committed tokens follow p exactly."""
    B, G = draft.shape
    p_x = p[:, :G].gather(-1, draft[..., None]).squeeze(-1)
    q_x = q.gather(-1, draft[..., None]).squeeze(-1)
    accept = u_accept < acceptance_probability(p_x, q_x)
    n = first_rejection(accept)
    rows = torch.arange(B, device=p.device)
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, n]  # q = 0 at the bonus cell -> residual = p
    next_token = sample(residual_distribution(p[rows, n], q_next), u_resample)
    return Verdict(accept=accept, num_accepted=n, next_token=next_token)
