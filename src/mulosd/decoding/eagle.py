"""EAGLE-2 (Li et al., 2024): dynamic draft trees from EAGLE's one-layer head, verified exactly in one target forward.

Per cycle, for each sample at frontier f (cells < f committed, f - 1 the newest):

1. **Catch-up** (:meth:`TreeProposer._catch_up`): the head is fed the committed cells it has not seen with the
   target's true features, (hidden state at c - 1, token c) for c up to f - 1; its output at f - 1 predicts cell f.
2. **Expansion** (EAGLE-2's dynamic tree, :meth:`TreeProposer._expand`): the ``topk`` most likely tokens for cell f
   are the depth-1 nodes, scored by their log-probability under the head's (guided) distribution. At every further
   depth the ``topk`` best-scoring nodes of the previous depth are fed to the head together (tree attention: each
   sees the committed prefix, its ancestors and itself; keys at spare slots past the grid with their own cells'
   rotary angles) and each proposes its ``topk`` most likely children, scored by the path's summed log-probability
   (the head's confidence in the whole branch). After ``depth`` levels the ``tokens`` best-scoring candidates over
   all levels form the draft tree (a child never outscores its parent, so the set is closed under ancestors).
3. **Verification** (:class:`TreeScorer`, :func:`~mulosd.decoding.rules.verify_tree`): one target forward over the
   last committed token and every tree node under the tree mask gives p after each node; the tree's candidates are
   deterministic, so the walk draws the target's token at each node and follows the tree while that token is one
   of the node's children (multi-draft rejection sampling for deterministic candidates), committing exact draws
   from p.
4. **Repair** (:class:`TreeRepairer`): the accepted path and the next token are committed; the accepted nodes' keys
   and values move from their spare slots to their cells (:meth:`~mulosd.models.gpt.GPT.copy_cache`), and their
   hidden states become the head's next catch-up features.
"""

from __future__ import annotations

import torch

from mulosd.decoding.engine import Parts, Proposal
from mulosd.decoding.rules import TreeVerdict, verify_tree
from mulosd.decoding.sampling import process_logits, sample
from mulosd.decoding.state import DecodeState, cfg_labels, double, model_rows
from mulosd.models.eagle import EagleHead, head_logits
from mulosd.models.gpt import GPT


def tree_mask(prefix: torch.Tensor, slots: torch.Tensor, ancestors: torch.Tensor, S: int) -> torch.Tensor:
    """[B, T, S] attention of T tree queries: slot s is visible when s < prefix [B] (committed cells), or s is one
    of the query's ancestors' slots (``ancestors`` [B, T, A], -1 for none), or the query's own slot [B, T]."""
    s = torch.arange(S, device=slots.device)
    mask = (s[None, None, :] < prefix[:, None, None]) | (s[None, None, :] == slots[..., None])
    hit = torch.zeros(*slots.shape, S + 1, dtype=torch.bool, device=slots.device)
    hit.scatter_(2, torch.where(ancestors >= 0, ancestors, S), True)
    return mask | hit[..., :S]


