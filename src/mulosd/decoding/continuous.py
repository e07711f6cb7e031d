"""Decoding continuous-token AR models: the plain AR baseline (``car``) and continuous speculative decoding
(``cspd``, Wang et al. 2024), both on :class:`~mulosd.models.cgpt.ContinuousGPT` models.

Randomness: every image has its own stream (``streams``), as in the discrete decoders. The target draws from it
in a fixed order: per AR token one block of diffusion noises [S + 1, d]. CSpD's pre-fill phase is literally the AR
loop, so ``prefill=1`` gives the target-only tokens of ``car`` with the same seed. After pre-fill, per cycle the
target draws the acceptance uniforms, the residual sampler's proposals and uniforms, the bonus token's noises and
(``align=False`` only) its own trajectory noises; the drafter draws its noises from a forked stream.

A CSpD cycle, for every image at its own frontier f (images advance independently, as in
:mod:`mulosd.decoding.engine`):

1. :func:`draft_tokens`: the drafter samples gamma tokens for cells f .. f+gamma-1 (one forward each), recording
   per token its noises, the last reverse step's Gaussian and the summed log stds of the earlier steps;
2. :func:`score_drafts`: one target forward over cells f-1 .. f+gamma-1 gives the conditions of cells f .. f+gamma;
   one batched run of the target's head replays the drafted cells' trajectories **with the drafter's noises**
   (trajectory alignment; fresh noises when ``align=False``) and samples the bonus cell f+gamma;
3. :func:`~mulosd.decoding.cspd_rules.surrogate_log_ratio` and the accept test; the accepted prefix is n;
4. :func:`replacement_tokens`: cell f+n gets a residual sample (acceptance-rejection with the target's last step
   as proposal, bounded tries, fallback documented in docs/CSPD.md) when a draft was rejected, else the bonus;
5. commit n + 1 tokens, advance f.

With ``independent=True`` (the public code's bookkeeping) steps 3-5 test every draft on its own, replace each
rejected one by a residual sample, keep the rest and commit all gamma cells (plus the bonus when all were accepted);
the next cycle's forwards then re-feed the last gamma + 1 committed cells, so the KV caches hold the replacements.
"""

from __future__ import annotations

import math
import time

import torch

from mulosd.decoding.ar import DecodeStats, cfg_labels, double
from mulosd.decoding.cspd_rules import accept_continuous, residual_sample, surrogate_log_ratio
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, check_continuous
from mulosd.errors import MulosdError
from mulosd.models.cgpt import ContinuousGPT

DRAFTER_STREAM = 1  # fork salt of the drafter's per-image streams


def head_sample(model: ContinuousGPT, z: torch.Tensor, cfg: SamplingConfig, noise: torch.Tensor) -> dict:
    """One token per image from the model's head: z [rows, dim] ([cond ; uncond] halves under guidance),
    noise [S + 1, n, d]."""
    return model.head.sample(z, noise=noise, temperature=cfg.temperature, cfg_scale=cfg.cfg_scale if cfg.uses_cfg else None)


