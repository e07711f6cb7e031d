"""Fréchet distances between feature sets (FID) and the reference statistics they are measured against."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mulosd.io import atomic_write


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] features -> (mean [D], covariance [D, D]) in float64 (unbiased covariance, N >= 2)."""
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)). The trace of the matrix square root is the sum of the
    square roots of the eigenvalues of C1^(1/2) C2 C1^(1/2) (symmetric PSD, so ``eigh`` is stable)."""
    vals, vecs = torch.linalg.eigh(cov1)
    root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ cov2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def fid_from_features(features: torch.Tensor, ref_mu: torch.Tensor, ref_cov: torch.Tensor) -> float:
    mu, cov = feature_stats(features)
    return frechet_distance(mu, cov, ref_mu, ref_cov)


def cached_reference(path: str | Path, compute) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (mean, covariance) from ``path`` (safetensors), computing and writing it atomically if absent."""
    path = Path(path)
    if path.exists():
        data = load_file(str(path))
        return data["mu"], data["cov"]
    mu, cov = feature_stats(compute())
    atomic_write(path, lambda tmp: save_file({"mu": mu.contiguous(), "cov": cov.contiguous()}, tmp))
    return mu, cov
