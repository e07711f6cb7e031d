"""Token up- and down-samplers between grids r times apart (MuLo-SD's U_r and D_r).

``PixelResampler`` is the training-free path: decode tokens with the VQ decoder, resize the pixels (bicubic,
bilinear or Lanczos up; area average down), re-encode with the same tokenizer.

``LatentResampler`` is the learned path, tied to one tokenizer and one r: a row-causal masked convolution trunk on
the low-resolution code grid followed by pixel-shuffle gives a distribution over high-resolution codes for every
cell (``up_logits``); a strided row-causal trunk maps committed high-resolution codes back to low-resolution codes
(``down``). "Row-causal" means an output row never sees a later input row, so a low-resolution row can be
up-sampled as soon as it is drafted, with only the rows above it as extra context.
"""

from __future__ import annotations

import hashlib
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


def resize_up(images: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """[B, C, h, w] in [-1, 1] -> [B, C, h*factor, w*factor], clamped to [-1, 1]."""
    size = (images.shape[-2] * factor, images.shape[-1] * factor)
    if mode == "lanczos":
        out = np.stack([
            np.stack([np.asarray(Image.fromarray(ch.numpy().astype(np.float32), mode="F").resize(size[::-1], Image.LANCZOS))
                      for ch in img])
            for img in images.float().cpu()  # Pillow's Lanczos runs on the host
        ])
        return torch.from_numpy(out).clamp(-1, 1).to(images.device, images.dtype)
    return F.interpolate(images, size=size, mode=mode, align_corners=False).clamp(-1, 1)


class PixelResampler:
    def __init__(self, tokenizer: VQModel, r: int, mode: str = "bicubic"):
        if not isinstance(r, int) or isinstance(r, bool) or r < 2:
            raise MulosdError(f"up-sampling factor r must be an integer >= 2, got {r!r}")
        if mode not in MODES:
            raise MulosdError(f"resize mode {mode!r} unknown; allowed: {', '.join(MODES)}")
        self.tokenizer, self.r, self.mode = tokenizer, r, mode

    def check(self, tokenizer: VQModel, r: int) -> None:
        pass  # built from the pipeline's own tokenizer: nothing can mismatch

    @torch.inference_mode()
    def up(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h, w] low-resolution tokens -> [B, h*r, w*r] high-resolution tokens."""
        return self.tokenizer.encode(resize_up(self.tokenizer.decode(tokens), self.r, self.mode))

    @torch.inference_mode()
    def down(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, H, W] high-resolution tokens -> [B, H/r, W/r] (area-averaged pixels, re-encoded)."""
        H, W = tokens.shape[-2:]
        if H % self.r or W % self.r:
            raise MulosdError(f"a {H}x{W} grid cannot be down-sampled by r={self.r}")
        return self.tokenizer.encode(F.avg_pool2d(self.tokenizer.decode(tokens), self.r))


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
