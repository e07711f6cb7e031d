"""Proposers: where a speculative cycle's drafts (and the distributions q they were drawn from) come from.

- :class:`DrafterProposer`: a small AR model of the target's grid drafts G tokens, one forward each.
- :class:`JacobiProposer`: training-free Speculative Jacobi Decoding drafts, optionally coupled across
  iterations (MC-SJD), built from the target distributions of the previous cycle;
- :class:`LowResPrior`: the multi-scale initialisation of Jacobi windows: the low-res drafter's whole image,
  up-sampled to a distribution over high-res codes per cell (the first q of every cell).
"""

from __future__ import annotations

import torch

from mulosd.decoding.engine import Proposal
from mulosd.decoding.params import COUPLINGS, INITS
from mulosd.decoding.rules import acceptance_probability, residual_distribution
from mulosd.decoding.sampling import process_logits, sample
from mulosd.decoding.state import DRAFTER_STREAM, DecodeState, cfg_labels, double, model_rows
from mulosd.errors import MulosdError
from mulosd.models.gpt import GPT


class DrafterProposer:
    """A small AR model of the target's grid and vocabulary drafts G tokens, one forward each, with its own
    position-indexed cache and the same sampling module (CFG included) as the target. Its draws come from the
    target's streams (the drafts are part of the target-side sample path, as in the exactness tests)."""

    observe_phase = None  # nothing to observe

    def __init__(self, drafter: GPT, gamma: int):
        self.drafter, self.gamma = drafter, gamma

    def start(self, state: DecodeState) -> None:
        self.drafter.setup_cache(model_rows(state.batch, state.cfg), slack=self.gamma + 1)
        self.drafter.prefill(cfg_labels(self.drafter, state.labels, state.cfg))
        state.stats.drafter_forwards += 1

    def propose(self, state: DecodeState) -> Proposal:
        with state.phase("drafting"):
            return self._draft(state.tokens, state.frontier, state)

    def _draft(self, tokens, frontier, state) -> Proposal:
        cfg, streams, gamma = state.cfg, state.streams, self.gamma
        # Re-feed the last two committed cells: this writes the token the target placed at f-1 (a resample or a
        # bonus token the drafter has not seen) and the accepted draft before it; everything earlier is in cache.
        cells = torch.stack([(frontier - 2).clamp_min(0), frontier - 1], dim=1)
        logits = self.drafter.decode(double(tokens.gather(1, cells), cfg), double(cells, cfg))[:, -1]
        drafts, qs = [], []
        for i in range(gamma):
            q = process_logits(logits, cfg, predicts=frontier + i)
            d = sample(q, streams.uniform())
            drafts.append(d)
            qs.append(q)
            if i + 1 < gamma:
                logits = self.drafter.decode(double(d[:, None], cfg), double((frontier + i)[:, None], cfg))[:, 0]
        span = torch.arange(gamma, device=frontier.device)
        return Proposal(tokens=torch.stack(drafts, 1), cells=frontier[:, None] + span, q=torch.stack(qs, 1),
                        forwards=gamma)

    def observe(self, state, proposal, scores, verdict) -> None:
        pass

    def finish(self) -> None:
        self.drafter.clear_cache()


