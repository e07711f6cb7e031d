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

import torch

from mulosd.decoding.cspd_rules import accept_continuous, residual_sample, surrogate_log_ratio
from mulosd.decoding.engine import Parts, Proposal, decode
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, check_continuous
from mulosd.decoding.state import DRAFTER_STREAM, DecodeState, DecodeStats, cfg_labels, double, model_rows
from mulosd.decoding.window import NoDraft
from mulosd.errors import MulosdError
from mulosd.models.cgpt import ContinuousGPT


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
            cells = torch.full((z.shape[0], 1), k, dtype=torch.long, device=z.device)
            z = model.decode(double(tokens[:, k : k + 1], cfg), cells)[:, 0]


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
    cells = (frontier[:, None] - back + torch.arange(back, device=tokens.device)).clamp_min(0)
    feed = tokens[torch.arange(B, device=tokens.device)[:, None], cells]
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
    cells = frontier[:, None] - back + torch.arange(back + G, device=tokens.device)
    feed = torch.cat([tokens[torch.arange(B, device=tokens.device)[:, None], cells[:, :back]], drafts["x"]], dim=1)
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
    rows = torch.arange(B, device=n.device)
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


class ContinuousScorer:
    """The continuous target: prefill, then the AR pre-fill phase (cells 0 .. n_pre-1, one forward and one head
    chain each), then per cycle :func:`score_drafts` (one forward + one batched head run)."""

    def __init__(self, target: ContinuousGPT, width: int, prefill: float, align: bool = True,
                 independent: bool = False, prefill_phase: str | None = "prefill"):
        self.target, self.width, self.prefill, self.align = target, width, prefill, align
        self.independent, self.prefill_phase = independent, prefill_phase
        self.back = 1  # committed cells re-fed before the frontier (see score_drafts)

    def start(self, labels, cfg, streams) -> DecodeState:
        check_continuous(cfg)
        self.back = 1
        t, B, N = self.target, len(labels), self.target.config.num_tokens
        t.setup_cache(model_rows(B, cfg), slack=self.width + 1)
        state = DecodeState.new(labels, cfg, streams, N, slack=self.width + 1, token_shape=(t.token_dim,),
                                dtype=torch.float32)
        if self.prefill_phase:  # every phase of a CSpD cycle is reported, measured or not
            state.stats.time_s = {name: 0.0 for name in ("prefill", "drafting", "verification", "resampling")}
        n_pre = min(N, max(1, math.floor(self.prefill * N + 0.5)))  # token 0 always comes from the target
        with state.phase(self.prefill_phase):
            ar_steps(t, state.tokens, t.prefill(cfg_labels(t, labels, cfg)), 0, n_pre, cfg, streams)
        state.stats.target_forwards, state.stats.active_forwards, state.stats.tokens = n_pre, B * n_pre, B * n_pre
        state.frontier.fill_(n_pre)
        return state

    def score(self, state: DecodeState, proposal: Proposal) -> dict:
        chains = score_drafts(self.target, state.tokens, state.frontier, proposal.extra["drafts"], state.cfg,
                              state.streams, self.align, self.back)
        if self.independent:  # the next forward re-writes the replaced cells' caches
            self.back = self.width + 1
        state.stats.target_forwards += 1
        state.stats.active_forwards += state.n_active
        return chains

    def finish(self) -> None:
        self.target.clear_cache()


