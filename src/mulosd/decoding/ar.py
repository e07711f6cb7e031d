"""Plain autoregressive decoding: the baseline every speculative method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mulosd.decoding.sampling import RandomStreams, SamplingConfig, sample_logits
from mulosd.models.gpt import GPT


@dataclass
class DecodeStats:
    """Work counters for one decode call over a batch.

    ``target_forwards`` / ``drafter_forwards`` count batched forward passes. ``active_forwards`` sums, over the
    samples, the target passes each sample took part in while still unfinished (samples advance independently,
    so one may finish before its batch-mates); tokens committed per active forward is the mean accepted length.
    """

    target_forwards: int = 0
    drafter_forwards: int = 0
    active_forwards: int = 0
    tokens: int = 0  # tokens committed over the batch
    accepted: int = 0
    drafted: int = 0


def cfg_labels(model: GPT, labels: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The model batch for ``labels``: [cond ; null] when guidance is on, else the labels themselves."""
    if cfg.uses_cfg:
        return torch.cat([labels, torch.full_like(labels, model.null_class)])
    return labels


def double(x: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Repeat image-batch inputs for the [cond ; uncond] halves."""
    return torch.cat([x, x]) if cfg.uses_cfg else x


@torch.inference_mode()
def generate_ar(model: GPT, labels: torch.Tensor, cfg: SamplingConfig, streams: RandomStreams) -> tuple[torch.Tensor, DecodeStats]:
    """Sample a grid of tokens per label, one target forward per token. Returns (tokens [B, N], stats)."""
    B, N = len(labels), model.config.num_tokens
    model.setup_cache(B * (2 if cfg.uses_cfg else 1))
    try:
        tokens = torch.empty(B, N, dtype=torch.long)
        logits = model.prefill(cfg_labels(model, labels, cfg))
        for k in range(N):
            tokens[:, k], _ = sample_logits(logits, cfg, streams.uniform())
            if k + 1 < N:
                cells = torch.full((logits.shape[0], 1), k, dtype=torch.long)
                logits = model.decode(double(tokens[:, k : k + 1], cfg), cells)[:, 0]
    finally:
        model.clear_cache()
    return tokens, DecodeStats(target_forwards=N, active_forwards=B * N, tokens=B * N)
