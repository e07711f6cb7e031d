"""Token up- and down-samplers between grids r times apart (MuLo-SD's U_r and D_r).

``PixelResampler`` is the training-free path: decode tokens with the VQ decoder, resize the pixels (bicubic,
bilinear or Lanczos up; area average down), re-encode with the same tokenizer. The learned latent up-sampler is
separate work.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mulosd.errors import MulosdError
from mulosd.models.vq import VQModel

MODES = ("bicubic", "bilinear", "lanczos")


def resize_up(images: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """[B, C, h, w] in [-1, 1] -> [B, C, h*factor, w*factor], clamped to [-1, 1]."""
    size = (images.shape[-2] * factor, images.shape[-1] * factor)
    if mode == "lanczos":
        out = np.stack([
            np.stack([np.asarray(Image.fromarray(ch.numpy().astype(np.float32), mode="F").resize(size[::-1], Image.LANCZOS))
                      for ch in img])
            for img in images.float()
        ])
        return torch.from_numpy(out).clamp(-1, 1).to(images.dtype)
    return F.interpolate(images, size=size, mode=mode, align_corners=False).clamp(-1, 1)


class PixelResampler:
    def __init__(self, tokenizer: VQModel, r: int, mode: str = "bicubic"):
        if not isinstance(r, int) or isinstance(r, bool) or r < 2:
            raise MulosdError(f"up-sampling factor r must be an integer >= 2, got {r!r}")
        if mode not in MODES:
            raise MulosdError(f"resize mode {mode!r} unknown; allowed: {', '.join(MODES)}")
        self.tokenizer, self.r, self.mode = tokenizer, r, mode

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
