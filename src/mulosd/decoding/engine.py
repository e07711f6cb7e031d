"""The one decoding loop. Every speculative method (and plain AR, its degenerate case) is a composition of four
parts around a :class:`~mulosd.decoding.state.DecodeState`:

- a **scorer** owns the target model: ``start`` allocates its cache, runs the prefill and commits what the target
  decides alone (token 0, CSpD's pre-fill); ``score`` runs the one target forward over a proposal's cells;
- a **proposer** drafts: which cells, which tokens, and the distributions q they were drawn from (small drafter,
  Jacobi iterations, low-res drafter + up-sampler, continuous drafter, or nothing);
- a **verifier** is a pure batched rule over the scored cells with uniforms drawn from the state's streams
  (exact speculative sampling, LANTERN, grouped, pooled threshold, continuous surrogate ratio);
- a **repairer** decides what happens to rejected cells and commits: truncate-and-resample at the first
  rejection, local (serial or island-parallel) resampling, or continuous residual sampling.

One cycle::

    proposal = proposer.propose(state)                    # phase "drafting" (timed by the proposer)
    scores   = scorer.score(state, proposal)              # phase "verification"
    verdict  = verifier(state, proposal, scores)          #   "
    repairer.repair(state, proposal, scores, verdict)     # phase repairer.phase; commits, advances frontiers
    proposer.observe(state, proposal, scores, verdict)    # phase proposer.observe_phase

Parts are built fresh for every call (a method holds a factory), so per-call state on a part is never shared
between calls. Every part creates its tensors on the state's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.decoding.state import DecodeState, DecodeStats


@dataclass
class Proposal:
    """One cycle's drafts. ``tokens`` [B, G, ...] for the cells ``cells`` [B, G]; ``q`` [B, G, V] the distributions
    they were drawn from (None for deterministic drafts whose rule needs no q); ``active`` [B] the samples taking
    part in this cycle; ``forwards`` the drafter passes spent; ``extra`` what a family's scorer or repairer needs
    besides (CSpD's noises and chains, MuLo-SD's block)."""

    tokens: torch.Tensor
    cells: torch.Tensor
    q: torch.Tensor | None = None
    active: torch.Tensor | None = None
    forwards: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


class Scorer(Protocol):
    def start(self, labels: torch.Tensor, cfg: SamplingConfig, streams: RandomStreams) -> DecodeState: ...

    def score(self, state: DecodeState, proposal: Proposal) -> Any: ...

    def finish(self) -> None: ...


class Proposer(Protocol):
    observe_phase: str | None

    def start(self, state: DecodeState) -> None: ...

    def propose(self, state: DecodeState) -> Proposal: ...

    def observe(self, state: DecodeState, proposal: Proposal, scores: Any, verdict: Any) -> None: ...

    def finish(self) -> None: ...


Verifier = Callable[[DecodeState, Proposal, Any], Any]


class Repairer(Protocol):
    phase: str | None

    def repair(self, state: DecodeState, proposal: Proposal, scores: Any, verdict: Any) -> None: ...


@dataclass
class Parts:
    scorer: Scorer
    proposer: Proposer
    verifier: Verifier
    repairer: Repairer
    timed: bool = True  # time the phases (plain AR has none worth naming: its whole time is the target's)


@torch.inference_mode()
def decode(parts: Parts, labels: torch.Tensor, cfg: SamplingConfig, streams: RandomStreams,
           trace: list | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """Run a method's parts until every sample has committed its whole grid. Returns (tokens [B, N, ...], stats).
    ``trace`` (a list) collects what the repairer records per cycle (MuLo-SD's acceptance maps)."""
    scorer, proposer, verify, repairer = parts.scorer, parts.proposer, parts.verifier, parts.repairer
    try:
        state = scorer.start(labels, cfg, streams)
        state.trace = trace
        proposer.start(state)
        while True:
            state.n_active = int(state.active.sum())  # one host sync per cycle: the loop's only stopping test
            if not state.n_active:
                break
            proposal = proposer.propose(state)
            with state.phase("verification" if parts.timed else None):
                scores = scorer.score(state, proposal)
                verdict = verify(state, proposal, scores)
            with state.phase(repairer.phase if parts.timed else None):
                repairer.repair(state, proposal, scores, verdict)
            with state.phase(proposer.observe_phase if parts.timed else None):
                proposer.observe(state, proposal, scores, verdict)
            state.stats.drafter_forwards += proposal.forwards
    finally:
        try:
            scorer.finish()
        finally:
            proposer.finish()
    return state.committed_tokens().clone(), state.stats.finish()
