"""EAGLE's draft head (Li et al., 2024; EAGLE-2's dynamic trees use the same head) for a mulosd GPT target.

One transformer layer of the target's own design (RMSNorm, 2-D rotary angles, SwiGLU) reads, at image cell k, the
target's last hidden state at cell k - 1 (before the final norm: what predicts token k) together with the embedding
of token k, fused by a linear layer, and predicts the target's hidden state at cell k. The target's frozen final
norm and output layer turn a predicted state into logits, so the head owns no vocabulary-sized layer. Under
classifier-free guidance it runs on both halves (the conditional and the null-condition features) and the shared
sampling module mixes them, as for the target.

The head attends over image cells only (the condition reaches it through the features). Its one-layer cache is
indexed like the target's: cell c at slot c, and draft-tree nodes at slots past the grid with their own cells'
rotary angles (:meth:`EagleHead.step`).

A head belongs to one target: its config records the target's architecture and a fingerprint of its weights
(:func:`target_fingerprint`), and :meth:`EagleHead.check` refuses any other target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mulosd.errors import MulosdError
from mulosd.io import Pretrained, weights_fingerprint
from mulosd.models.gpt import GPT, GPTConfig, KVCache, TransformerBlock, rope_2d_table


def target_fingerprint(target: GPT) -> str:
    """A short hash of the target's token embeddings and output layer (rounded to fp16, so an fp32 run and an fp16
    copy of the same weights agree)."""
    return weights_fingerprint(target.tok_embeddings.weight, target.output.weight)


@dataclass
class EagleConfig:
    target: dict = field(default_factory=dict)  # the target's GPTConfig fields (the layer copies its design)
    target_id: str = ""  # target_fingerprint() of the target it was trained for

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**self.target)


class EagleHead(Pretrained, nn.Module):
    config_class = EagleConfig
    kind = "eagle_head"

    def __init__(self, config: EagleConfig):
        super().__init__()
        self.config = config
        c = self.gcfg = config.gpt_config()
        self.embed = nn.Embedding(c.vocab_size, c.dim)  # a copy of the target's, trained along
        self.fuse = nn.Linear(2 * c.dim, c.dim, bias=True)
        self.layer = TransformerBlock(c)
        self.register_buffer("rope", rope_2d_table(c.grid_size, c.head_dim, c.rope_base, 0), persistent=False)
        self.cache_batch = 0

    @classmethod
    def for_target(cls, target: GPT) -> "EagleHead":
        """A fresh head for ``target``: its design, its fingerprint, its token embeddings as the start."""
        cfg = asdict(target.config)
        if cfg.get("condition", "class") != "class" or not isinstance(target.tok_embeddings, nn.Embedding):
            raise MulosdError("an EAGLE head needs a discrete-token class-conditional target")
        head = cls(EagleConfig(target=cfg, target_id=target_fingerprint(target)))
        with torch.no_grad():
            head.embed.weight.copy_(target.tok_embeddings.weight)
            # start as "the next hidden state is this one": the residual path carries the feature half through
            head.fuse.weight.zero_()
            head.fuse.weight[:, : target.config.dim].copy_(torch.eye(target.config.dim))
            head.fuse.bias.zero_()
        return head

    def check(self, target: GPT) -> None:
        """Refuse a target other than the one this head was trained for."""
        fp = target_fingerprint(target)
        if self.config.target_id != fp:
            raise MulosdError(f"the EAGLE head was trained for target {self.config.target_id or '(unrecorded)'}; this "
                              f"model set's target is {fp} (train one for it: mulosd train eagle --model SET)")
        mine, theirs = self.gcfg, target.config
        for name in ("dim", "vocab_size", "grid_size", "n_head"):
            if getattr(mine, name) != getattr(theirs, name):
                raise MulosdError(f"the EAGLE head was built for {name}={getattr(mine, name)}; the target has "
                                  f"{getattr(theirs, name)}")

    # ---- training: teacher-forced over whole grids, no cache ----------------------------------------------------
    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """features [B, T, dim]: the target's hidden state at cells -1 .. T-2 (cell -1 is the last condition
        position); tokens [B, T]: cells 0 .. T-1. Returns the predicted hidden states at cells 0 .. T-1."""
        T = tokens.shape[1]
        x = self.fuse(torch.cat([features, self.embed(tokens)], dim=-1))
        rope = self.rope[:T][None].expand(tokens.shape[0], -1, -1, -1)
        att = self.layer.attention
        h = self.layer.attention_norm(x)
        # the block's attention with a causal mask and no cache
        att.kv_cache = None
        x = x + att(h, rope, None, None, T)
        return x + self.layer.feed_forward(self.layer.ffn_norm(x))

    # ---- decoding: a position-indexed cache, tree nodes at spare slots ------------------------------------------
    def setup_cache(self, batch: int, slack: int) -> None:
        c = self.gcfg
        p = next(self.parameters())
        self.layer.attention.kv_cache = KVCache(batch, c.num_tokens + slack, c.kv_heads, c.head_dim, p.dtype, p.device)
        self.cache_batch = batch
        self._rope = torch.cat([self.rope, self.rope.new_zeros(slack, *self.rope.shape[1:])])

    def clear_cache(self) -> None:
        self.layer.attention.kv_cache = None
        self.cache_batch = 0

    def step(self, features: torch.Tensor, tokens: torch.Tensor, cells: torch.Tensor, slots: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """One cached forward: inputs (feature at cell c - 1, token at cell c) for cells ``cells`` [B, T], keys
        stored at ``slots`` [B, T] (cell indices; past the grid for tree nodes), ``mask`` [B, T, S] over slots.
        Returns the predicted hidden states [B, T, dim] at those cells."""
        if not self.cache_batch:
            raise RuntimeError("step() needs setup_cache() first")
        x = self.fuse(torch.cat([features.to(self.fuse.weight.dtype), self.embed(tokens)], dim=-1))
        rope = self._rope[cells]
        return self.layer(x, rope, slots, mask, mask.shape[-1])


def head_logits(target: GPT, hidden: torch.Tensor) -> torch.Tensor:
    """Predicted hidden states -> logits through the target's frozen final norm and output layer (float32)."""
    return target.output(target.norm(hidden.to(target.norm.weight.dtype))).float()