class JacobiProposer:
    """Speculative Jacobi Decoding (Teng et al., ICLR 2025), lossless.

    The window holds drafts for the G cells after the frontier. After each target forward the cells that remain
    in the window are re-drafted from the target distribution that forward computed for them (that distribution
    is their q); cells entering the window are initialised ``random`` (uniform token, q uniform) or ``spatial``
    (a copy of the cell to the left, q one-hot). ``coupling`` ties a re-draft to the cell's previous draft while
    keeping its marginal equal to q (MC-SJD, So et al.): ``maximal`` keeps the old token with probability
    min(1, p_new(x_old) / q_old(x_old)) and otherwise draws from norm(max(0, p_new - q_old)); ``gumbel`` takes
    argmax(log p_new + g) with one Gumbel vector per cell kept for the whole image. Independent resampling
    (``none``) changes most drafts every iteration on flat image distributions, which is what coupling fixes.
    """

    INITS, COUPLINGS = INITS, COUPLINGS

    observe_phase = "drafting"

    def __init__(self, vocab_size: int, gamma: int, init: str = "random", coupling: str = "none",
                 prior: "LowResPrior | None" = None):
        if init not in self.INITS:
            raise MulosdError(f"init {init!r} unknown; allowed: {', '.join(self.INITS)}")
        if coupling not in self.COUPLINGS:
            raise MulosdError(f"coupling {coupling!r} unknown; allowed: {', '.join(self.COUPLINGS)}")
        if (init == "lowres") != (prior is not None):
            raise ValueError("init='lowres' needs a LowResPrior (and only it takes one)")
        self.V, self.gamma, self.init, self.coupling, self.prior = vocab_size, gamma, init, coupling, prior
        self.tok = self.q = self.gumbel = None

    def start(self, state: DecodeState) -> None:
        self.tok = self.q = self.gumbel = None
        if self.prior is not None:
            self.prior.start(state)

    def _initialise(self, tok, q, first, last_committed, streams, cells):
        """Fill window positions i >= first [B] (grid cells ``cells`` [B, G]) with fresh initial drafts (in place on
        tok [B, G], q [B, G, V])."""
        B, G = tok.shape
        fresh = torch.arange(G, device=tok.device)[None] >= first[:, None]
        if self.init == "lowres":  # the low-res image's codes and the up-sampler's distributions (drawn at start)
            init_tok, init_q = self.prior.values(cells)
            tok.copy_(torch.where(fresh, init_tok, tok))
            q.copy_(torch.where(fresh[..., None], init_q, q))
            return
        if self.init == "random":
            init_tok = sample(torch.full((B, G, self.V), 1.0 / self.V, device=tok.device), streams.uniform(G))
            init_q = torch.full((self.V,), 1.0 / self.V, device=tok.device)
        else:  # spatial: repeat the token left of the first fresh cell (the last committed one when first = 0)
            left = torch.cat([last_committed[:, None], tok], dim=1).gather(1, first[:, None].clamp(max=G))
            init_tok = left.expand(-1, G)
            init_q = None
        tok.copy_(torch.where(fresh, init_tok, tok))
        if init_q is None:
            init_q = torch.nn.functional.one_hot(init_tok, self.V).to(q.dtype)
        q.copy_(torch.where(fresh[..., None], init_q, q))

    def propose(self, state: DecodeState) -> Proposal:
        with state.phase("drafting"):
            tokens, frontier, streams, gamma = state.tokens, state.frontier, state.streams, self.gamma
            if self.tok is None:
                B, device = len(frontier), frontier.device
                self.tok = torch.zeros(B, gamma, dtype=torch.long, device=device)
                self.q = torch.zeros(B, gamma, self.V, device=device)
                self._initialise(self.tok, self.q, torch.zeros(B, dtype=torch.long, device=device),
                                 tokens.gather(1, frontier[:, None] - 1)[:, 0], streams,
                                 frontier[:, None] + torch.arange(gamma, device=device))
                if self.coupling == "gumbel":
                    u = streams.uniform(tokens.shape[1], self.V).clamp(1e-12, 1 - 1e-7)
                    self.gumbel = -torch.log(-torch.log(u))
            span = torch.arange(gamma, device=frontier.device)
            return Proposal(tokens=self.tok.clone(), cells=frontier[:, None] + span, q=self.q.clone())

    def observe(self, state: DecodeState, proposal: Proposal, p: torch.Tensor, verdict) -> None:
        """Re-draft the window from the target's distributions p [B, G + 1, V] of the cycle just verified."""
        frontier = proposal.cells[:, 0]  # before the commit
        count = state.frontier - frontier
        tokens, streams = state.tokens, state.streams
        B, G1, V = p.shape
        G = G1 - 1
        j = count[:, None] + torch.arange(G, device=p.device)  # new window position i sits at old offset j
        p_new = p.gather(1, j.clamp(max=G)[..., None].expand(-1, -1, V))
        u = streams.uniform(G)
        if self.coupling == "gumbel":
            cells = (frontier[:, None] + j).clamp(max=self.gumbel.shape[1] - 1)
            g = self.gumbel.gather(1, cells[..., None].expand(-1, -1, V))
            new = torch.where(p_new > 0, p_new.log() + g, torch.full_like(g, float("-inf"))).argmax(-1)
        else:
            new = sample(p_new, u)
        if self.coupling == "maximal":
            was_drafted = j < G
            jo = j.clamp(max=G - 1)
            old_tok = self.tok.gather(1, jo)
            old_q = self.q.gather(1, jo[..., None].expand(-1, -1, V))
            a = acceptance_probability(p_new.gather(-1, old_tok[..., None])[..., 0], old_q.gather(-1, old_tok[..., None])[..., 0])
            keep = streams.uniform(G) < a
            moved = sample(residual_distribution(p_new, old_q), u)
            new = torch.where(was_drafted, torch.where(keep, old_tok, moved), new)
        tok, q = new, p_new.clone()
        last = tokens.gather(1, (frontier + count - 1).clamp_min(0)[:, None])[:, 0]
        self._initialise(tok, q, (G - count + 1).clamp(0, G), last, streams,
                         frontier[:, None] + count[:, None] + torch.arange(G, device=p.device))
        self.tok, self.q = tok, q

    def finish(self) -> None:
        self.tok = self.q = self.gumbel = None


