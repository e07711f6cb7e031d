"""Grid geometry for local rejection (MuLo-SD): neighbourhoods of rejected cells and rejection islands.

Pure batched tensor functions on boolean grids [B, H, W] (raster order: cell t = row * W + col).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool -> [B] raster index of the first True cell (H * W where there is none)."""
    flat = mask.flatten(1)
    n = flat.shape[1]
    idx = torch.where(flat, torch.arange(n, device=mask.device), torch.full_like(flat, n, dtype=torch.long))
    return idx.min(dim=1).values


def resample_region(rejected: torch.Tensor, radius: int | None) -> torch.Tensor:
    """The cells to regenerate: every rejected cell expanded to its (2l+1) x (2l+1) window (clipped to the grid),
    restricted to cells at or after the sample's first rejection in raster order. ``radius=None`` means l = infinity:
    every cell from the first rejection on (raster-scan rejection); ``radius=0`` is the rejected cells alone."""
    if radius is not None and radius < 0:
        raise ValueError(f"radius must be >= 0 or None (infinity), got {radius}")
    B, H, W = rejected.shape
    first = first_true(rejected)
    after = torch.arange(H * W, device=rejected.device)[None] >= first[:, None]
    if radius is None:
        region = after
    else:
        k = 2 * radius + 1
        grown = F.max_pool2d(rejected[:, None].float(), k, stride=1, padding=radius)[:, 0] > 0
        region = grown.flatten(1) & after
    return region.view(B, H, W)


def label_islands(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of each grid: [B, H, W] bool -> [B, H, W] long labels, 0 for background and
    1..n per sample in raster order of each island's first cell. Iterative min-label propagation with 3x3
    pooling (a tensor op per iteration, at most H * W iterations, usually a few)."""
    B, H, W = mask.shape
    big = H * W + 1
    ids = torch.arange(1, H * W + 1, device=mask.device, dtype=torch.float32).view(1, H, W).expand(B, H, W)
    labels = torch.where(mask, ids, torch.full_like(ids, big))
    while True:
        pooled = -F.max_pool2d(-labels[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(mask, torch.minimum(labels, pooled), labels)
        if torch.equal(new, labels):
            break
        labels = new
    labels = torch.where(mask, labels, torch.zeros_like(labels)).long()
    # renumber each sample's roots 1..n in raster order (a root label is the raster id + 1 of its first cell)
    flat = labels.flatten(1)
    is_root = flat == torch.arange(1, H * W + 1, device=mask.device)[None]
    rank = is_root.long().cumsum(1)
    out = torch.zeros_like(flat)
    nz = flat > 0
    out[nz] = rank.gather(1, (flat - 1).clamp_min(0))[nz]
    return out.view(B, H, W)