class TreeScorer:
    """The target: prefill (keeping the condition position's hidden state for the head), then per cycle one forward
    over the root (last committed token, at its own slot) and the tree nodes (spare slots N + 1 + j, rotary angles
    of their cells) under the tree mask. Returns (p [B, 1 + M, V], hidden [rows, 1 + M, dim])."""

    def __init__(self, target: GPT, nodes: int):
        self.target, self.M = target, nodes

    def start(self, labels, cfg, streams) -> DecodeState:
        t, N = self.target, self.target.config.num_tokens
        slack = self.M + 2
        t.setup_cache(model_rows(len(labels), cfg), slack=slack)
        state = DecodeState.new(labels, cfg, streams, N, slack)
        logits, h = t.prefill(cfg_labels(t, labels, cfg), hidden=True)
        state.first = process_logits(logits, cfg, predicts=0)
        state.tokens[:, 0] = sample(state.first, streams.uniform())
        state.frontier.fill_(1)
        B = len(labels)
        state.stats.target_forwards, state.stats.active_forwards, state.stats.tokens = 1, B, B
        state.cells = {"features": h[:, None], "from": torch.zeros(B, dtype=torch.long, device=state.device)}
        return state

    def score(self, state: DecodeState, proposal: Proposal):
        cfg, f, N, T0 = state.cfg, state.frontier, state.num_cells, self.target.config.cls_token_num
        tree = proposal.extra
        root = (f - 1)[:, None]
        cells = torch.cat([root, f[:, None] - 1 + tree["depth"]], dim=1)  # node at depth d sits at cell f - 1 + d
        slots = torch.cat([root, N + 1 + torch.arange(self.M, device=f.device).expand(len(f), -1)], dim=1)
        feed = torch.cat([state.tokens.gather(1, root), proposal.tokens], dim=1)
        anc = torch.cat([torch.full_like(tree["ancestors"][:, :1], -1), tree["ancestors"]], dim=1)
        anc = torch.where(anc >= 0, anc + N + 1, -1)  # node indices -> their slots
        S = T0 + N + 1 + self.M
        mask = tree_mask(f + T0, slots + T0, torch.where(anc >= 0, anc + T0, -1), S)
        logits, hidden = self.target.decode(double(feed, cfg), double(cells.clamp(max=N + self.M), cfg),
                                            mask=double(mask, cfg), slots=double(slots, cfg), hidden=True)
        p = process_logits(logits, cfg, predicts=cells + 1)
        state.stats.target_forwards += 1
        state.stats.active_forwards += state.n_active
        return p, hidden

    def finish(self) -> None:
        self.target.clear_cache()


