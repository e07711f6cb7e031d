"""A small convolutional VQ autoencoder in the LlamaGen style (L2-normalised, cosine codebook).

Down-sampling factor 2: 32x32 px -> 16x16 tokens. The network is fully convolutional, so the same weights
tokenise 16x16 px -> 8x8 and 8x8 px -> 4x4 (the low-resolution drafters' grids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mulosd.io import Pretrained


@dataclass
class VQConfig:
    in_channels: int = 1
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    z_channels: int = 64
    codebook_size: int = 512
    codebook_dim: int = 8
    commit_beta: float = 0.25

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        blocks, cin = [], chs[0]
        for i, ch in enumerate(chs):
            blocks.append(ResBlock(cin, ch))
            cin = ch
            if i < len(chs) - 1:
                blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)
        self.mid = ResBlock(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.mid(self.blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.channels * m for m in reversed(cfg.channel_mult)]
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[0], 3, padding=1)
        self.mid = ResBlock(chs[0], chs[0])
        blocks, cin = [], chs[0]
        for i, ch in enumerate(chs):
            blocks.append(ResBlock(cin, ch))
            cin = ch
            if i < len(chs) - 1:
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.blocks(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQTokenizer:
    """What every VQ tokenizer (mulosd's :class:`VQModel`, LlamaGen's ``LlamaGenVQ``) does with its parts: a
    subclass provides ``encoder``, ``quant_conv``, ``post_quant_conv``, ``decoder``, ``embedding`` (the raw
    codebook), ``encode_latent`` (images -> normalised latents), ``quantize`` (latents -> tokens) and ``lookup``
    (tokens -> normalised code vectors); the rest, the interface the pipeline and the up-samplers use, is here."""

    @property
    def codebook(self) -> torch.Tensor:
        """The L2-normalised codebook [V, D]: the geometry used for quantisation and for neighbour pooling."""
        return F.normalize(self.embedding.weight, dim=-1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> tokens [B, H/f, W/f] (int64)."""
        return self.quantize(self.encode_latent(images))

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq))

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """A subclass may refuse token tensors it cannot decode (default: anything goes)."""

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] -> images [B, C, h*f, w*f] in [-1, 1] (clamped)."""
        self.check_tokens(tokens)
        return self.decode_latent(self.lookup(tokens)).clamp(-1, 1)

    def forward(self, images: torch.Tensor):
        """Training forward: returns (reconstruction, vq_loss, tokens, latents): the codebook loss plus
        ``commit_beta`` x the commitment loss, with straight-through gradients."""
        z = self.encode_latent(images)
        tokens = self.quantize(z)
        zq = self.lookup(tokens)
        codebook_loss = F.mse_loss(zq, z.detach())
        commit_loss = F.mse_loss(z, zq.detach())
        zq_st = z + (zq - z).detach()
        return self.decode_latent(zq_st), codebook_loss + self.config.commit_beta * commit_loss, tokens, z


class VQModel(VQTokenizer, Pretrained, nn.Module):
    """Encoder -> cosine vector quantiser -> decoder. Images are [B, C, H, W] in [-1, 1]."""

    config_class = VQConfig
    kind = "vq"

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)
        nn.init.normal_(self.embedding.weight)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.quant_conv(self.encoder(images)), dim=1)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry by cosine similarity for each latent in z [B, D, h, w] -> tokens [B, h, w]."""
        sim = torch.einsum("bdhw,vd->bvhw", z, self.codebook)
        return sim.argmax(dim=1)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] -> normalised code vectors [B, D, h, w]."""
        return self.codebook[tokens].permute(0, 3, 1, 2)
