"""A class-conditional AR transformer over **continuous** tokens with a small diffusion head (MAR's recipe, raster
order): the foundation's GPT (:mod:`mulosd.models.gpt`: same blocks, 2-D rotary positions, position-indexed KV
cache, null class for guidance) with a linear input projection instead of the code embedding and, instead of
logits, its normalised hidden state z per position, which conditions a :class:`DiffusionHead` that samples the
next token.

As in the discrete GPT, the output at position ``cls_token_num + k`` (token k fed there) conditions token k + 1,
and the last condition position conditions token 0. Training: the diffusion loss of every token given its z,
each token noised ``head_batch_mul`` times per step (MAR's diffusion batch multiplier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mulosd.errors import MulosdError
from mulosd.models.diffusion import DiffusionHead, DiffusionHeadConfig
from mulosd.models.gpt import GPT, GPTConfig


@dataclass
class ContinuousGPTConfig(GPTConfig):
    vocab_size: int = 0  # unused: tokens are continuous
    token_dim: int = 4
    head_width: int = 256
    head_depth: int = 3
    diffusion_steps: int = 1000  # training timesteps of the head
    sample_steps: int = 25  # reverse steps when sampling
    vlb_weight: float = 0.001
    clip_x0: float = 5.0
    variance: str = "learned"  # the head's per-step std when sampling: learned, fixed_small, fixed_large
    head_batch_mul: int = 4
    tokenizer_id: str = ""  # fingerprint of the continuous tokenizer it was trained on

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.head_batch_mul, int) or self.head_batch_mul < 1:
            raise MulosdError(f"head_batch_mul must be an integer >= 1, got {self.head_batch_mul!r}")
        self.head_config()  # validates the head's fields

    def head_config(self) -> DiffusionHeadConfig:
        return DiffusionHeadConfig(token_dim=self.token_dim, cond_dim=self.dim, width=self.head_width,
                                   depth=self.head_depth, train_steps=self.diffusion_steps,
                                   sample_steps=self.sample_steps, vlb_weight=self.vlb_weight, clip_x0=self.clip_x0,
                                   variance=self.variance)


class ContinuousGPT(GPT):
    config_class = ContinuousGPTConfig
    kind = "continuous_gpt"

    def __init__(self, config: ContinuousGPTConfig):
        super().__init__(config)
        self.head = DiffusionHead(config.head_config())

    @staticmethod
    def _input_layer(config) -> nn.Module:
        return nn.Linear(config.token_dim, config.dim, bias=False)

    @staticmethod
    def _output_layer(config) -> nn.Module:
        return nn.Identity()  # the normalised hidden state z conditions the diffusion head

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[-1] != self.config.token_dim:
            raise MulosdError(f"continuous tokens must be [B, T, {self.config.token_dim}], got {tuple(tokens.shape)}")

    def forward(self, class_labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass: tokens [B, N, d] -> z [B, N, dim], row k conditioning token k."""
        self._check_tokens(tokens)
        return super().forward(class_labels, tokens.to(self.tok_embeddings.weight.dtype))

    def decode(self, tokens: torch.Tensor, cells: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens [B, T, d] at grid cells [B, T]; returns z [B, T, dim] (row t conditions cell cells[:, t] + 1)."""
        self._check_tokens(tokens)  # tokens are float32; a bfloat16 trunk reads them in its own dtype
        return super().decode(tokens.to(self.tok_embeddings.weight.dtype), cells, mask)

    def head_loss(self, tokens: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The diffusion loss of tokens [B, N, d] given their conditions z [B, N, dim] (from :meth:`forward`)."""
        m = self.config.head_batch_mul
        d = self.config.token_dim
        x0 = tokens.reshape(-1, d).repeat(m, 1)
        return self.head.loss(x0.float(), z.reshape(-1, z.shape[-1]).float().repeat(m, 1))