class TreeProposer:
    """EAGLE-2's dynamic tree from the head (see the module docstring). ``depth`` levels, ``topk`` children per
    expanded node and ``topk`` nodes expanded per level, ``tokens`` nodes kept."""

    observe_phase = None

    def __init__(self, target: GPT, head: EagleHead, depth: int, topk: int, tokens: int):
        self.target, self.head = target, head
        self.D, self.K, self.M = depth, topk, tokens

    def start(self, state: DecodeState) -> None:
        B, N = state.batch, state.num_cells
        self.slack = (self.D - 1) * self.K + self.D + 4
        self.head.setup_cache(model_rows(B, state.cfg), self.slack)
        self.pad_base = N + 1 + (self.D - 1) * self.K

    def finish(self) -> None:
        self.head.clear_cache()

    def _step(self, state, features, tokens, cells, slots, mask):
        cfg = state.cfg
        return self.head.step(features, double(tokens, cfg), double(cells, cfg), double(slots, cfg), double(mask, cfg))

    def _catch_up(self, state: DecodeState) -> torch.Tensor:
        """Feed the head (true feature at c - 1, token c) for every committed cell c it has not seen; returns its
        predicted hidden state at cell f - 1 [rows, 1, dim]."""
        f, N = state.frontier, state.num_cells
        start, feats = state.cells["from"], state.cells["features"]  # feats [rows, P, dim]: features at c - 1
        count = (f - start).clamp_min(1)
        P = feats.shape[1]
        span = torch.arange(P, device=f.device)
        valid = span[None] < count[:, None]
        cells = torch.where(valid, start[:, None] + span, 0)
        slots = torch.where(valid, cells, self.pad_base + span)
        tokens = state.tokens.gather(1, cells)
        S = self.pad_base + P
        s = torch.arange(S, device=f.device)
        mask = (s[None, None, :] <= cells[:, :, None]) & (s[None, None, :] < N)  # real slots at or before the cell
        mask |= s[None, None, :] == slots[:, :, None]
        out = self._step(state, feats, tokens, cells, slots, mask)
        last = (count - 1).clamp(max=P - 1)
        return out.gather(1, double(last, state.cfg)[:, None, None].expand(-1, 1, out.shape[-1]))

    def _dist(self, state, hidden, predicts):
        return process_logits(head_logits(self.target, hidden), state.cfg, predicts=predicts)

    def propose(self, state: DecodeState) -> Proposal:
        with state.phase("drafting"):
            return self._expand(state)

    def _expand(self, state: DecodeState) -> Proposal:
        cfg, f, N = state.cfg, state.frontier, state.num_cells
        B, K, D, M = state.batch, self.K, self.D, self.M
        device = f.device
        root_h = self._catch_up(state)  # [rows, 1, dim]
        q = self._dist(state, root_h, f[:, None])[:, 0]  # [B, V]
        lq, tok = q.clamp_min(1e-30).log().topk(K, dim=-1)
        cand_tok, cand_score = [tok], [lq]
        cand_par = [torch.full((B, K), -1, dtype=torch.long, device=device)]
        cand_depth = [torch.ones(B, K, dtype=torch.long, device=device)]
        front = torch.arange(K, device=device).expand(B, -1)  # candidate indices of the nodes to expand
        front_h = root_h.expand(-1, K, -1)  # the feature each front node is fed with (its parent's prediction)
        front_anc = torch.full((B, K, 0), -1, dtype=torch.long, device=device)  # ancestors' head slots
        offset, forwards = K, 1
        for d in range(1, D):
            slots = N + 1 + (d - 1) * K + torch.arange(K, device=device).expand(B, -1)
            cells = (f - 1 + d)[:, None].expand(-1, K).clamp(max=N - 1 + self.slack)
            tok_front = torch.cat(cand_tok, 1).gather(1, front)
            S = N + 1 + (D - 1) * K
            mask = tree_mask(f, slots, front_anc, S)
            h = self._step(state, front_h, tok_front, cells, slots, mask)  # [rows, K, dim]
            forwards += 1
            q = self._dist(state, h, (f + d)[:, None].expand(-1, K))  # [B, K, V]
            lq, child = q.clamp_min(1e-30).log().topk(K, dim=-1)  # [B, K, K]
            score = torch.cat(cand_score, 1).gather(1, front)[..., None] + lq
            cand_tok.append(child.flatten(1))
            cand_score.append(score.flatten(1))
            cand_par.append(front[..., None].expand(-1, -1, K).flatten(1))
            cand_depth.append(torch.full((B, K * K), d + 1, dtype=torch.long, device=device))
            if d + 1 < D:  # the next level's front: the K best children
                best = score.flatten(1).topk(K, dim=-1).indices
                parent_pos = best // K  # which front node
                front_anc = torch.cat([front_anc.gather(1, parent_pos[..., None].expand(-1, -1, front_anc.shape[-1])),
                                       slots.gather(1, parent_pos)[..., None]], dim=-1)
                front_h = h.gather(1, double(parent_pos, cfg)[..., None].expand(-1, -1, h.shape[-1]))
                front = offset + best
            offset += K * K
        tok, score = torch.cat(cand_tok, 1), torch.cat(cand_score, 1)
        par, depth = torch.cat(cand_par, 1), torch.cat(cand_depth, 1)
        return self._select(state, tok, score, par, depth, forwards)

    def _select(self, state, tok, score, par, depth, forwards) -> Proposal:
        """The ``tokens`` best candidates, ordered by depth then score (parents before children), with each node's
        parent, ancestors and children (in the order verification tries them) re-indexed to the tree (1 .. M)."""
        B, C = tok.shape
        M, K, D = min(self.M, C), self.K, self.D
        device = tok.device
        key = score - depth * 1e-4  # ties: the shallower node first, so a chosen node's parent is always chosen
        chosen = key.topk(M, dim=-1).indices  # [B, M]
        # by depth, then by score (log-probabilities of at most `depth` steps, each clamped at log 1e-30 > -70)
        chosen = chosen.gather(1, (depth.gather(1, chosen) * 1e4 - key.gather(1, chosen)).argsort(1))
        where = torch.full((B, C), -1, dtype=torch.long, device=device)
        where.scatter_(1, chosen, torch.arange(1, M + 1, device=device).expand(B, -1))  # candidate -> node index
        parent_c = par.gather(1, chosen)
        parent = torch.where(parent_c >= 0, where.gather(1, parent_c.clamp_min(0)), 0)  # 0: the root
        node_depth = depth.gather(1, chosen)
        # ancestors (node indices, root excluded), nearest first
        anc = torch.full((B, M, D - 1), -1, dtype=torch.long, device=device)
        walk = parent.clone()
        for a in range(D - 1):
            anc[:, :, a] = torch.where(walk > 0, walk - 1, -1)  # stored 0-based for the scorer's slots
            up = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), parent], 1)
            walk = torch.where(walk > 0, up.gather(1, walk), 0)
        # children of every node (root = 0), in tree order (= score order among siblings): node j is child number
        # (earlier nodes with the same parent) of its parent; an expanded node has at most topk children
        j = torch.arange(M, device=device)
        rank = ((parent[:, :, None] == parent[:, None, :]) & (j[None, None, :] < j[None, :, None])).sum(-1)
        children = torch.full((B, (M + 1) * K), -1, dtype=torch.long, device=device)
        children.scatter_(1, parent * K + rank, (j + 1).expand(B, -1))
        children = children.view(B, M + 1, K)
        node_tok = tok.gather(1, chosen)
        cells = state.frontier[:, None] - 1 + node_depth
        return Proposal(tokens=node_tok, cells=cells, forwards=forwards,
                        extra={"depth": node_depth, "ancestors": anc, "children": children})

    def observe(self, state, proposal, scores, verdict) -> None:
        pass