class LowResPrior:
    """Multi-scale initialisation of Jacobi drafts (the lossless MuLo-SD). Once per decode the low-resolution
    drafter samples its whole image (ZipAR's schedule with window ``draft_window``; its draws come from the forked
    drafter streams) and the up-sampler turns it into, per high-res cell, a distribution over the target's codes:
    the learned up-sampler's softmax, from which the cell's initial draft is drawn, or (pixel up-sampler) its
    deterministic code with a one-hot q. A Jacobi window takes a cell's (draft, q) from here the first time the cell
    enters it; later iterations re-draft from the target's own p (coupled or not), as SJD does. Any q is exact
    under speculative sampling as long as the draft was drawn from it, so this changes speed only."""

    def __init__(self, drafter: GPT, resamplers, draft_window: int | None, vocab_size: int):
        self.drafter, self.res, self.window, self.V = drafter, resamplers, draft_window, vocab_size
        self.tok = self.q = None

    def start(self, state: DecodeState) -> None:
        from mulosd.decoding.schedule import ScheduledSampler

        B, h, N = state.batch, self.res.lo, self.res.hi ** 2
        streams = state.streams.fork(DRAFTER_STREAM)
        with state.phase("drafting"):
            sampler = ScheduledSampler(self.drafter, self.window)
            sampler.start(state.labels, state.cfg)
            try:
                y = torch.zeros(B, h * h, dtype=torch.long, device=state.device)
                forwards = sampler.sample_rows(y, 0, h, streams)
            finally:
                sampler.finish()
            state.stats.drafter_forwards += forwards + 1
        with state.phase("upsampling"):
            up = self.res.candidates(y.view(B, h, h), slice(0, h))
            if self.res.learned_up:
                q = up.softmax(-1)
                tok = sample(q, streams.uniform(N))
            else:
                tok, q = up, torch.nn.functional.one_hot(up, self.V).float()
        self.tok, self.q = tok, q

    def values(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial drafts and their q for grid cells ``cells`` [B, G] (cells past the grid repeat the last cell)."""
        c = cells.clamp(max=self.tok.shape[1] - 1)
        return self.tok.gather(1, c), self.q.gather(1, c[..., None].expand(-1, -1, self.q.shape[-1]))
