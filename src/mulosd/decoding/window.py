"""Parts for raster-window methods (ar, sd, sjd, mcsjd, lantern, gsd): drafts for the G cells after each sample's
frontier f, scored by one target forward over cells f-1 .. f+G-1, verified by a rule that returns the accepted
prefix, repaired by truncation: cells f .. f+n get the accepted drafts plus the rule's token for cell f+n (its
residual sample, or the bonus sample after a fully accepted window), and f advances by n + 1 (clipped at the end
of the grid). Rejected drafts stay in the caches as stale slots after the frontier, invisible to every later
query, and are overwritten when their cells are scored again (rollback = not advancing). Caches carry G + 1 slack
slots past the grid, so windows near the end keep a fixed width; cells past the grid are never committed.

Plain AR is the degenerate case: no drafts (G = 0), the rule samples the frontier cell from p.
"""

from __future__ import annotations

import torch

from mulosd.decoding.engine import Parts, Proposal, decode
from mulosd.decoding.rules import Verdict
from mulosd.decoding.sampling import process_logits, sample
from mulosd.decoding.state import DecodeState, DecodeStats, cfg_labels, double, model_rows
from mulosd.models.gpt import GPT


class WindowScorer:
    """The discrete target: prefill and token 0, then one forward per cycle over the last committed cell and the
    drafts; returns p [B, G + 1, V] for cells f .. f+G through the shared sampling module."""

    def __init__(self, target: GPT, width: int, extra_slack: int = 0):
        self.target, self.width, self.extra_slack = target, width, extra_slack

    def start(self, labels, cfg, streams) -> DecodeState:
        t, N, slack = self.target, self.target.config.num_tokens, self.width + 1 + self.extra_slack
        t.setup_cache(model_rows(len(labels), cfg), slack=slack)
        state = DecodeState.new(labels, cfg, streams, N, slack)
        state.first = process_logits(t.prefill(cfg_labels(t, labels, cfg)), cfg, predicts=0)
        state.tokens[:, 0] = sample(state.first, streams.uniform())
        state.frontier.fill_(1)
        B = len(labels)
        state.stats.target_forwards, state.stats.active_forwards, state.stats.tokens = 1, B, B
        self.span = torch.arange(self.width + 1, device=state.device)
        return state

    def score(self, state: DecodeState, proposal: Proposal) -> torch.Tensor:
        cfg, last = state.cfg, state.frontier[:, None] - 1
        cells = last + self.span
        feed = state.tokens.gather(1, last)
        if proposal.width:
            feed = torch.cat([feed, proposal.tokens], dim=1)
        p = process_logits(self.target.decode(double(feed, cfg), double(cells, cfg)), cfg, predicts=cells + 1)
        state.stats.target_forwards += 1
        state.stats.active_forwards += state.n_active
        return p

    def finish(self) -> None:
        self.target.clear_cache()


class NoDraft:
    """Plain AR's proposer: nothing to draft; the target samples one token per forward."""

    observe_phase = None

    def start(self, state):
        self.empty = Proposal(tokens=state.tokens.new_zeros(state.batch, 0), cells=state.frontier.new_zeros(state.batch, 0))

    def propose(self, state):
        return self.empty

    def observe(self, state, proposal, scores, verdict):
        pass

    def finish(self):
        pass


def sample_verifier(state: DecodeState, proposal: Proposal, p: torch.Tensor) -> torch.Tensor:
    """AR: nothing to verify; the frontier cell's token is drawn from p [B, 1, V] (one uniform per image)."""
    return sample(p[:, 0], state.streams.uniform())


class WindowVerifier:
    """A window rule (:func:`~mulosd.decoding.rules.verify_exact`, LANTERN, grouped, ...) fed with G accept
    uniforms and one resample uniform per image, drawn in that order from the target's streams."""

    def __init__(self, rule):
        self.rule = rule

    def __call__(self, state: DecodeState, proposal: Proposal, p: torch.Tensor) -> Verdict:
        G = proposal.width
        return self.rule(p, proposal.q, proposal.tokens, state.streams.uniform(G), state.streams.uniform())


def commit(tokens: torch.Tensor, frontier: torch.Tensor, drafts: torch.Tensor, verdict: Verdict, num_cells: int) -> torch.Tensor:
    """Write accepted drafts plus the verdict's next token at cells f .. f+n (at most up to the last grid cell);
    returns how many cells each sample committed. ``tokens`` [B, N + slack] is updated in place."""
    B, G = drafts.shape
    row = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)
    row.scatter_(1, verdict.num_accepted[:, None], verdict.next_token[:, None])
    count = torch.minimum(verdict.num_accepted + 1, (num_cells - frontier).clamp_min(0))
    span = torch.arange(G + 1, device=tokens.device)
    cells = frontier[:, None] + span
    keep = span[None] < count[:, None]
    tokens.scatter_(1, cells, torch.where(keep, row, tokens.gather(1, cells)))
    return count


class TruncateRepairer:
    """Commit the accepted prefix and the rule's token at the first rejected cell; count drafts on grid cells."""

    phase = "verification"

    def repair(self, state: DecodeState, proposal: Proposal, p: torch.Tensor, verdict: Verdict) -> None:
        N, f, active = state.num_cells, state.frontier, state.active
        count = commit(state.tokens, f, proposal.tokens, verdict, N)
        state.frontier = f + count
        s = state.stats
        s.tokens += count.sum()  # counted on the device (DecodeStats.finish reads them back once)
        if proposal.width:
            real = (N - f).clamp(0, proposal.width) * active  # drafts that landed on grid cells
            accepted = torch.minimum(verdict.num_accepted, real)
            s.drafted += real.sum()
            s.add_accepted(accepted, proposal.width, where=active)
            s.accepted += accepted.sum()


class AppendRepairer:
    """AR: write each sample's new token at its frontier. Every sample advances by one cell per forward, so the
    batch finishes together and no cell past the grid is written."""

    phase = "verification"

    def repair(self, state: DecodeState, proposal: Proposal, p: torch.Tensor, token: torch.Tensor) -> None:
        state.tokens.scatter_(1, state.frontier[:, None], token[:, None])
        state.frontier = state.frontier + 1
        state.stats.tokens += state.n_active


def window_parts(target: GPT, proposer, rule, width: int) -> Parts:
    """A raster-window method: ``proposer`` drafts ``width`` cells, ``rule`` verifies them, truncation repairs."""
    return Parts(WindowScorer(target, width), proposer, WindowVerifier(rule), TruncateRepairer())


def ar_parts(target: GPT) -> Parts:
    """Plain AR: no drafts, one target forward and one sample per token."""
    return Parts(WindowScorer(target, 0), NoDraft(), sample_verifier, AppendRepairer(), timed=False)


def generate_ar(model: GPT, labels: torch.Tensor, cfg, streams) -> tuple[torch.Tensor, DecodeStats]:
    """Sample a grid of tokens per label, one target forward per token. Returns (tokens [B, N], stats)."""
    return decode(ar_parts(model), labels, cfg, streams)


def speculative_generate(target: GPT, proposer, rule, labels: torch.Tensor, cfg, streams) -> tuple[torch.Tensor, DecodeStats]:
    """A raster-window method from a proposer (its ``gamma`` is the window width) and a rule."""
    return decode(window_parts(target, proposer, rule, proposer.gamma), labels, cfg, streams)