class TreeVerifier:
    """:func:`verify_tree` fed with depth + 1 uniforms per image."""

    def __init__(self, depth: int):
        self.D = depth

    def __call__(self, state: DecodeState, proposal: Proposal, scores) -> TreeVerdict:
        p, _ = scores
        tokens = torch.cat([proposal.tokens[:, :1], proposal.tokens], dim=1)  # node 0 (root) is never tested
        return verify_tree(p, tokens, proposal.extra["children"], state.streams.uniform(self.D + 1))


class TreeRepairer:
    """Commit the accepted path and the next token, move the accepted nodes' keys home, and hand the head the true
    features of the newly committed cells (the root's and the accepted nodes' hidden states)."""

    phase = "verification"

    def __init__(self, target: GPT):
        self.target = target

    def repair(self, state: DecodeState, proposal: Proposal, scores, verdict: TreeVerdict) -> None:
        _, hidden = scores
        f, N, cfg = state.frontier, state.num_cells, state.cfg
        B, D = verdict.path.shape
        n = verdict.num_accepted
        span = torch.arange(D + 1, device=f.device)
        path_nodes = torch.cat([verdict.path, torch.full_like(verdict.path[:, :1], -1)], 1)  # [B, D + 1]
        node_tok = torch.cat([proposal.tokens[:, :1], proposal.tokens], 1)
        row = node_tok.gather(1, path_nodes.clamp_min(0))
        row = torch.where(span[None] < n[:, None], row, 0)
        row.scatter_(1, n[:, None], verdict.next_token[:, None])
        count = torch.minimum(n + 1, (N - f).clamp_min(0))
        cells = f[:, None] + span
        keep = span[None] < count[:, None]
        state.tokens.scatter_(1, cells, torch.where(keep, row, state.tokens.gather(1, cells)))
        # accepted nodes' keys: from spare slot N + node to their cells f .. f + n - 1 (garbage moves are harmless:
        # slots at or after the new frontier are rewritten before any query sees them)
        moved = torch.where(span[None, :D] < n[:, None], path_nodes[:, :D], 0)
        src = torch.where(moved > 0, N + moved, f[:, None] - 1)
        dst = torch.where(moved > 0, cells[:, :D], f[:, None] - 1)
        self.target.copy_cache(double(src, cfg), double(dst, cfg))
        # the head's catch-up: features at c - 1 for c = f .. f + n (root's hidden, then each accepted node's)
        feats_nodes = torch.cat([torch.zeros_like(path_nodes[:, :1]), path_nodes[:, :D]], 1).clamp_min(0)  # [B, D+1]
        idx = double(feats_nodes, cfg)
        state.cells["features"] = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        state.cells["from"] = f.clone()
        state.frontier = f + count
        s = state.stats
        s.tokens += count.sum()
        active = f < N
        real = torch.minimum(n, (N - f).clamp_min(0))
        s.drafted += (proposal.tokens.shape[1] * active).sum()
        s.accepted += (real * active).sum()
        s.add_accepted(real, D, where=active)


def eagle_parts(target: GPT, head: EagleHead, depth: int, topk: int, tokens: int) -> Parts:
    """EAGLE-2: the head's dynamic tree, the target's tree forward, exact tree verification, path commit."""
    M = min(tokens, topk + (depth - 1) * topk * topk)
    return Parts(TreeScorer(target, M), TreeProposer(target, head, depth, topk, M), TreeVerifier(depth),
                 TreeRepairer(target))
