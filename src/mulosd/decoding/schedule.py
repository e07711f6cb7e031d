"""ZipAR's spatially parallel schedule (He et al., 2024), in one place: the ``zipar`` method, MuLo-SD's low-res
drafter and MuLo-SD's rejection islands all decide with it which cells one forward can sample.

**The rule.** Row r may sample its next column c once the row above holds at least ``c + window`` tokens (or is
complete); each forward samples one token for every such row. The logits for cell k come from a query at cell
k - 1, as in AR decoding. For the first cell of a row, cell k - 1 is the last cell of the row above, which is
usually not generated yet: as in the reference implementation, the last available token of the row above is fed
there as a stand-in and replaced by the real token once that row completes (its real last token is fed in the next
forward, which also writes its cache slot for the rows below).

Unlike the reference code, which lets queries attend to zero-filled cache slots of cells not yet generated, our
mask hides every slot that holds no token: a query at position p sees exactly the written slots s <= p. With
``window >= grid`` the schedule is purely sequential and the output is AR's, token for token.

- :func:`zipar_schedule_step`: one forward's plan from per-row token counts (the whole batch shares a schedule);
- :class:`ScheduledSampler`: runs the schedule on a model (the target for ``zipar``, the low-res drafter for
  MuLo-SD) over a band of rows, with its own cache and written-slot mask;
- :func:`island_ready`: the same rule on per-sample masks of pending cells grouped into islands, without
  stand-ins (MuLo-SD's parallel resampling, where the cell before an island's row start is usually final).
"""

from __future__ import annotations

import torch

from mulosd.decoding.sampling import RandomStreams, SamplingConfig, process_logits, sample
from mulosd.decoding.state import DecodeStats, cfg_labels, double, model_rows
from mulosd.models.gpt import GPT


def zipar_schedule_step(counts: list[int], fed_real: set[int], W: int, window: int) -> tuple[list[tuple[int, int | None]], dict[int, int]]:
    """One forward's plan from per-row token counts. Returns (feeds, stand_ins): ``feeds`` lists
    (cell fed, cell predicted from its logits or None); ``stand_ins`` maps fed cells whose token is a stand-in
    to the cell whose token stands in."""
    H = len(counts)
    feeds: dict[int, int | None] = {}
    stand_ins: dict[int, int] = {}
    for r in range(H):
        c = counts[r]
        if c >= W or (r > 0 and counts[r - 1] < W and counts[r - 1] < c + window):
            continue
        if r == 0 and c == 0:
            continue  # cell 0 comes from the prefill
        target = r * W + c
        feeds[target - 1] = target
        if c == 0 and counts[r - 1] < W:  # stand-in for the unfinished row above
            stand_ins[target - 1] = (r - 1) * W + counts[r - 1] - 1
    for r in range(H):  # completed rows whose real last token has not been written yet
        last = r * W + W - 1
        if counts[r] == W and last not in fed_real and last not in feeds:
            feeds[last] = None
    return sorted(feeds.items()), stand_ins