def head_rows(z: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Conditions z [rows, T, dim] of T cells per image -> [rows * T, dim] in the head's layout ([cond ; uncond]
    halves, each image-major)."""
    if cfg.uses_cfg:
        cond, uncond = z.chunk(2)
        return torch.cat([cond.reshape(-1, z.shape[-1]), uncond.reshape(-1, z.shape[-1])])
    return z.reshape(-1, z.shape[-1])


def ar_steps(model: ContinuousGPT, tokens: torch.Tensor, z: torch.Tensor, start: int, stop: int,
             cfg: SamplingConfig, streams: RandomStreams) -> None:
    """Plain AR for cells start .. stop-1 (z conditions cell ``start``): sample a token with the head, feed it to
    get the next condition (the last token is not fed). One target forward per token."""
    d = tokens.shape[-1]
    S = len(model.head.sampling)
    for k in range(start, stop):
        noise = streams.normal(S + 1, d).transpose(0, 1)
        tokens[:, k] = head_sample(model, z, cfg, noise)["x"]
        if k + 1 < stop:
            cells = torch.full((z.shape[0], 1), k, dtype=torch.long)
            z = model.decode(double(tokens[:, k : k + 1], cfg), cells)[:, 0]


@torch.inference_mode()
def generate_car(model: ContinuousGPT, labels: torch.Tensor, cfg: SamplingConfig,
                 streams: RandomStreams) -> tuple[torch.Tensor, DecodeStats]:
    """Continuous AR: one transformer forward and one head chain per token. Returns (tokens [B, N, d], stats)."""
    check_continuous(cfg)
    B, N = len(labels), model.config.num_tokens
    model.setup_cache(B * (2 if cfg.uses_cfg else 1))
    try:
        tokens = torch.zeros(B, N, model.token_dim)
        ar_steps(model, tokens, model.prefill(cfg_labels(model, labels, cfg)), 0, N, cfg, streams)
    finally:
        model.clear_cache()
    return tokens, DecodeStats(target_forwards=N, active_forwards=B * N, tokens=B * N)


def draft_tokens(drafter: ContinuousGPT, tokens: torch.Tensor, frontier: torch.Tensor, gamma: int,
                 cfg: SamplingConfig, dstreams: RandomStreams, back: int = 2) -> dict:
    """The drafter samples gamma tokens per image for cells f .. f+gamma-1 with its own noises.

    It first re-feeds the ``back`` committed cells before the frontier (2 after a prefix cycle: the last draft it
    never fed and the token the target placed at f-1; everything earlier is in its cache; gamma + 1 after an
    independent cycle, whose replacements can be anywhere in it), then feeds each draft but the last. Returns {"x" [B, G, d], "noise"
    [S + 1, B, G, d], "last_mean", "last_std" [B, G, d], "log_std_prefix" [B, G]}."""
    B, _, d = tokens.shape
    S = len(drafter.head.sampling)
    noise = dstreams.normal(gamma, S + 1, d).permute(2, 0, 1, 3)  # [S + 1, B, G, d]
    cells = (frontier[:, None] - back + torch.arange(back)).clamp_min(0)
    feed = tokens[torch.arange(B)[:, None], cells]
    z = drafter.decode(double(feed, cfg), double(cells, cfg))[:, -1]
    out = {"x": [], "last_mean": [], "last_std": [], "log_std_prefix": []}
    for i in range(gamma):
        chain = head_sample(drafter, z, cfg, noise[:, :, i])
        for key in out:
            out[key].append(chain[key])
        if i + 1 < gamma:
            z = drafter.decode(double(chain["x"][:, None], cfg), double((frontier + i)[:, None], cfg))[:, 0]
    result = {key: torch.stack(v, 1) for key, v in out.items()}
    result["noise"] = noise
    return result


def score_drafts(target: ContinuousGPT, tokens: torch.Tensor, frontier: torch.Tensor, drafts: dict,
                 cfg: SamplingConfig, streams: RandomStreams, align: bool, back: int = 1) -> dict:
    """One target forward over cells f-back .. f+G-1 (``back`` committed cells: 1 after a prefix cycle, gamma + 1
    after an independent one, which re-writes the cache of its replaced cells and of everything after them), then
    one batched head run over the G + 1 conditions of cells f .. f+G: the drafted cells replay the drafter's noises
    (``align``) or fresh ones, the last cell (f+G) samples the bonus token.
    Returns the target's chains {"x", "last_mean", "last_std", "log_std_prefix"} with a G + 1 axis."""
    B, _, d = tokens.shape
    G = drafts["x"].shape[1]
    S = len(target.head.sampling)
    cells = frontier[:, None] - back + torch.arange(back + G)
    feed = torch.cat([tokens[torch.arange(B)[:, None], cells[:, :back]], drafts["x"]], dim=1)
    z = target.decode(double(feed, cfg), double(cells, cfg))[:, back - 1:]  # [rows, G + 1, dim]
    own = streams.normal(G + 1 if not align else 1, S + 1, d).permute(2, 0, 1, 3)  # [S + 1, B, *, d]
    noise = torch.cat([drafts["noise"], own[:, :, -1:]], dim=2) if align else own
    chain = head_sample(target, head_rows(z, cfg), cfg, noise.reshape(S + 1, B * (G + 1), d))
    return {k: v.reshape(B, G + 1, *v.shape[1:]) for k, v in chain.items() if k != "noise"}


