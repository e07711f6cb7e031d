"""Token up- and down-samplers between grids r times apart (MuLo-SD's U_r and D_r).

``PixelResampler`` is the training-free path, for any ratio r > 1 (2 for 16 -> 32 tokens per side, 1.5 for
16 -> 24): decode tokens with the VQ decoder, resize the pixels (bicubic, bilinear or Lanczos up; exact area average
down), re-encode with the same tokenizer. :func:`covered_rows` is the one row mapping between two such grids.

``LatentResampler`` is the learned path, tied to one tokenizer and one r: a row-causal masked convolution trunk on
the low-resolution code grid followed by pixel-shuffle gives a distribution over high-resolution codes for every
cell (``up_logits``); a strided row-causal trunk maps committed high-resolution codes back to low-resolution codes
(``down``). "Row-causal" means an output row never sees a later input row, so a low-resolution row can be
up-sampled as soon as it is drafted, with only the rows above it as extra context.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from mulosd.errors import MulosdError
from mulosd.io import Pretrained
from mulosd.models.vq import VQModel

MODES = ("bicubic", "bilinear", "lanczos")


def covered_rows(done: int, src: int, dst: int) -> int:
    """MuLo-SD's row mapping between two grids over the same image, ``src`` and ``dst`` rows tall: how many rows of
    the ``dst`` grid, from the top, lie entirely within the first ``done`` rows of the ``src`` grid. Row j of a grid
    n rows tall covers the band [j / n, (j + 1) / n) of the image height, so the answer is floor(done * dst / src).

    Up-sampling (``src`` = the low-res grid h, ``dst`` = the high-res grid H): the high-res rows whose candidates
    exist once ``done`` low-res rows are drafted, since a high-res row depends on every low-res row it overlaps.
    At r = 1.5 (4 -> 6 rows) low-res row 0 covers high-res rows [0, 1.5), so drafting rows 0, 1, 2, 3 one at a time
    releases high-res rows {0}, {1, 2}, {3}, {4, 5}. Down-sampling (``src`` = H, ``dst`` = h): the low-res rows that
    ``done`` committed high-res rows determine, the ones the drafter can be re-synchronised with (6 -> 4: 1, 3, 4
    committed rows determine 0, 2, 2 low-res rows). At an integer r it is done * r up and done // r down.

    Only the overlap counts, not how far a kernel reaches past it. The learned up-sampler is row-causal (a
    high-res row sees the low-res rows it overlaps and those above), and the area average of the pixel path's
    down-sampler reaches exactly the overlap. The pixel up-sampler's resize kernel (and the VQ convolutions around
    it) do reach a little further down; it is given the partial image with its bottom edge extended by replication,
    the approximation it has always made at integer r, because waiting for the kernel's reach would hold every
    block back by a low-res row."""
    return done * dst // src


def whole_size(n: int, factor: float) -> int | None:
    """n * factor when that is a whole number (up to float rounding: 16 / 1.6 is 10), else None."""
    size = round(n * factor)
    return size if abs(n * factor - size) < 1e-6 else None


def resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Up-sample [B, C, h, w] in [-1, 1] to [B, C, *size], clamped to [-1, 1]."""
    if mode == "lanczos":
        out = np.stack([
            np.stack([np.asarray(Image.fromarray(ch.numpy().astype(np.float32), mode="F").resize(size[::-1], Image.LANCZOS))
                      for ch in img])
            for img in images.float().cpu()  # Pillow's Lanczos runs on the host
        ])
        return torch.from_numpy(out).clamp(-1, 1).to(images.device, images.dtype)
    return F.interpolate(images, size=size, mode=mode, align_corners=False).clamp(-1, 1)


