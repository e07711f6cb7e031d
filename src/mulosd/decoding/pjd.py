"""PJD: 2-D parallel Jacobi decoding (Liao et al., CVPR 2026, arXiv 2606.05703), in its lossless form.

PJD drafts several grid rows at once: a row starts once the row above has ``start`` (the paper's c) cells ahead of
it, every active row carries a Jacobi window, and a row-causal attention mask keeps a row's drafts from seeing the
unfinished part of the rows above. The paper commits every row's window with SJD's rule under that mask, which
changes the conditional each token is drawn from (row r + 1 never sees the end of row r), so it is not exact for a
raster-order model. Here the rows are split by role:

- the **frontier window** (``window`` cells after the sample's frontier, in raster order, as SJD's) is verified
  with exact speculative sampling in its exact causal context and is the only place tokens are committed;
- the **rows below** it form a staircase: row ``k`` below the frontier row drafts the columns before
  ``min(W, col(frontier) + window) - k * start`` (for ``k < rows``), and its drafts are refined every forward
  from the target's distributions under the row-causal mask (:func:`pjd_layout`), with the same coupling as the
  window. When the frontier window reaches such a cell, the cell enters it with its refined draft and q instead of a
  fresh random one.

Every draft is drawn from the q it is verified against, and no feed outside the frontier window is visible to a
window query (they all lie after it), so the output is the target's distribution (tests enumerate it). With
``rows = 1`` nothing is drafted below the window and ``pjd`` is ``sjd`` / ``mcsjd`` token for token.

The first cell of a staircase row is predicted from the last cell of the row above, which is usually not drafted;
as in ZipAR, the last drafted token of the row above is fed there as a stand-in (its slot is hidden again once
the forward is over, like every slot that holds no current draft).
"""

from __future__ import annotations

import torch

from mulosd.decoding.engine import Parts, Proposal
from mulosd.decoding.proposers import JacobiProposer
from mulosd.decoding.rules import acceptance_probability, residual_distribution
from mulosd.decoding.sampling import process_logits, sample
from mulosd.decoding.state import DecodeState, double
from mulosd.decoding.window import TruncateRepairer, WindowScorer, WindowVerifier
from mulosd.models.gpt import GPT


