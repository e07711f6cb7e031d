"""The generic speculative loop for raster-window methods: propose -> score -> decide -> commit.

Every sample in the batch keeps its own frontier f (the number of committed tokens) and advances by its own
accepted length each cycle; nothing is lock-stepped to the slowest sample. One cycle:

1. **propose**: the proposer drafts G tokens for cells f .. f+G-1 together with the distributions q it sampled
   them from;
2. **score**: one target forward over cells f-1 .. f+G-1 (the last committed token, whose cache slot may be
   stale, plus the drafts) gives the target distributions p for cells f .. f+G, through the shared sampling
   module (CFG, temperature, top-k, top-p);
3. **decide**: a pure verification rule returns the accepted prefix length n and the token for cell f+n;
4. **commit**: cells f .. f+n are written and f advances by n + 1 (clipped at the end of the grid). Rejected
   drafts stay in the caches as stale slots after the frontier, invisible to every later query, and are
   overwritten when their cells are scored again (rollback = not advancing).

Caches carry ``G + 1`` slack slots past the grid, so windows near the end keep a fixed width; cells past the
grid are never committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from mulosd.decoding.ar import DecodeStats, cfg_labels, double
from mulosd.decoding.rules import Verdict
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, process_logits, sample
from mulosd.models.gpt import GPT


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, G] drafted tokens for cells f .. f+G-1
    q: torch.Tensor  # [B, G, V] the distributions they were drawn from (after the shared sampling module)
    forwards: int = 0  # drafter forward passes spent


class Proposer(Protocol):
    def start(self, labels: torch.Tensor, cfg: SamplingConfig, slack: int) -> int: ...

    def propose(self, tokens: torch.Tensor, frontier: torch.Tensor, gamma: int, cfg: SamplingConfig,
                streams: RandomStreams) -> Proposal: ...

    def observe(self, p: torch.Tensor, frontier: torch.Tensor, count: torch.Tensor, tokens: torch.Tensor,
                streams: RandomStreams) -> None:
        """After a cycle: the target's distributions p [B, G + 1, V] for cells f .. f+G (f = ``frontier`` before
        the commit) and how many cells each sample committed. Training-free proposers draft from these."""

    def finish(self) -> None: ...


Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Verdict]


def commit(tokens: torch.Tensor, frontier: torch.Tensor, drafts: torch.Tensor, verdict: Verdict, num_cells: int) -> torch.Tensor:
    """Write accepted drafts plus the verdict's next token at cells f .. f+n (at most up to the last grid cell);
    returns how many cells each sample committed. ``tokens`` [B, N + slack] is updated in place."""
    B, G = drafts.shape
    row = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)
    row.scatter_(1, verdict.num_accepted[:, None], verdict.next_token[:, None])
    count = torch.minimum(verdict.num_accepted + 1, (num_cells - frontier).clamp_min(0))
    cells = frontier[:, None] + torch.arange(G + 1)
    keep = torch.arange(G + 1)[None] < count[:, None]
    tokens.scatter_(1, cells, torch.where(keep, row, tokens.gather(1, cells)))
    return count


@torch.inference_mode()
def speculative_generate(target: GPT, proposer: Proposer, rule: Rule, labels: torch.Tensor, cfg: SamplingConfig,
                         streams: RandomStreams, gamma: int) -> tuple[torch.Tensor, DecodeStats]:
    B, N = len(labels), target.config.num_tokens
    slack = gamma + 1
    rows = B * (2 if cfg.uses_cfg else 1)
    stats = DecodeStats()
    target.setup_cache(rows, slack=slack)
    stats.drafter_forwards += proposer.start(labels, cfg, slack)
    try:
        tokens = torch.zeros(B, N + slack, dtype=torch.long)
        # token 0 comes from the target's prefill, exactly as in AR decoding
        tokens[:, 0] = sample(process_logits(target.prefill(cfg_labels(target, labels, cfg)), cfg), streams.uniform())
        frontier = torch.ones(B, dtype=torch.long)
        stats.target_forwards, stats.active_forwards, stats.tokens = 1, B, B
        while bool((frontier < N).any()):
            active = frontier < N
            with stats.phase("drafting"):
                prop = proposer.propose(tokens, frontier, gamma, cfg, streams)
            with stats.phase("verification"):
                cells = frontier[:, None] - 1 + torch.arange(gamma + 1)
                feed = torch.cat([tokens.gather(1, frontier[:, None] - 1), prop.tokens], dim=1)
                p = process_logits(target.decode(double(feed, cfg), double(cells, cfg)), cfg)
                verdict = rule(p, prop.q, prop.tokens, streams.uniform(gamma), streams.uniform())
                count = commit(tokens, frontier, prop.tokens, verdict, N)
            with stats.phase("drafting"):  # a training-free proposer drafts the next cycle from p here
                proposer.observe(p, frontier, count, tokens, streams)
            frontier = frontier + count
            stats.target_forwards += 1
            stats.drafter_forwards += prop.forwards
            stats.active_forwards += int(active.sum())
            stats.tokens += int(count.sum())
            real = (N - frontier + count).clamp(0, gamma)  # drafts that landed on grid cells (before advancing)
            stats.drafted += int(real[active].sum())
            stats.add_accepted(torch.minimum(verdict.num_accepted, real)[active])
            stats.accepted += int(torch.minimum(verdict.num_accepted, real)[active].sum())
    finally:
        target.clear_cache()
        proposer.finish()
    return tokens[:, :N], stats
