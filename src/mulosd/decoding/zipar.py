"""ZipAR spatially parallel decoding (He et al., 2024): no drafter, no verification, lossy.

Row r may decode its next column c once the row above holds at least ``c + window`` tokens (or is complete);
each target forward then emits one token for every such row. The logits for cell k come from a query at cell
k - 1, as in AR decoding. For the first cell of a row, cell k - 1 is the last cell of the row above, which is
usually not generated yet: as in the reference implementation, the last available token of the row above is fed
there as a stand-in and replaced by the real token once that row completes (its real last token is fed in the
next forward, which also writes its cache slot for the rows below).

Unlike the reference code, which lets queries attend to zero-filled cache slots of cells not yet generated, our
mask hides every slot that holds no token: a query at position p sees exactly the written slots s <= p.
With ``window >= grid`` the schedule is purely sequential and the output is AR's, token for token.
"""

from __future__ import annotations

import torch

from mulosd.decoding.ar import DecodeStats, cfg_labels, double
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, process_logits, sample
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


@torch.inference_mode()
def generate_zipar(model: GPT, labels: torch.Tensor, cfg: SamplingConfig, streams: RandomStreams, window: int) -> tuple[torch.Tensor, DecodeStats]:
    B = len(labels)
    W, N = model.config.grid_size, model.config.num_tokens
    T0 = model.config.cls_token_num
    model.setup_cache(B * (2 if cfg.uses_cfg else 1))
    stats = DecodeStats()
    try:
        tokens = torch.zeros(B, N, dtype=torch.long)
        written = torch.zeros(model.config.max_seq_len, dtype=torch.bool)
        written[:T0] = True
        tokens[:, 0] = sample(process_logits(model.prefill(cfg_labels(model, labels, cfg)), cfg), streams.uniform())
        counts = [1] + [0] * (W - 1)
        fed_real: set[int] = set()
        forwards = 1
        while min(counts) < W:
            feeds, stand_ins = zipar_schedule_step(counts, fed_real, W, window)
            cells = torch.tensor([cell for cell, _ in feeds])
            source = torch.tensor([stand_ins.get(cell, cell) for cell, _ in feeds])
            pos = cells + T0
            written[pos] = True
            length = int(pos.max()) + 1
            mask = written[:length][None, :] & (torch.arange(length)[None, :] <= pos[:, None])  # [T, S]
            rows = B * (2 if cfg.uses_cfg else 1)
            logits = model.decode(double(tokens[:, source], cfg), cells.expand(rows, -1),
                                  mask=mask.expand(rows, -1, -1))
            forwards += 1
            for cell, _ in feeds:
                if cell not in stand_ins:
                    fed_real.add(cell)
            predict = [(t, nxt) for t, (_, nxt) in enumerate(feeds) if nxt is not None]
            if predict:
                idx = torch.tensor([t for t, _ in predict])
                probs = process_logits(logits[:, idx], cfg)
                new = sample(probs, streams.uniform(len(predict)))
                tokens[:, torch.tensor([nxt for _, nxt in predict])] = new
                for _, nxt in predict:
                    counts[nxt // W] += 1
        stats.target_forwards = forwards
        stats.active_forwards = forwards * B
        stats.tokens = N * B
    finally:
        model.clear_cache()
    return tokens, stats
