"""Verification rules: pure, batched tensor functions (no models, no Python loops over tokens).

A rule takes the target's probabilities p at the drafted cells (plus one extra "bonus" cell after them), the
drafted tokens, and the draft probabilities q they were actually sampled from, and returns which drafts are
accepted and the token to place at the first rejected cell. Uniforms come from the caller's per-image random
streams, so a rule is a deterministic function of its inputs.

Shapes: p [B, G + 1, V], q [B, G, V], draft [B, G], u_accept [B, G], u_resample [B].
"""

from __future__ import annotations

import math
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
    G = draft.shape[1]
    p_x = p[:, :G].gather(-1, draft[..., None]).squeeze(-1)
    q_x = q.gather(-1, draft[..., None]).squeeze(-1)
    accept = u_accept < acceptance_probability(p_x, q_x)
    return _truncate_and_resample(p, q, draft, accept, u_resample)


# ---- relaxed (lossy) rules --------------------------------------------------------------------------------------


NEIGHBOUR_CHUNK = 1024  # codebook rows per distance block in codebook_neighbours


def codebook_neighbours(codebook: torch.Tensor, k: int, include_self: bool = False) -> torch.Tensor:
    """[V, D] code vectors -> [V, k] indices of each code's k nearest codes by L2 distance, nearest first.
    ``include_self`` puts the code itself first (MuLo-SD's pooling set); LANTERN's list excludes it."""
    V = codebook.shape[0]
    limit = V if include_self else V - 1
    if not 0 <= k <= limit:
        raise ValueError(f"k={k} neighbours requested; allowed: 0..{limit} for a codebook of {V} entries")
    codes = codebook.double()
    out = []
    # rows in chunks: a 16384-code codebook (LlamaGen's VQ-16) would need a 2 GiB distance matrix at once
    for start in range(0, V, NEIGHBOUR_CHUNK):
        dist = torch.cdist(codes[start : start + NEIGHBOUR_CHUNK], codes)
        own = torch.arange(start, start + dist.shape[0], device=dist.device)
        dist[own - start, own] = -1.0 if include_self else float("inf")
        out.append(dist.argsort(dim=-1, stable=True)[:, :k])
    return torch.cat(out)


def _truncate_and_resample(p, q, draft, accept, u_resample, q_zero_mask=None) -> Verdict:
    """Shared tail of the rules: first rejection, then the residual norm(max(0, p - q)) at that cell (q optionally
    zeroed where ``q_zero_mask`` [B, G, V] is set), or the bonus sample from p after a fully accepted window."""
    B, G = draft.shape
    n = first_rejection(accept)
    rows = torch.arange(B, device=p.device)
    if q_zero_mask is not None:
        q = q.masked_fill(q_zero_mask, 0.0)
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, n]
    return Verdict(accept=accept, num_accepted=n, next_token=sample(residual_distribution(p[rows, n], q_next), u_resample))