def pjd_layout(frontier: torch.Tensor, W: int, N: int, window: int, rows: int, start: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which cells PJD drafts below the frontier window. frontier [B] -> (aux [B, N] bool: staircase cells,
    standin [B, N] bool: cells fed with a stand-in token (the last cell of a row above a staircase row that starts
    at column 0, when nothing else feeds it), source [B, N] long: the cell whose token stands in there)."""
    device = frontier.device
    cell = torch.arange(N, device=device)
    r, col = cell // W, cell % W
    f = frontier[:, None]
    k = r[None] - f // W  # rows below the frontier row
    reach = (f % W + window).clamp(max=W)  # columns of the frontier row the window covers (and beyond)
    stair = reach - k * start  # row k drafts the columns before this
    aux = (k >= 1) & (k < rows) & (col[None] < stair) & (cell[None] >= f + window) & (f < N)
    prev = cell[None] - 1  # the cell whose query predicts a staircase cell
    fed_by_window = (prev >= f - 1) & (prev <= f + window - 1)
    aux_before = torch.cat([torch.zeros_like(aux[:, :1]), aux[:, :-1]], dim=1)
    starts = aux & (col[None] == 0) & ~fed_by_window & ~aux_before
    standin = torch.cat([starts[:, 1:], torch.zeros_like(starts[:, :1])], dim=1)  # at cell - 1 of each start
    # the stand-in token: the last cell its own row drafts (the staircase's extent there; the window's in the
    # frontier row)
    source = r[None] * W + (reach - k.clamp_min(0) * start - 1).clamp(0, W - 1)
    source = torch.where(standin, source, 0)
    return aux, standin, source


def _pack(mask: torch.Tensor, pad_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, N] -> (cells [B, T] in raster order, padded with distinct cells pad_from, pad_from + 1, ...;
    valid [B, T])."""
    B, N = mask.shape
    count = mask.sum(1)
    T = int(count.max()) if B else 0
    cell = torch.arange(N, device=mask.device)
    order = torch.where(mask, cell, N + cell).sort(dim=1).values[:, :T]
    span = torch.arange(T, device=mask.device)[None]
    valid = span < count[:, None]
    return torch.where(valid, order, pad_from + span), valid


class PJDScorer(WindowScorer):
    """The target over the frontier window (exact causal context) plus the staircase drafts and stand-ins (row-causal
    mask: a query sees committed cells and this forward's feeds at or before it, never a slot that holds no
    current draft). Returns the window's p [B, G + 1, V] as WindowScorer does; the staircase cells' p go to
    ``proposal.extra["aux_p"]``."""

    def __init__(self, target: GPT, width: int, rows: int):
        # staircase cells, stand-ins and their padding lie past the window's own slack
        # (none for rows = 1, so that the cache, and with it MC-SJD's Gumbel table, is SJD's)
        super().__init__(target, width, extra_slack=(rows - 1) * (target.config.grid_size + 1) + 2 if rows > 1 else 0)

    def score(self, state: DecodeState, proposal: Proposal) -> torch.Tensor:
        extra = proposal.extra
        if "aux_feed" not in extra:
            return super().score(state, proposal)
        cfg, f, G = state.cfg, state.frontier, proposal.width
        N, T0 = state.num_cells, self.target.config.cls_token_num
        win_cells = (f[:, None] - 1) + self.span
        feed_cells = torch.cat([win_cells, extra["aux_feed"]], dim=1)
        feed = torch.cat([state.tokens.gather(1, win_cells[:, :1]), proposal.tokens, extra["aux_feed_tok"]], dim=1)
        pos = feed_cells + T0
        S = int(pos.max()) + 1
        slot = torch.arange(S, device=state.device)
        fed = torch.zeros(len(f), S, dtype=torch.bool, device=state.device).scatter_(1, pos, True)
        seen = (slot[None] < (f[:, None] + T0)) | fed  # committed (and condition) slots, and this forward's feeds
        mask = seen[:, None, :] & (slot[None, None, :] <= pos[:, :, None])
        logits = self.target.decode(double(feed, cfg), double(feed_cells, cfg), mask=double(mask, cfg))
        p = process_logits(logits, cfg, predicts=feed_cells + 1)
        state.stats.target_forwards += 1
        state.stats.active_forwards += state.n_active
        # a staircase cell's distribution is the output of the query at the cell before it
        where = torch.full((len(f), N + 1), -1, dtype=torch.long, device=state.device)
        idx = torch.arange(feed_cells.shape[1], device=state.device).expand(len(f), -1)
        real = feed_cells < N
        where.scatter_(1, torch.where(real, feed_cells, N), torch.where(real, idx, -1))
        where[:, N] = -1
        aux = extra["aux_cells"]
        src = where.gather(1, (aux - 1).clamp(0, N))
        V = p.shape[-1]
        extra["aux_p"] = p.gather(1, src.clamp_min(0)[..., None].expand(-1, -1, V))
        return p[:, : G + 1]


class PJDProposer(JacobiProposer):
    """SJD's window (:class:`~mulosd.decoding.proposers.JacobiProposer`) plus the staircase rows below it, each
    cell holding a draft and the q it was drawn from in grid-wide buffers. New staircase cells are initialised as
    new window cells are (``random``, ``spatial``: the cell above, ``lowres``: the multi-scale prior); after every
    forward they are re-drafted from their new p with the window's coupling, and a cell that enters the window takes
    its staircase draft. The staircase's draws come after the window's from the target's streams, and only the
    streams of samples that have staircase cells draw, so an image's draws never depend on its batch-mates."""

    def __init__(self, vocab_size: int, grid: int, window: int, rows: int, start: int, init: str = "random",
                 coupling: str = "maximal", prior=None):
        super().__init__(vocab_size, window, init, coupling, prior)
        self.W, self.rows, self.start_at = grid, rows, start

    def start(self, state: DecodeState) -> None:
        super().start(state)
        B, N, device = state.batch, state.num_cells, state.device
        self.aux_tok = torch.zeros(B, N, dtype=torch.long, device=device)
        self.aux_q = torch.zeros(B, N, self.V, device=device) if self.rows > 1 else None
        self.aux_has = torch.zeros(B, N, dtype=torch.bool, device=device)

    def propose(self, state: DecodeState) -> Proposal:
        proposal = super().propose(state)
        if self.rows == 1:
            return proposal
        with state.phase("drafting"):
            N = state.num_cells
            aux, standin, source = pjd_layout(state.frontier, self.W, N, self.gamma, self.rows, self.start_at)
            if not bool(aux.any()):
                return proposal
            self._init_aux(state, aux & ~self.aux_has, proposal)
            # the current view of the grid: committed tokens, window drafts, staircase drafts
            view = torch.where(self.aux_has, self.aux_tok, state.tokens[:, :N])
            cells = proposal.cells.clamp(max=N - 1)
            view = view.scatter(1, cells, torch.where(proposal.cells < N, proposal.tokens, view.gather(1, cells)))
            feed_tok_grid = torch.where(standin, view.gather(1, source), view)
            pad = N + self.gamma  # past every window cell (the window's slack slots end at N + gamma - 1)
            aux_feed, valid = _pack(aux | standin, pad)
            proposal.extra["aux_feed"] = aux_feed
            proposal.extra["aux_feed_tok"] = torch.where(valid, feed_tok_grid.gather(1, aux_feed.clamp(max=N - 1)), 0)
            aux_cells, aux_valid = _pack(aux, N)
            proposal.extra["aux_cells"], proposal.extra["aux_valid"] = aux_cells, aux_valid
        return proposal

    def _init_aux(self, state: DecodeState, fresh: torch.Tensor, proposal: Proposal) -> None:
        """Give staircase cells that have no draft yet their initial draft and q (in the grid buffers)."""
        if not bool(fresh.any()):
            return
        B, N, device = state.batch, state.num_cells, state.device
        cells = torch.arange(N, device=device).expand(B, -1)
        if self.init == "lowres":
            tok, q = self.prior.values(cells)
        elif self.init == "random":
            tok = sample(torch.full((B, N, self.V), 1.0 / self.V, device=device),
                         state.streams.uniform(N, rows=fresh.any(1)))
            q = torch.full((1, 1, self.V), 1.0 / self.V, device=device)
        else:  # spatial: the cell above (committed, a window draft or a staircase draft: the staircase lags behind)
            view = torch.where(self.aux_has, self.aux_tok, state.tokens[:, :N])
            c = proposal.cells.clamp(max=N - 1)
            view = view.scatter(1, c, torch.where(proposal.cells < N, proposal.tokens, view.gather(1, c)))
            tok = view.gather(1, (cells - self.W).clamp_min(0))
            q = torch.nn.functional.one_hot(tok, self.V).float()
        self.aux_tok = torch.where(fresh, tok, self.aux_tok)
        self.aux_q = torch.where(fresh[..., None], q, self.aux_q)
        self.aux_has |= fresh

    def observe(self, state: DecodeState, proposal: Proposal, p: torch.Tensor, verdict) -> None:
        if "aux_p" in proposal.extra:
            self._redraft_aux(state, proposal)
        super().observe(state, proposal, p, verdict)

    def _redraft_aux(self, state: DecodeState, proposal: Proposal) -> None:
        """Re-draft every scored staircase cell from its new p (its new q), coupled to its previous draft."""
        cells, valid, p_new = proposal.extra["aux_cells"], proposal.extra["aux_valid"], proposal.extra["aux_p"]
        valid = valid & (cells >= state.frontier[:, None])  # the window's bonus token may have committed one
        N, V = state.num_cells, p_new.shape[-1]
        c = cells.clamp(max=N - 1)
        draws = valid.any(1)
        # one uniform per grid cell (read at the cell), so an image's draws never depend on its batch-mates' counts
        u = state.streams.uniform(N, rows=draws).gather(1, c)
        if self.coupling == "gumbel":
            g = self.gumbel.gather(1, c[..., None].expand(-1, -1, V))
            new = torch.where(p_new > 0, p_new.log() + g, torch.full_like(g, float("-inf"))).argmax(-1)
        else:
            new = sample(p_new, u)
        if self.coupling == "maximal":
            old_tok = self.aux_tok.gather(1, c)
            old_q = self.aux_q.gather(1, c[..., None].expand(-1, -1, V))
            a = acceptance_probability(p_new.gather(-1, old_tok[..., None])[..., 0],
                                       old_q.gather(-1, old_tok[..., None])[..., 0])
            keep = state.streams.uniform(N, rows=draws).gather(1, c) < a
            new = torch.where(keep, old_tok, sample(residual_distribution(p_new, old_q), u))
        self.aux_tok.scatter_(1, c, torch.where(valid, new, self.aux_tok.gather(1, c)))
        self.aux_q.scatter_(1, c[..., None].expand(-1, -1, V),
                            torch.where(valid[..., None], p_new, self.aux_q.gather(1, c[..., None].expand(-1, -1, V))))

    def _initialise(self, tok, q, first, last_committed, streams, cells):
        """New window cells: a fresh initial draft as SJD's, replaced by the cell's staircase draft where it has one."""
        super()._initialise(tok, q, first, last_committed, streams, cells)
        if self.rows == 1:
            return
        N = self.aux_has.shape[1]
        c = cells.clamp(max=N - 1)
        fresh = (torch.arange(tok.shape[1], device=tok.device)[None] >= first[:, None]) & (cells < N)
        take = fresh & self.aux_has.gather(1, c)
        tok.copy_(torch.where(take, self.aux_tok.gather(1, c), tok))
        q.copy_(torch.where(take[..., None], self.aux_q.gather(1, c[..., None].expand(-1, -1, self.V)), q))


def pjd_parts(target: GPT, proposer: PJDProposer, rule) -> Parts:
    """PJD: the staircase proposer, the window-plus-staircase scorer, the window's exact rule and truncation."""
    return Parts(PJDScorer(target, proposer.gamma, proposer.rows), proposer, WindowVerifier(rule), TruncateRepairer())