class ContinuousDrafter:
    """The small continuous model drafts gamma tokens with its own noises (:func:`draft_tokens`); its cache covers
    the pre-filled cells before the first cycle."""

    observe_phase = None

    def __init__(self, drafter: ContinuousGPT, gamma: int, independent: bool = False):
        self.drafter, self.gamma, self.independent = drafter, gamma, independent
        self.back = 2  # committed cells re-fed before the frontier (see draft_tokens)

    def start(self, state: DecodeState) -> None:
        d, cfg, B = self.drafter, state.cfg, state.batch
        self.back = 2
        d.setup_cache(model_rows(B, cfg), slack=self.gamma + 1)
        self.dstreams = state.streams.fork(DRAFTER_STREAM)
        with state.phase("prefill"):
            d.prefill(cfg_labels(d, state.labels, cfg))
            state.stats.drafter_forwards += 1
            n_pre = int(state.frontier[0])
            if n_pre > 2:  # the drafter's cache for the pre-filled cells (the last two are re-fed by every cycle)
                cells = torch.arange(n_pre - 2, device=state.device)[None].expand(B, -1)
                d.decode(double(state.tokens[:, : n_pre - 2], cfg), double(cells, cfg))
                state.stats.drafter_forwards += 1

    def propose(self, state: DecodeState) -> Proposal:
        with state.phase("drafting"):
            drafts = draft_tokens(self.drafter, state.tokens, state.frontier, self.gamma, state.cfg, self.dstreams,
                                  self.back)
        if self.independent:
            self.back = self.gamma + 1
        span = torch.arange(self.gamma, device=state.device)
        return Proposal(tokens=drafts["x"], cells=state.frontier[:, None] + span, forwards=self.gamma,
                        extra={"drafts": drafts})

    def observe(self, state, proposal, scores, verdict) -> None:
        pass

    def finish(self) -> None:
        self.drafter.clear_cache()


class SurrogateVerifier:
    """CSpD's accept test: the surrogate log ratio of every draft against one uniform each."""

    def __init__(self, relax: float = 1.0):
        self.relax = relax

    def __call__(self, state: DecodeState, proposal: Proposal, chains: dict) -> tuple[torch.Tensor, torch.Tensor]:
        drafts, G = proposal.extra["drafts"], proposal.width
        log_ratio = surrogate_log_ratio(drafts["x"], drafts, {k: v[:, :G] for k, v in chains.items()}, self.relax)
        return accept_continuous(log_ratio, state.streams.uniform(G)), log_ratio


class ResidualRepairer:
    """Replace rejected drafts by residual samples and commit. ``independent=False`` (the paper): accept left to
    right, replace the first rejected draft, drop the rest. ``independent=True`` (the public code's bookkeeping,
    approximate): every draft is tested on its own, each rejected one is replaced by a residual sample and the
    later drafts are kept although they were drafted after the rejected token; all gamma cells are committed, plus
    the bonus token when all were accepted."""

    phase = "resampling"

    def __init__(self, independent: bool = False, max_tries: int = 100):
        self.independent, self.max_tries = independent, max_tries

    def repair(self, state: DecodeState, proposal: Proposal, chains: dict, verdict) -> None:
        accept, log_ratio = verdict
        drafts, G, B, N = proposal.extra["drafts"], proposal.width, state.batch, state.num_cells
        frontier, active, device = state.frontier, state.active, state.device
        real = (N - frontier).clamp(0, G)  # drafts that landed on grid cells
        span = torch.arange(G + 1, device=device)
        if self.independent:
            row, n, count, acc, resampled, tries, fell = self._independent(state, drafts, chains, accept, real, span)
        else:
            row, n, count, acc, resampled, tries, fell = self._prefix(state, drafts, chains, accept, real)
        cells = frontier[:, None] + span
        keep = (span[None] < count[:, None])[..., None]
        rows = torch.arange(B, device=device)[:, None]
        state.tokens[rows, cells] = torch.where(keep, row, state.tokens[rows, cells])
        s = state.stats
        s.tokens += count.sum()  # counted on the device (DecodeStats.finish reads them back once)
        s.drafted += (real * active).sum()
        s.accepted += (acc * active).sum()
        s.add_accepted(acc, G, where=active)
        s.resampled += (resampled * active).sum()
        s.residual_tries += (tries * active).sum()
        s.fallbacks += (fell * active).sum()
        if state.trace is not None:
            state.trace.append({"frontier": frontier.clone(), "accepted": n.clone(), "log_ratio": log_ratio.clone(),
                                "active": active.clone()})
        state.frontier = frontier + count

    def _prefix(self, state, drafts, chains, accept, real):
        B, N = state.batch, state.num_cells
        n = accept.long().cumprod(1).sum(1)  # accepted prefix
        nxt, tries, fell = replacement_tokens(drafts, chains, n, state.streams, self.max_tries)
        row = torch.cat([drafts["x"], nxt[:, None]], dim=1)  # drafts[:n] and the replacement at f+n
        row[torch.arange(B, device=state.device), n] = nxt
        count = torch.minimum(n + 1, (N - state.frontier).clamp_min(0))
        needed = n < real  # a residual sample was committed (not the bonus token)
        return row, n, count, torch.minimum(n, real), needed.long(), tries * needed, fell & needed

    def _independent(self, state, drafts, chains, accept, real, span):
        G, N = accept.shape[1], state.num_cells
        resid, tries_all, fell_all = residual_tokens(drafts, chains, state.streams, self.max_tries)
        on_grid = span[None, :G] < real[:, None]
        row = torch.cat([torch.where(accept[..., None], drafts["x"], resid), chains["x"][:, G:]], dim=1)
        n = accept.long().sum(1)  # accepted drafts (anywhere in the row)
        count = torch.minimum(G + accept.all(1).long(), (N - state.frontier).clamp_min(0))
        rejected = ~accept & on_grid
        return (row, n, count, (accept & on_grid).sum(1), rejected.sum(1), (tries_all * rejected).sum(1),
                (fell_all & rejected).sum(1))