def area_average(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Down-sample [B, C, P, Q] to [B, C, *size]: every output pixel is the exact mean of the image area it covers,
    an input pixel cut by a cell boundary counting by the share inside.

    Why not ``F.interpolate``: its ``area`` mode is adaptive average pooling, which at a non-integer factor rounds
    each window outward to whole pixels (48 -> 32 px averages pixels 0-1, 1-2, 3-4, ... with equal weights, the
    centres up to a quarter pixel off), and antialiased bilinear is a triangle filter twice a cell wide that blends
    the neighbouring cells in. Exact area weights generalise what average pooling computes at an integer factor; that
    case still runs ``avg_pool2d`` itself, so its tokens stay bit-identical."""
    P, Q = images.shape[-2:]
    if P % size[0] == 0 and Q % size[1] == 0 and P // size[0] == Q // size[1]:
        return F.avg_pool2d(images, P // size[0])
    rows, cols = area_weights(P, size[0], images), area_weights(Q, size[1], images)
    return torch.einsum("ip,bcpq,jq->bcij", rows, images, cols)


def area_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """[n_out, n_in] weights of :func:`area_average` along one axis (on ``like``'s device, in its dtype): output
    pixel i spans [i * s, (i + 1) * s) of the input, s = n_in / n_out, and input pixel j weighs the length of its
    overlap with that span over s."""
    edges = torch.arange(n_out + 1, dtype=torch.float64) * n_in / n_out
    j = torch.arange(n_in, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)).clamp_min(0)
    return (overlap * n_out / n_in).to(like.device, like.dtype)


class PixelResampler:
    """Training-free U_r / D_r for any ratio r > 1 between a low-res grid and the high-res grid over the same image
    (r = H / h: 2 for 16 -> 32 tokens per side, 1.5 for 16 -> 24). The grids come from the tokens given: ``up``
    maps a grid w tokens wide to one w * r wide, ``down`` one W wide to W / r; each must be a whole number. An
    integer r gives the same tokens as the integer-only resampler before it."""

    def __init__(self, tokenizer: VQModel, r: float, mode: str = "bicubic"):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 1 < r < math.inf:
            raise MulosdError(f"up-sampling factor r must be a number > 1 (the high-res grid over the low-res one), "
                              f"got {r!r}")
        if mode not in MODES:
            raise MulosdError(f"resize mode {mode!r} unknown; allowed: {', '.join(MODES)}")
        self.tokenizer, self.r, self.mode = tokenizer, r, mode

    def check(self, tokenizer: VQModel, r: float) -> None:
        pass  # built from the pipeline's own tokenizer: nothing can mismatch

    @torch.inference_mode()
    def up(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, w] low-res tokens, the top L rows of a grid w wide (or all of it) -> the high-res rows they cover,
        [B, covered_rows(L, w, W), W] with W = w * r. The decoded pixels are resized with the full image's
        geometry (one scale, W / w, on both axes) to exactly the high-res pixel size; a partial image is first
        extended at its bottom edge by replication (what PyTorch's bicubic and bilinear kernels do at an edge
        anyway) to a whole number of w / gcd(w, W)-row groups, the smallest band that maps to whole high-res pixel
        rows. At an integer r no extension is needed."""
        L, w = tokens.shape[-2:]
        W = whole_size(w, self.r)
        if W is None:
            raise MulosdError(f"r={self.r:g} maps a {w}-token-wide grid to {w * self.r:g} tokens; allowed: grids "
                              f"whose width times r is whole")
        images = self.tokenizer.decode(tokens)
        f = images.shape[-1] // w  # pixels per token
        group = w // math.gcd(w, W)
        whole = -(-L // group) * group
        if whole > L:
            images = F.pad(images, (0, 0, 0, (whole - L) * f), mode="replicate")
        hi = resize(images, (whole * W // w * f, W * f), self.mode)
        return self.tokenizer.encode(hi[..., : covered_rows(L, w, W) * f, :])

    @torch.inference_mode()
    def down(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, H, W] high-res tokens -> [B, H / r, W / r]: the decoded pixels area-averaged (:func:`area_average`)
        to exactly the low-res pixel size, re-encoded."""
        H, W = tokens.shape[-2:]
        h, w = whole_size(H, 1 / self.r), whole_size(W, 1 / self.r)
        if h is None or w is None:
            raise MulosdError(f"a {H}x{W} grid cannot be down-sampled by r={self.r:g} (it must give a whole number "
                              f"of tokens per side: {H} / {self.r:g} = {H / self.r:g})")
        images = self.tokenizer.decode(tokens)
        f = images.shape[-1] // W
        return self.tokenizer.encode(area_average(images, (h * f, w * f)))


def tokenizer_fingerprint(tokenizer: VQModel) -> str:
    """A short hash of the tokenizer's codebook (rounded to fp16, so fp32 training weights and the shipped fp16
    copy agree). A learned resampler records it and refuses any other tokenizer."""
    data = tokenizer.embedding.weight.detach().to(torch.float16).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class LatentResamplerConfig:
    r: int = 2
    vocab_size: int = 512
    dim: int = 64  # trunk width
    n_blocks: int = 4  # row-causal residual blocks in each trunk
    hi_dim: int = 32  # channels per high-resolution cell after pixel-shuffle
    tokenizer_id: str = ""  # tokenizer_fingerprint() of the tokenizer whose codes it maps


class RowCausalConv(nn.Module):
    """3x3 convolution whose output row i sees input rows i-1 and i only (a 2x3 kernel, padded above)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, (2, 3))

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 0)))


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each cell: unlike GroupNorm it mixes no statistics across rows, so the
    trunk stays row-causal and a partial grid gives the same outputs as the full one."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RowCausalBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.conv1 = ChannelNorm(dim), RowCausalConv(dim, dim)
        self.norm2, self.conv2 = ChannelNorm(dim), RowCausalConv(dim, dim)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class LatentResampler(Pretrained, nn.Module):
    """Learned U_r / D_r in code space. ``up_logits`` [B, h, w] low-res codes -> [B, V, h*r, w*r] logits;
    ``down`` [B, H, W] high-res codes -> [B, H/r, W/r] codes. Both are row-causal: output rows for low-res row i
    depend on low-res rows <= i only (up) or on high-res rows < r * (i + 1) only (down)."""

    config_class = LatentResamplerConfig
    kind = "latent_resampler"

    def __init__(self, config: LatentResamplerConfig):
        super().__init__()
        self.config = config
        c, r = config, config.r
        self.embed_lo = nn.Embedding(c.vocab_size, c.dim)
        self.up_trunk = nn.Sequential(*[RowCausalBlock(c.dim) for _ in range(c.n_blocks)])
        self.up_proj = nn.Conv2d(c.dim, c.hi_dim * r * r, 1)
        self.up_head = nn.Sequential(nn.Conv2d(c.hi_dim, 2 * c.hi_dim, 1), nn.SiLU(), nn.Conv2d(2 * c.hi_dim, c.vocab_size, 1))
        self.embed_hi = nn.Embedding(c.vocab_size, c.dim)
        self.down_in = nn.Conv2d(c.dim, c.dim, r, stride=r)  # one low-res cell from its own r x r block only
        self.down_trunk = nn.Sequential(*[RowCausalBlock(c.dim) for _ in range(max(1, c.n_blocks // 2))])
        self.down_head = nn.Conv2d(c.dim, c.vocab_size, 1)

    @property
    def r(self) -> int:
        return self.config.r

    def check(self, tokenizer: VQModel, r: int) -> None:
        """Refuse a resampler trained for another factor or another tokenizer."""
        if self.config.r != r:
            raise MulosdError(f"the learned up-sampler was trained for r={self.config.r}; this run needs r={r}")
        fp = tokenizer_fingerprint(tokenizer)
        if self.config.tokenizer_id != fp:
            raise MulosdError(
                f"the learned up-sampler was trained for tokenizer {self.config.tokenizer_id or '(unrecorded)'}; "
                f"the pipeline's tokenizer is {fp} (train one with `mulosd train upsampler --tokenizer ...`)")

    def up_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.up_trunk(self.embed_lo(tokens).permute(0, 3, 1, 2))
        return self.up_head(F.pixel_shuffle(self.up_proj(h), self.config.r))

    def down_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.down_in(self.embed_hi(tokens).permute(0, 3, 1, 2))
        return self.down_head(self.down_trunk(h))

    @torch.inference_mode()
    def up(self, tokens: torch.Tensor) -> torch.Tensor:
        """Most likely high-res codes [B, h*r, w*r]."""
        return self.up_logits(tokens).argmax(1)

    @torch.inference_mode()
    def down(self, tokens: torch.Tensor) -> torch.Tensor:
        H, W = tokens.shape[-2:]
        if H % self.r or W % self.r:
            raise MulosdError(f"a {H}x{W} grid cannot be down-sampled by r={self.r}")
        return self.down_logits(tokens).argmax(1)
