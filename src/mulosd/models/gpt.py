"""A GPT over a token grid, in LlamaGen's design and state-dict layout, class- (c2i) or caption-conditional (t2i).

RMSNorm, SwiGLU, 2-D rotary embeddings over the grid, no biases. The condition is either a class token with a null
class (id ``num_classes``) for classifier-free guidance, or (``condition="caption"``) LlamaGen's caption path:
T5 features [B, cls_token_num, caption_dim] projected by a two-layer GELU MLP, a learned unconditional embedding
for guidance, and padding positions of the caption hidden from attention (:mod:`mulosd.models.condition`).
Positions are *absolute*: positions ``[0, cls_token_num)`` hold the condition, and image token k (raster order) is
fed at position ``cls_token_num + k``; the logits produced there predict token k + 1 (the last condition position
predicts token 0). As in LlamaGen, the condition positions get a zero rotary table, which zeroes their q and k.

The KV cache is indexed by absolute position with one position row per sample, so each sample in a batch can
sit at its own frontier, "rollback" is simply not advancing, and any grid cell can be (re)written. Attention is
causal by absolute position: a query at position p sees every cache slot s <= p, whatever order the slots were
written in. Callers may pass their own boolean mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mulosd.errors import MulosdError
from mulosd.io import Pretrained
from mulosd.models.condition import Captions

CONDITIONS = ("class", "caption")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class GPTConfig:
    vocab_size: int = 512
    grid_size: int = 16  # tokens per side; LlamaGen's block_size = grid_size**2
    dim: int = 256
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int | None = None
    multiple_of: int = 64
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 10
    cls_token_num: int = 1
    class_dropout_prob: float = 0.1
    dropout: float = 0.0
    condition: str = "class"  # "class" (c2i) or "caption" (t2i: cls_token_num caption positions)
    caption_dim: int = 2048  # the text encoder's hidden size (caption models only; flan-t5-xl: 2048)

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise MulosdError(f"condition {self.condition!r} unknown; allowed: {', '.join(CONDITIONS)}")
        if self.condition == "caption" and self.caption_dim < 1:
            raise MulosdError(f"caption_dim must be >= 1, got {self.caption_dim}")
        if self.dim % self.n_head:
            raise MulosdError(f"dim {self.dim} must be divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise MulosdError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D rotary embeddings")
        if self.n_head % self.kv_heads:
            raise MulosdError(f"n_head {self.n_head} must be divisible by n_kv_head {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def max_seq_len(self) -> int:
        return self.cls_token_num + self.num_tokens

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)


def rope_2d_table(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """cos/sin table [cls_token_num + grid**2, head_dim/2, 2]; the first half of the rotary pairs rotate with the
    row index, the second half with the column index; condition positions get zeros."""
    quarter = head_dim // 4
    inv_freq = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))
    idx = torch.arange(grid_size, dtype=torch.float64)
    angles = torch.outer(idx, inv_freq)  # [grid, quarter]
    rows = angles[:, None, :].expand(grid_size, grid_size, quarter)
    cols = angles[None, :, :].expand(grid_size, grid_size, quarter)
    grid = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim // 2)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).float()
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; table [B, T, D/2, 2] (cos, sin). Rotates adjacent pairs (x[2m], x[2m+1])."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table[:, :, None]
    out = torch.stack(
        [xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1], xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalised in fp32, as LlamaGen does
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class KVCache(nn.Module):
    """Per-layer key/value buffers [B, S, H_kv, D] written at absolute positions (one row of positions per sample)."""

    def __init__(self, batch: int, seq_len: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, seq_len, n_kv_head, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        """Write k, v [B, T, H, D] at positions input_pos [B, T]; return the first ``length`` slots."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, input_pos] = k.to(self.k.dtype)
        self.v[rows, input_pos] = v.to(self.v.dtype)
        return self.k[:, :length], self.v[:, :length]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, input_pos, mask, length):
        B, T, _ = x.shape
        c = self.cfg
        qk, v = self.wqkv(x).split([c.dim + c.kv_heads * c.head_dim, c.kv_heads * c.head_dim], dim=-1)
        qk = apply_rope(qk.view(B, T, c.n_head + c.kv_heads, c.head_dim), rope)  # q and k rotated in one go
        q, k = qk.split([c.n_head, c.kv_heads], dim=2)
        v = v.view(B, T, c.kv_heads, c.head_dim)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, length)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if c.kv_heads != c.n_head:
            k = k.repeat_interleave(c.n_head // c.kv_heads, dim=1)
            v = v.repeat_interleave(c.n_head // c.kv_heads, dim=1)
        if mask is None:  # training: plain causal over the sequence
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.wo(y.transpose(1, 2).reshape(B, T, c.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, input_pos, mask, length):
        x = x + self.drop(self.attention(self.attention_norm(x), rope, input_pos, mask, length))
        return x + self.drop(self.feed_forward(self.ffn_norm(x)))


class ClassEmbedder(nn.Module):
    """Class id -> embedding; row ``num_classes`` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, length: int) -> torch.Tensor:
        """[B] class ids -> [B, length, dim]: the class embedding at every condition position."""
        return self.embedding_table(labels)[:, None].expand(-1, length, -1)


class CaptionMLP(nn.Module):
    """LlamaGen's caption projection: Linear -> GELU (tanh approximation) -> Linear, no biases."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption features [B, T, caption_dim] -> [B, T, dim]; ``uncond_embedding`` [T, caption_dim] is the learned
    "no caption" input that classifier-free guidance uses as its unconditional half (a buffer, as in LlamaGen,
    so that it sits in the state dict under ``cls_embedding.uncond_embedding``)."""

    def __init__(self, caption_dim: int, dim: int, length: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(length, caption_dim) / caption_dim**0.5)

    def forward(self, captions: Captions, length: int) -> torch.Tensor:
        return self.cap_proj(captions.features.to(self.cap_proj.fc1.weight.dtype))


class GPT(Pretrained, nn.Module):
    config_class = GPTConfig
    kind = "gpt"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = self._input_layer(config)
        self.cls_embedding = (CaptionEmbedder(config.caption_dim, config.dim, config.cls_token_num)
                              if config.condition == "caption" else ClassEmbedder(config.num_classes, config.dim))
        self.tok_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = self._output_layer(config)
        self.register_buffer(
            "rope", rope_2d_table(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num),
            persistent=False,
        )
        self.apply(self._init_weights)
        self.cache_batch = 0
        self._cond_valid: torch.Tensor | None = None  # [rows, cls_token_num] caption positions others may see

    @staticmethod
    def _input_layer(config) -> nn.Module:
        """Token -> model width: a code embedding here; a linear projection for continuous tokens (subclasses)."""
        return nn.Embedding(config.vocab_size, config.dim)

    @staticmethod
    def _output_layer(config) -> nn.Module:
        """Final hidden state -> what the model emits per position: logits over the codebook here."""
        return nn.Linear(config.dim, config.vocab_size, bias=False)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ---- conditions -----------------------------------------------------------------------------------------
    def check_condition(self, cond) -> None:
        """A condition of the kind this model takes (class ids for c2i, Captions of the right shape for t2i)."""
        c = self.config
        if c.condition == "class":
            if isinstance(cond, Captions):
                raise MulosdError("this model is class-conditional (c2i): it takes class ids, not a caption or prompt")
            return
        if not isinstance(cond, Captions):
            raise MulosdError("this model is text-conditional (t2i): it takes a caption (--prompt with --t5-path, or "
                              "--caption-features), not class ids")
        T, C = cond.features.shape[1:]
        if (T, C) != (c.cls_token_num, c.caption_dim):
            raise MulosdError(f"caption features are [{T}, {C}] per caption; this model takes [{c.cls_token_num}, "
                              f"{c.caption_dim}] ({c.cls_token_num} condition tokens of the text encoder's "
                              f"{c.caption_dim} channels)")

    def with_null(self, cond):
        """[cond ; null]: the model batch for classifier-free guidance (the null class, or the learned unconditional
        caption embedding with each caption's own mask, as LlamaGen pairs them)."""
        if isinstance(cond, Captions):
            null = self.cls_embedding.uncond_embedding.float().to(cond.device).expand_as(cond.features)
            return Captions.cat([cond, Captions(null, cond.mask)])
        return torch.cat([cond, torch.full_like(cond, self.null_class)])

    def embed_condition(self, cond) -> torch.Tensor:
        """Condition -> [B, cls_token_num, dim] hidden states of the condition positions; remembers which caption
        positions are padding (hidden from attention until the cache is cleared)."""
        self.check_condition(cond)
        if isinstance(cond, Captions):
            self._cond_valid = None if bool(cond.mask.all()) else cond.mask.to(self.rope.device)
        return self.cls_embedding(cond, self.config.cls_token_num)

    def _hide_padding(self, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``mask`` [B, T, S] (True = attend) with the caption's padding positions hidden from every query but
        their own (LlamaGen: the caption mask on the condition columns, then the diagonal set)."""
        valid = self._cond_valid
        S, T0 = mask.shape[-1], valid.shape[1]
        slots = torch.arange(S, device=mask.device)
        seen = torch.ones(valid.shape[0], S, dtype=torch.bool, device=mask.device)
        seen[:, : min(T0, S)] = valid[:, :S]
        return mask & (seen[:, None, :] | (slots[None, None, :] == input_pos[:, :, None]))

    # ---- caches -------------------------------------------------------------------------------------------
    def setup_cache(self, batch: int, dtype: torch.dtype | None = None, slack: int = 0) -> None:
        """Allocate empty position-indexed caches for ``batch`` rows (2x the images when CFG is on).

        ``slack`` extra slots past the last grid cell let speculative methods feed fixed-width windows that run
        off the end of the grid: those padding cells are written and scored like any other but, lying after every
        real cell, are never seen by a real cell's query."""
        dtype = dtype or self.norm.weight.dtype
        c = self.config
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, c.max_seq_len + slack, c.kv_heads, c.head_dim, dtype,
                                               self.norm.weight.device)  # allocated where it is used
        self.cache_batch = batch
        self._cond_valid = None
        self._rope_cache = torch.cat([self.rope, self.rope.new_zeros(slack, *self.rope.shape[1:])]) if slack else self.rope

    def swap_cache(self, saved: tuple | None) -> tuple | None:
        """Install a cache that an earlier swap returned (its KVCache per layer and the caption-padding mask of its
        rows; None: no cache) and return the one in place, so that two decodes can keep their caches side by side
        on one model (MuLo-SD's continuous batching: a group being drafted and verified, and the resampling pool).
        Both must have been set up with the same slack."""
        old = None if not self.cache_batch else ([layer.attention.kv_cache for layer in self.layers], self._cond_valid)
        caches, valid = saved if saved is not None else (None, None)
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = None if caches is None else caches[i]
        self.cache_batch = 0 if caches is None else caches[0].k.shape[0]
        self._cond_valid = valid
        return old

    def copy_cache_rows(self, saved: tuple, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        """Copy every slot of rows ``src_rows`` of a cache :meth:`swap_cache` returned into rows ``dst_rows`` of the
        installed one (keys, values and caption-padding mask)."""
        caches, valid = saved
        for layer, cache in zip(self.layers, caches):
            mine = layer.attention.kv_cache
            mine.k[dst_rows] = cache.k[src_rows]
            mine.v[dst_rows] = cache.v[src_rows]
        if valid is not None or self._cond_valid is not None:
            T0 = self.config.cls_token_num
            if self._cond_valid is None:
                self._cond_valid = torch.ones(self.cache_batch, T0, dtype=torch.bool, device=valid.device)
            self._cond_valid[dst_rows] = valid[src_rows] if valid is not None else True

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_batch = 0
        self._cond_valid = None
        self._rope_cache = self.rope

    # ---- forward passes -------------------------------------------------------------------------------------
    def _run(self, h: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor | None,
             slots: torch.Tensor | None = None, hidden: bool = False):
        """Run the layers on inputs at positions ``input_pos`` (their rotary angles); keys and values go to the cache
        at ``slots`` (absolute; default: the positions themselves). ``hidden``: also return the last layer's output
        before the final norm (the features EAGLE's draft head reads)."""
        rope = (self._rope_cache if self.cache_batch else self.rope)[input_pos]
        if slots is not None:
            if mask is None:
                raise ValueError("writing keys at slots other than the positions needs an explicit mask")
            input_pos = slots
        if mask is None and (self.cache_batch or self._cond_valid is not None):
            length = int(input_pos.max()) + 1
            mask = torch.arange(length, device=h.device)[None, None, :] <= input_pos[:, :, None]
        else:
            length = mask.shape[-1] if mask is not None else h.shape[1]
        if self._cond_valid is not None:
            mask = self._hide_padding(mask.expand(h.shape[0], -1, -1), input_pos)
        for layer in self.layers:
            h = layer(h, rope, input_pos, mask, length)
        logits = self.output(self.norm(h)).float()
        return (logits, h) if hidden else logits

    def forward(self, cond, tokens: torch.Tensor, hidden: bool = False):
        """Teacher-forced training forward without cache. cond: class ids [B] or Captions; tokens [B, N] (all grid
        tokens). Returns logits [B, N, V] where row k predicts token k (``hidden``: and the last hidden states
        [B, N, dim] before the final norm, row k at cell k - 1)."""
        c = self.config
        if self.cache_batch:
            raise RuntimeError("forward() is the cache-free training pass; call clear_cache() first")
        try:
            h = torch.cat([self.embed_condition(cond), self.tok_embeddings(tokens[:, :-1])], dim=1)
            h = self.tok_dropout(h)
            pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
            out = self._run(h, pos, None, hidden=hidden)
            if hidden:
                return out[0][:, c.cls_token_num - 1 :], out[1][:, c.cls_token_num - 1 :]
            return out[:, c.cls_token_num - 1 :]
        finally:
            self._cond_valid = None

    def prefill(self, cond, hidden: bool = False):
        """Write the condition positions (class ids [B] or Captions) to the cache; return the logits [B, V] for
        image token 0 (``hidden``: and the last condition position's hidden state [B, dim] before the final norm)."""
        self.check_condition(cond)
        if not self.cache_batch:
            raise RuntimeError("prefill() needs setup_cache() first")
        h = self.embed_condition(cond)
        pos = torch.arange(self.config.cls_token_num, device=h.device)[None].expand(h.shape[0], -1)
        if hidden:
            logits, h = self._run(h, pos, None, hidden=True)
            return logits[:, -1], h[:, -1]
        return self._run(h, pos, None)[:, -1]

    def decode(self, tokens: torch.Tensor, cells: torch.Tensor, mask: torch.Tensor | None = None,
               slots: torch.Tensor | None = None, hidden: bool = False):
        """Feed image tokens [B, T] at grid cells [B, T] (raster indices, per sample; any order, any cells).

        Writes them into the cache at absolute positions ``cls_token_num + cells`` and returns logits [B, T, V];
        row t is the distribution of the token at cell ``cells[:, t] + 1`` given every cache slot at or before
        its own position. ``mask`` [B, T, S] (True = attend) replaces the default causal-by-position mask.

        ``slots`` [B, T] (cell indices, typically past the grid) stores the keys and values somewhere other than
        the cells' own slots while the rotary angles stay those of ``cells``: several candidates for one cell (the
        nodes of a draft tree) then coexist, and :meth:`copy_cache` moves the accepted ones home. It needs
        ``mask``. ``hidden``: return (logits, last hidden states [B, T, dim] before the final norm).
        """
        if not self.cache_batch:
            raise RuntimeError("decode() needs setup_cache() first")
        if tokens.shape[0] != self.cache_batch:
            raise RuntimeError(f"batch {tokens.shape[0]} does not match the cache batch {self.cache_batch}")
        T0 = self.config.cls_token_num
        return self._run(self.tok_embeddings(tokens), cells + T0, mask, None if slots is None else slots + T0, hidden)

    def copy_cache(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the cached keys and values of cell slots ``src`` [B, n] to cell slots ``dst`` [B, n] in every layer
        (per row; the rotary angles travel with the keys, so a key computed for cell c belongs at slot c)."""
        T0 = self.config.cls_token_num
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k[rows, dst + T0] = cache.k[rows, src + T0]
            cache.v[rows, dst + T0] = cache.v[rows, src + T0]
