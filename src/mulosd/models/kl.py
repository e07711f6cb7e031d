"""A small KL-regularised convolutional autoencoder: the continuous tokenizer for continuous-token AR models.

Down-sampling factor 2 ** (len(channel_mult) - 1): a 32x32 image becomes a 16x16 (factor 2) or 8x8 (factor 4) grid
of ``token_dim``-dimensional latents (the same conv
trunk as the VQ tokenizer, :mod:`mulosd.models.vq`, without the quantiser). The encoder outputs a diagonal
Gaussian posterior per cell; training minimises reconstruction MSE plus ``kl_weight`` times its KL divergence to
N(0, I) (as the LDM/MAR "KL-16" tokenizers, small). Tokens are the posterior means, **standardised** per channel
with the training set's statistics (the ``latent_mean`` / ``latent_std`` buffers, stored with the weights), so
the AR model and its diffusion head see roughly unit-variance inputs. ``encode`` returns raster-ordered tokens
[B, N, d]; ``decode`` takes them back to images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mulosd.errors import MulosdError
from mulosd.io import Pretrained, weights_fingerprint
from mulosd.models.vq import Decoder, Encoder


@dataclass
class KLConfig:
    in_channels: int = 1
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    z_channels: int = 32  # trunk channels at the latent resolution
    token_dim: int = 4  # channels of a continuous token
    kl_weight: float = 1e-4

    def __post_init__(self):
        if not isinstance(self.token_dim, int) or self.token_dim < 1:
            raise MulosdError(f"KLConfig.token_dim must be an integer >= 1, got {self.token_dim!r}")
        if not self.kl_weight >= 0:
            raise MulosdError(f"KLConfig.kl_weight must be >= 0, got {self.kl_weight}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class KLAutoencoder(Pretrained, nn.Module):
    """Encoder -> diagonal Gaussian posterior -> decoder. Images are [B, C, H, W] in [-1, 1]."""

    config_class = KLConfig
    kind = "kl_autoencoder"

    def __init__(self, config: KLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.moments = nn.Conv2d(config.z_channels, 2 * config.token_dim, 1)  # posterior mean and log-variance
        self.post = nn.Conv2d(config.token_dim, config.z_channels, 1)
        self.decoder = Decoder(config)
        self.register_buffer("latent_mean", torch.zeros(config.token_dim))
        self.register_buffer("latent_std", torch.ones(config.token_dim))

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (mean, logvar) [B, d, h, w] of the unstandardised latent."""
        mean, logvar = self.moments(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post(z))

    # ---- tokens: standardised posterior means in raster order --------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> tokens [B, (H/f)*(W/f), d]."""
        mean, _ = self.posterior(images)
        return ((mean.flatten(2).transpose(1, 2) - self.latent_mean) / self.latent_std).contiguous()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, d] (N a square) or [B, g, g, d] -> images [B, C, g*f, g*f] in [-1, 1] (clamped)."""
        d = self.config.token_dim
        if tokens.shape[-1] != d:
            raise MulosdError(f"tokens have {tokens.shape[-1]} channels; this tokenizer's tokens have {d}")
        tokens = tokens.reshape(len(tokens), -1, d)
        g = int(round(tokens.shape[1] ** 0.5))
        if g * g != tokens.shape[1]:
            raise MulosdError(f"{tokens.shape[1]} tokens do not form a square grid")
        z = (tokens * self.latent_std + self.latent_mean).transpose(1, 2).reshape(len(tokens), d, g, g)
        return self.decode_latent(z).clamp(-1, 1)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Training forward: (reconstruction from a posterior sample, KL per latent element, posterior mean)."""
        mean, logvar = self.posterior(images)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)  # drawn on the generator's CPU
        z = mean + (0.5 * logvar).exp() * eps
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return self.decode_latent(z), kl, mean

    @torch.no_grad()
    def set_latent_statistics(self, images: torch.Tensor, batch: int = 500) -> None:
        """Per-channel mean and std of the posterior means over ``images``; tokens are standardised with them."""
        means = torch.cat([self.posterior(images[i : i + batch])[0] for i in range(0, len(images), batch)])
        flat = means.transpose(0, 1).reshape(self.config.token_dim, -1)
        self.latent_mean.copy_(flat.mean(1))
        self.latent_std.copy_(flat.std(1).clamp_min(1e-6))

    def fingerprint(self) -> str:
        """A short hash of the latent head and statistics (rounded to fp16, so the fp32 training weights and the
        shipped fp16 copy agree): continuous AR models record the tokenizer they were trained on."""
        return weights_fingerprint(self.moments.weight, self.moments.bias, self.latent_mean, self.latent_std)


def check_tokenizer(tokenizer: KLAutoencoder, token_dim: int, fingerprint: str, role: str) -> None:
    """Raise unless ``tokenizer`` is the one a continuous model was trained on (same dimension and weights)."""
    if tokenizer.config.token_dim != token_dim:
        raise MulosdError(f"{role} works on {token_dim}-dimensional tokens; the tokenizer's are {tokenizer.config.token_dim}")
    if fingerprint and tokenizer.fingerprint() != fingerprint:
        raise MulosdError(f"{role} was trained on another continuous tokenizer (fingerprint {fingerprint}, "
                          f"this one {tokenizer.fingerprint()})")