class ScheduledSampler:
    """A model sampling bands of grid rows on ZipAR's schedule, with its own CFG rows and KV cache. Every sample of
    the batch follows the same schedule (only tokens differ). ``window=None`` samples serially (window = grid).

    ``written`` marks the cache slots that hold a token; :meth:`mark_stale` clears slots whose cells received new
    tokens from outside (MuLo-SD's re-synchronisation), and the next :meth:`sample_rows` re-feeds them."""

    def __init__(self, model: GPT, window: int | None):
        self.model = model
        self.W = model.config.grid_size
        self.window = window or self.W

    def start(self, labels: torch.Tensor, cfg: SamplingConfig) -> None:
        """Allocate the cache and run the prefill (one forward); cell 0's distribution is kept for the first band."""
        m = self.model
        self.cfg = cfg
        m.setup_cache(model_rows(len(labels), cfg))
        self.first = process_logits(m.prefill(cfg_labels(m, labels, cfg)), cfg, predicts=0)
        self.written = torch.zeros(m.config.max_seq_len, dtype=torch.bool, device=labels.device)
        self.written[: m.config.cls_token_num] = True

    def finish(self) -> None:
        self.model.clear_cache()

    def mark_stale(self, start: int, end: int) -> None:
        """Cells [start, end) received new tokens: their slots must be re-fed before a query uses them."""
        T0 = self.model.config.cls_token_num
        self.written[T0 + start : T0 + end] = False

    def sample_rows(self, tokens: torch.Tensor, row0: int, nrows: int, streams: RandomStreams,
                    synced_from: int | None = None) -> int:
        """Sample rows row0 .. row0+nrows-1 of ``tokens`` [B, W*W] in place (rows above are complete). Cells from
        ``synced_from`` up to row0 received new tokens since they were cached and are re-fed in the first
        forward. Returns the forwards spent."""
        W, start = self.W, row0 * self.W
        counts = [W] * row0 + [0] * nrows
        refeed = set(range(min(synced_from, start - 1), start)) if start and synced_from is not None else set()
        if row0 == 0:
            tokens[:, 0] = sample(self.first, streams.uniform())
            counts[0] = 1
        fed_real = {r * W + W - 1 for r in range(row0)}
        forwards = 0
        while min(counts[row0:]) < W:
            feeds, stand_ins = zipar_schedule_step(counts, fed_real, W, self.window)
            plan = dict(feeds)
            for cell in refeed:
                plan.setdefault(cell, None)
            refeed = set()
            predict = self._forward(tokens, plan, stand_ins, streams)
            forwards += 1
            fed_real.update(c for c in plan if c not in stand_ins)
            for nxt in predict:
                counts[nxt // W] += 1
        return forwards

    def _forward(self, tokens, plan: dict, stand_ins: dict, streams: RandomStreams) -> list[int]:
        """Feed the plan's cells (stand-in tokens where planned), sample the cells it predicts; returns them."""
        m, cfg, device = self.model, self.cfg, tokens.device
        cells = torch.tensor(sorted(plan), device=device)
        source = torch.tensor([stand_ins.get(int(c), int(c)) for c in sorted(plan)], device=device)
        pos = cells + m.config.cls_token_num
        self.written[pos] = True
        length = int(pos.max()) + 1
        mask = self.written[:length][None, :] & (torch.arange(length, device=device)[None, :] <= pos[:, None])
        rows = model_rows(tokens.shape[0], cfg)
        logits = m.decode(double(tokens[:, source], cfg), cells.expand(rows, -1), mask=mask.expand(rows, -1, -1))
        predict = [(t, plan[c]) for t, c in enumerate(sorted(plan)) if plan[c] is not None]
        if predict:
            idx = torch.tensor([t for t, _ in predict], device=device)
            targets = torch.tensor([nxt for _, nxt in predict], device=device)
            new = sample(process_logits(logits[:, idx], cfg, predicts=targets), streams.uniform(len(predict)))
            tokens[:, torch.tensor([nxt for _, nxt in predict], device=device)] = new
        return [nxt for _, nxt in predict]


@torch.inference_mode()
def generate_zipar(model: GPT, labels: torch.Tensor, cfg: SamplingConfig, streams: RandomStreams,
                   window: int) -> tuple[torch.Tensor, DecodeStats]:
    """ZipAR on the target: the whole grid as one band. No drafter, no verification, lossy."""
    B, N = len(labels), model.config.num_tokens
    sampler = ScheduledSampler(model, window)
    try:
        sampler.start(labels, cfg)
        tokens = torch.zeros(B, N, dtype=torch.long, device=labels.device)
        forwards = 1 + sampler.sample_rows(tokens, 0, sampler.W, streams)
    finally:
        sampler.finish()
    return tokens, DecodeStats(target_forwards=forwards, active_forwards=forwards * B, tokens=N * B)


def island_ready(pending: torch.Tensor, islands: torch.Tensor, window: int) -> torch.Tensor:
    """Which pending cells [B, H, W] can be regenerated in this forward (MuLo-SD's parallel resampling).

    A pending cell (i, j) is ready when its raster predecessor is not pending (its query needs a final token
    there) and no pending cell of its own island lies in an earlier row at a column < j + window (ZipAR's rule:
    the rows above, inside the island, are ``window`` cells ahead). Islands never wait for each other, and the
    first pending cell in raster order is always ready, so every step makes progress."""
    B, H, W = pending.shape
    device = pending.device
    flat = pending.flatten(1)
    pred_pending = torch.cat([flat.new_zeros(B, 1), flat[:, :-1]], dim=1).view(B, H, W)
    K = int(islands.max()) if islands.numel() else 0
    if K == 0:
        return pending & ~pred_pending
    own = (islands[..., None] == torch.arange(1, K + 1, device=device)) & pending[..., None]  # [B, H, W, K]
    upto = own.int().cummax(dim=2).values  # pending in row i' at a column <= j
    upto = upto[:, :, (torch.arange(W, device=device) + window - 1).clamp_max(W - 1)]  # ... at a column < j + window
    above = torch.cat([torch.zeros_like(upto[:, :1]), upto[:, :-1]], dim=1).cummax(dim=1).values  # rows < i
    blocked = above.gather(3, (islands.clamp_min(1) - 1)[..., None]).squeeze(-1).bool()
    return pending & ~pred_pending & ~blocked