def replacement_tokens(drafts: dict, target: dict, n: torch.Tensor, streams: RandomStreams,
                       max_tries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token for cell f+n of every image: the bonus sample where all G drafts were accepted, else a residual
    sample norm(max(0, S p_last - q_last)) at the rejected cell. Returns (tokens [B, d], tries [B], fell_back [B]);
    tries and fell_back are 0 / False where no residual was needed."""
    B, G, d = drafts["x"].shape
    rows = torch.arange(B)
    j = n.clamp(max=G - 1)
    noise, u = streams.normal(max_tries, d), streams.uniform(max_tries)
    log_scale = drafts["log_std_prefix"][rows, j] - target["log_std_prefix"][rows, j]
    resid, tries, fell = residual_sample(target["last_mean"][rows, j], target["last_std"][rows, j],
                                         drafts["last_mean"][rows, j], drafts["last_std"][rows, j], log_scale, noise, u)
    rejected = n < G
    out = torch.where(rejected[:, None], resid, target["x"][:, G])
    return out, torch.where(rejected, tries, 0), fell & rejected


def residual_tokens(drafts: dict, target: dict, streams: RandomStreams,
                    max_tries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent bookkeeping: a residual sample for **every** drafted cell at once (the caller keeps those of the
    rejected ones). Returns (tokens [B, G, d], tries [B, G], fell_back [B, G])."""
    B, G, d = drafts["x"].shape
    noise = streams.normal(G, max_tries, d).reshape(B * G, max_tries, d)
    u = streams.uniform(G, max_tries).reshape(B * G, max_tries)
    flat = lambda t: t[:, :G].reshape(B * G, *t.shape[2:])  # noqa: E731
    log_scale = flat(drafts["log_std_prefix"]) - flat(target["log_std_prefix"])
    x, tries, fell = residual_sample(flat(target["last_mean"]), flat(target["last_std"]), flat(drafts["last_mean"]),
                                     flat(drafts["last_std"]), log_scale, noise, u)
    return x.reshape(B, G, d), tries.reshape(B, G), fell.reshape(B, G)


@torch.inference_mode()
def generate_cspd(target: ContinuousGPT, drafter: ContinuousGPT, labels: torch.Tensor, cfg: SamplingConfig,
                  streams: RandomStreams, gamma: int, prefill: float = 0.05, align: bool = True, relax: float = 1.0,
                  max_tries: int = 100, independent: bool = False,
                  trace: list | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """Continuous speculative decoding. Returns (tokens [B, N, d], stats); ``trace`` (a list) collects per cycle
    the frontier, accepted lengths and log ratios (tests and docs).

    ``independent=False`` (the paper): accept left to right, replace the first rejected draft, drop the rest.
    ``independent=True`` (the public code's bookkeeping, approximate): every draft is tested on its own, each
    rejected one is replaced by a residual sample and the later drafts are kept although they were drafted after
    the rejected token (so they condition on a token the image does not contain); all gamma cells are committed,
    plus the bonus token when all were accepted."""
    check_continuous(cfg)
    check_pair(target, drafter)
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise MulosdError(f"gamma must be an integer >= 1, got {gamma!r}")
    if not (isinstance(prefill, (int, float)) and 0.0 <= prefill <= 1.0):
        raise MulosdError(f"prefill must be a fraction in [0, 1], got {prefill!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise MulosdError(f"max_tries must be an integer >= 1, got {max_tries!r}")
    B, N, d = len(labels), target.config.num_tokens, target.token_dim
    rows = B * (2 if cfg.uses_cfg else 1)
    stats = DecodeStats()
    stats.time_s = {"prefill": 0.0, "drafting": 0.0, "verification": 0.0, "resampling": 0.0}
    dstreams = streams.fork(DRAFTER_STREAM)
    target.setup_cache(rows, slack=gamma + 1)
    drafter.setup_cache(rows, slack=gamma + 1)
    try:
        t0 = time.perf_counter()
        tokens = torch.zeros(B, N + gamma + 1, d)
        n_pre = min(N, max(1, math.floor(prefill * N + 0.5)))  # token 0 always comes from the target
        ar_steps(target, tokens, target.prefill(cfg_labels(target, labels, cfg)), 0, n_pre, cfg, streams)
        stats.target_forwards = n_pre
        stats.active_forwards, stats.tokens = B * n_pre, B * n_pre
        drafter.prefill(cfg_labels(drafter, labels, cfg))
        stats.drafter_forwards = 1
        if n_pre > 2:  # the drafter's cache for the pre-filled cells (the last two are re-fed by every cycle)
            cells = torch.arange(n_pre - 2)[None].expand(B, -1)
            drafter.decode(double(tokens[:, : n_pre - 2], cfg), double(cells, cfg))
            stats.drafter_forwards += 1
        stats.time_s["prefill"] += time.perf_counter() - t0
        frontier = torch.full((B,), n_pre, dtype=torch.long)
        back_t, back_d = 1, 2  # committed cells re-fed before the frontier (see score_drafts / draft_tokens)
        while bool((frontier < N).any()):
            active = frontier < N
            t0 = time.perf_counter()
            drafts = draft_tokens(drafter, tokens, frontier, gamma, cfg, dstreams, back_d)
            t1 = time.perf_counter()
            chains = score_drafts(target, tokens, frontier, drafts, cfg, streams, align, back_t)
            log_ratio = surrogate_log_ratio(drafts["x"], drafts, {k: v[:, :gamma] for k, v in chains.items()}, relax)
            accept = accept_continuous(log_ratio, streams.uniform(gamma))
            t2 = time.perf_counter()
            real = (N - frontier).clamp(0, gamma)  # drafts that landed on grid cells
            on_grid = torch.arange(gamma)[None] < real[:, None]
            if independent:
                resid, tries_all, fell_all = residual_tokens(drafts, chains, streams, max_tries)
                all_ok = accept.all(1)
                row = torch.cat([torch.where(accept[..., None], drafts["x"], resid), chains["x"][:, gamma:]], dim=1)
                n = accept.long().sum(1)  # accepted drafts (anywhere in the row)
                count = torch.minimum(gamma + all_ok.long(), (N - frontier).clamp_min(0))
                rejected = ~accept & on_grid
                tries, fell = (tries_all * rejected).sum(1), (fell_all & rejected).sum(1)
                n_resampled = rejected.sum(1)
                acc = (accept & on_grid).sum(1)
                back_t = back_d = gamma + 1
            else:
                n = accept.long().cumprod(1).sum(1)  # accepted prefix
                nxt, tries, fell = replacement_tokens(drafts, chains, n, streams, max_tries)
                # commit drafts[:n] and the replacement at f+n, never past the grid
                row = torch.cat([drafts["x"], nxt[:, None]], dim=1)
                row[torch.arange(B), n] = nxt
                count = torch.minimum(n + 1, (N - frontier).clamp_min(0))
                acc = torch.minimum(n, real)
                needed = n < real  # a residual sample was committed (not the bonus token)
                tries, fell, n_resampled = tries * needed, fell & needed, needed.long()
            t3 = time.perf_counter()
            cells = frontier[:, None] + torch.arange(gamma + 1)
            keep = (torch.arange(gamma + 1)[None] < count[:, None])[..., None]
            tokens[torch.arange(B)[:, None], cells] = torch.where(keep, row, tokens[torch.arange(B)[:, None], cells])
            stats.target_forwards += 1
            stats.drafter_forwards += gamma
            stats.active_forwards += int(active.sum())
            stats.tokens += int(count.sum())
            stats.drafted += int(real[active].sum())
            stats.accepted += int(acc[active].sum())
            stats.add_accepted(acc[active])
            stats.resampled += int(n_resampled[active].sum())
            stats.residual_tries += int(tries[active].sum())
            stats.fallbacks += int(fell[active].sum())
            if trace is not None:
                trace.append({"frontier": frontier.clone(), "accepted": n.clone(), "log_ratio": log_ratio.clone(),
                              "active": active.clone()})
            frontier = frontier + count
            stats.time_s["drafting"] += t1 - t0
            stats.time_s["verification"] += t2 - t1
            stats.time_s["resampling"] += t3 - t2
    finally:
        target.clear_cache()
        drafter.clear_cache()
    return tokens[:, :N], stats


def check_pair(target: ContinuousGPT, drafter: ContinuousGPT) -> None:
    """A drafter must produce tokens the target can score: same token dimension, grid, classes and tokenizer,
    and the same number of reverse steps (trajectory alignment pairs the steps one to one)."""
    t, q = target.config, drafter.config
    if q.token_dim != t.token_dim:
        raise MulosdError(f"the drafter's tokens have {q.token_dim} dimensions; the target's have {t.token_dim}")
    if q.grid_size != t.grid_size:
        raise MulosdError(f"the drafter works on a {q.grid_size}x{q.grid_size} grid; the target's is {t.grid_size}x{t.grid_size}")
    if q.num_classes != t.num_classes:
        raise MulosdError(f"the drafter has {q.num_classes} classes; the target has {t.num_classes}")
    if q.tokenizer_id and t.tokenizer_id and q.tokenizer_id != t.tokenizer_id:
        raise MulosdError(f"the drafter was trained on another tokenizer ({q.tokenizer_id}) than the target ({t.tokenizer_id})")
    if len(drafter.head.sampling) != len(target.head.sampling):
        raise MulosdError(f"the drafter's head samples in {len(drafter.head.sampling)} steps, the target's in "
                          f"{len(target.head.sampling)}; trajectory alignment needs the same number")