def cspd_parts(target: ContinuousGPT, drafter: ContinuousGPT, gamma: int, prefill: float = 0.05, align: bool = True,
               relax: float = 1.0, max_tries: int = 100, independent: bool = False) -> Parts:
    """Continuous speculative decoding as parts of the one loop."""
    check_pair(target, drafter)
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise MulosdError(f"gamma must be an integer >= 1, got {gamma!r}")
    if not (isinstance(prefill, (int, float)) and 0.0 <= prefill <= 1.0):
        raise MulosdError(f"prefill must be a fraction in [0, 1], got {prefill!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise MulosdError(f"max_tries must be an integer >= 1, got {max_tries!r}")
    return Parts(scorer=ContinuousScorer(target, gamma, prefill, align, independent),
                 proposer=ContinuousDrafter(drafter, gamma, independent), verifier=SurrogateVerifier(relax),
                 repairer=ResidualRepairer(independent, max_tries))


def car_parts(model: ContinuousGPT) -> Parts:
    """Continuous AR: the scorer's AR pre-fill covers the whole grid, so no cycle runs."""
    return Parts(scorer=ContinuousScorer(model, 0, 1.0, prefill_phase=None), proposer=NoDraft(),
                 verifier=SurrogateVerifier(), repairer=ResidualRepairer())


def generate_car(model: ContinuousGPT, labels: torch.Tensor, cfg: SamplingConfig,
                 streams: RandomStreams) -> tuple[torch.Tensor, DecodeStats]:
    """Continuous AR: one transformer forward and one head chain per token. Returns (tokens [B, N, d], stats)."""
    return decode(car_parts(model), labels, cfg, streams)


def generate_cspd(target: ContinuousGPT, drafter: ContinuousGPT, labels: torch.Tensor, cfg: SamplingConfig,
                  streams: RandomStreams, gamma: int, prefill: float = 0.05, align: bool = True, relax: float = 1.0,
                  max_tries: int = 100, independent: bool = False,
                  trace: list | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """Continuous speculative decoding. Returns (tokens [B, N, d], stats); ``trace`` (a list) collects per cycle
    the frontier, accepted lengths and log ratios (tests and docs)."""
    parts = cspd_parts(target, drafter, gamma, prefill, align, relax, max_tries, independent)
    return decode(parts, labels, cfg, streams, trace=trace)


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