def lantern_pooling(p: torch.Tensor, draft: torch.Tensor, neighbours: torch.Tensor, delta: float = 0.1,
                    lam: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LANTERN's relaxed target mass for each draft: p [..., V], draft [...] -> (p~(x) [...], pooled [..., V]),
    where ``pooled`` marks the neighbours whose mass was moved onto x (see :func:`verify_lantern`)."""
    nb = neighbours[draft]  # [..., k]
    p_nb = p.gather(-1, nb)
    p_x = p.gather(-1, draft[..., None]).squeeze(-1)
    budget = (lam - 1.0) * p_x if lam is not None else torch.full_like(p_x, delta)
    pooled = p_nb.cumsum(-1) <= budget[..., None]  # a prefix of the neighbour list (running sums only grow)
    p_tilde = p_x + (p_nb * pooled).sum(-1)
    return p_tilde, torch.zeros_like(p, dtype=torch.bool).scatter(-1, nb, pooled)


def verify_lantern(p, q, draft, u_accept, u_resample, neighbours: torch.Tensor, delta: float = 0.1,
                   lam: float | None = None) -> Verdict:
    """LANTERN relaxed acceptance (Jang et al., ICLR 2025), and LANTERN++'s multiplicative bound (Park et al.).

    For draft x with nearest codes n_1..n_k (``neighbours`` [V, k], self excluded) and running sums
    S_j = p(n_1) + ... + p(n_j), pool the longest prefix with S_j <= budget onto x: p~(x) = p(x) + S_J, where the
    budget is ``delta`` (absolute total-variation budget, LANTERN) or, when ``lam`` > 1 is given,
    (lam - 1) * p(x) (LANTERN++: p~(x) <= lam * p(x)). Accept with probability min(1, p~(x) / q(x)). At the first
    rejection sample norm(max(0, p - q')) where q' is q with the *pooled* neighbours zeroed.

    Deliberate deviation from the reference code, which zeroes q on the whole neighbour list whenever any
    neighbour was pooled: zeroing only the pooled ones makes delta = 0 (or k = 0) exactly speculative sampling
    (pooled neighbours then carry no target mass, so zeroing their q leaves max(0, p - q) unchanged)."""
    G = draft.shape[1]
    q_x = q.gather(-1, draft[..., None]).squeeze(-1)
    p_tilde, zero = lantern_pooling(p[:, :G], draft, neighbours, delta, lam)
    accept = u_accept < acceptance_probability(p_tilde, q_x)
    return _truncate_and_resample(p, q, draft, accept, u_resample, zero)


def verify_grouped(p, q, draft, u_accept, u_resample, codebook: torch.Tensor, group: int = 10,
                   prob_tol: float = 0.15, embed_tol: float = 0.5) -> Verdict:
    """Grouped Speculative Decoding (So et al., ICCV 2025), applied to SJD drafts.

    The group C(x) of draft x holds the tokens whose rank in the target distribution lies within
    floor(group / 2) of x's rank, whose probability differs from p(x) by less than ``prob_tol`` and whose
    (L2-normalised) code vector lies within ``embed_tol`` of x's. Accept with probability
    min(1, p(C) / q(C)); the residual is unchanged, norm(max(0, p - q)). ``group = 1`` gives C(x) = {x}: SJD."""
    G = draft.shape[1]
    V = p.shape[-1]
    half = group // 2
    p_draft = p[:, :G]
    order = p_draft.argsort(dim=-1, descending=True, stable=True)  # tokens by target rank
    rank_x = order.argsort(dim=-1, stable=True).gather(-1, draft[..., None])  # [B, G, 1]
    offsets = torch.arange(-half, half + 1, device=p.device)
    ranks = rank_x + offsets  # [B, G, 2h + 1]
    in_range = (ranks >= 0) & (ranks < V)
    cand = order.gather(-1, ranks.clamp(0, V - 1))
    p_c = p_draft.gather(-1, cand)
    p_x = p_draft.gather(-1, draft[..., None])
    dist = (codebook[cand] - codebook[draft][..., None, :]).norm(dim=-1)
    close = ((p_c - p_x).abs() < prob_tol) & (dist < embed_tol)
    member = in_range & (close | (offsets == 0))  # x itself (offset 0) always belongs to its group, once
    mass_p = (p_c * member).sum(-1)
    mass_q = (q.gather(-1, cand) * member).sum(-1)
    accept = u_accept < acceptance_probability(mass_p, mass_q)
    return _truncate_and_resample(p, q, draft, accept, u_resample)


def pooled_mass(p: torch.Tensor, draft: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """p(B_k(x)): the target probability pooled over draft x's k nearest codes, x included (``neighbours`` [V, k]
    from ``codebook_neighbours(..., include_self=True)``). p [..., V], draft [...] -> [...]."""
    return p.gather(-1, neighbours[draft]).sum(-1)


def pooled_threshold_accept(p: torch.Tensor, draft: torch.Tensor, neighbours: torch.Tensor, tau: float | torch.Tensor,
                            u: torch.Tensor | None = None) -> torch.Tensor:
    """MuLo-SD's acceptance: draft x at a cell is accepted when p(B_k(x)) (:func:`pooled_mass`) reaches ``tau``
    (a number, or one per cell [...]). No draft distribution is involved. p [..., V], draft [...] -> accept [...]
    bool. k = 1 tests p(x) >= tau alone; tau > 1 rejects everything.

    With uniforms ``u`` [...] the test is soft: x is accepted with probability min(1, p(B_k(x)) / tau), so a
    neighbourhood just under the threshold is sometimes kept and one just over it sometimes regenerated (tau = inf
    still rejects everything, and p(B_k(x)) >= tau still always accepts)."""
    pooled = pooled_mass(p, draft, neighbours)
    if u is None:
        return pooled >= tau
    return u * tau < pooled


def entropy_tau(p: torch.Tensor, tau: float, tau_peaked: float, k: int) -> torch.Tensor:
    """An entropy-adaptive threshold per cell: ``tau_peaked`` where the target's distribution p [..., V] is a
    point mass (entropy 0), falling linearly in the entropy H(p) to ``tau`` at H = log k (the entropy of a
    uniform spread over a pooling set) and staying there above it. A peaked target is then held to its few likely
    codes; a spread-out one is pooled as the paper does. tau_peaked = tau is the constant threshold."""
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)
    share = (h / max(math.log(k), 1e-6)).clamp(max=1.0)
    return tau_peaked + (tau - tau_peaked) * share


def restricted_sample(p: torch.Tensor, draft: torch.Tensor, neighbours: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A draw from the target's p restricted to the pooling set B_k(x) of draft x and renormalised: the code a
    passing neighbourhood commits under target-distributed acceptance. p [..., V], draft [...], u [...] -> [...].
    The set is walked in code order, so with k = V (B_k(x) is the whole codebook) it is :func:`sample` (p, u)
    token for token; a set without mass keeps x."""
    members = neighbours[draft].sort(-1).values  # [..., k]
    mass = p.gather(-1, members)
    pick = sample(mass, u)
    drawn = members.gather(-1, pick[..., None]).squeeze(-1)
    return torch.where(mass.sum(-1) > 0, drawn, draft)


# ---- draft trees (EAGLE-2) ------------------------------------------------------------------------------------------


@dataclass
class TreeVerdict:
    path: torch.Tensor  # [B, D] node indices (1 .. M) of the accepted path, -1 past its end
    num_accepted: torch.Tensor  # [B] long: accepted nodes
    next_token: torch.Tensor  # [B] long: the token after the accepted path


def verify_tree(p: torch.Tensor, tokens: torch.Tensor, children: torch.Tensor, u: torch.Tensor) -> TreeVerdict:
    """Exact verification of a tree of deterministic candidates.

    Node 0 is the root (the last committed token), nodes 1 .. M the drafts: ``tokens`` [B, 1 + M] (the root's is
    ignored), ``p`` [B, 1 + M, V] the target's distribution of the token *after* each node given the root's prefix
    and the node's ancestors, ``children`` [B, 1 + M, K] each node's children (-1: none). From the root, the next
    token is drawn from p at the current node (uniform ``u[:, d]``); if it is one of the node's children the walk
    moves to that child and goes on, otherwise the drawn token is the next token and the walk stops. Every committed
    token is a draw from the target's p given everything committed before it, so the output is exact. This is
    multi-draft rejection sampling for deterministic candidates (EAGLE's sampling-mode rule: try the children in
    order, accept x with probability p'(x) where p' is p with the earlier-rejected siblings removed and renormalised,
    draw from the final p' when all fail) with its uniforms mapped differently: both accept child x with probability
    p(x) and leave the residual p restricted to the non-children, and this form needs one draw per level instead of
    one per child. ``u`` [B, D + 1] (D the tree's depth).
    """
    B = p.shape[0]
    D = u.shape[1] - 1
    rows = torch.arange(B, device=p.device)
    cur = torch.zeros(B, dtype=torch.long, device=p.device)
    alive = torch.ones(B, dtype=torch.bool, device=p.device)
    path = torch.full((B, D), -1, dtype=torch.long, device=p.device)
    n = torch.zeros(B, dtype=torch.long, device=p.device)
    next_token = torch.zeros(B, dtype=torch.long, device=p.device)
    for d in range(D + 1):
        x = sample(p[rows, cur], u[:, d])
        kids = children[rows, cur]  # [B, K]
        hit = (kids >= 0) & (tokens.gather(1, kids.clamp_min(0)) == x[:, None])
        found = alive & hit.any(-1)
        stop = alive & ~found
        next_token = torch.where(stop, x, next_token)
        child = kids.gather(1, hit.long().argmax(-1, keepdim=True))[:, 0]
        if d < D:
            path[:, d] = torch.where(found, child, -1)
        cur = torch.where(found, child, cur)
        n = n + found.long()
        alive = found
        if not bool(alive.any()):
            break
    return TreeVerdict(path=path, num_accepted=n, next_token=next_token)
