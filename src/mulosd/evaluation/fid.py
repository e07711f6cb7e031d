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


def _polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KID's kernel k(a, b) = (a.b / D + 1)^3 between every row of ``a`` and every row of ``b``."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _kid_inputs(x: torch.Tensor, y: torch.Tensor, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets in float64, divided by ``y``'s RMS feature value when ``normalise``; at least 2 rows each."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(x)} and {len(y)}")
    x, y = x.double(), y.double()
    if normalise:
        scale = y.pow(2).mean().sqrt().clamp_min(1e-12)
        x, y = x / scale, y / scale
    return x, y


def kernel_distance(features: torch.Tensor, ref: torch.Tensor, normalise: bool = False) -> float:
    """KID: the unbiased estimate of the squared MMD between two feature sets with the cubic polynomial kernel
    k(x, y) = (x.y / D + 1)^3 (Binkowski et al., 2018). Unlike FID it has no bias that grows as N shrinks, so it
    compares methods fairly at small N; it can be slightly negative when the sets are alike.

    ``normalise`` divides both sets by the reference's RMS feature value first, so x.y / D is about 1 for any
    feature space (the kernel was designed for Inception's pool features; without it a feature space with larger
    activations, like the classifier's, puts KID on an arbitrary scale). Inception KID stays unnormalised."""
    x, y = _kid_inputs(features, ref, normalise)
    m, n = len(x), len(y)
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid_permutation_test(features: torch.Tensor, other: torch.Tensor, strata: torch.Tensor | None = None,
                         num_permutations: int = 1000, seed: int = 0, normalise: bool = False) -> tuple[float, float]:
    """Is ``features`` drawn from the same distribution as ``other``? Returns (KID between the two sets, p-value).

    The statistic is KID (the unbiased squared MMD with the cubic polynomial kernel, as in ``kernel_distance``); its
    null distribution comes from re-splitting the pooled sets at random, ``num_permutations`` times, on one kernel
    matrix (so the test costs a few matrix products, not one KID per split). ``strata`` (one label per row, the same
    label sequence for both sets, e.g. the requested class) restricts the re-splits to rows of one label, so two sets
    with the same class mix are compared class for class. p = (1 + #{split statistic >= observed}) /
    (1 + num_permutations): small p means the sets differ by more than sampling noise. Sets generated from shared
    random streams are positively correlated, which only makes the test conservative (larger p).
    ``normalise`` scales both by ``other``'s RMS feature value first (as ``kernel_distance`` does)."""
    x, y = _kid_inputs(features, other, normalise)
    z = torch.cat([x, y])
    k = _polynomial_kernel(z, z)
    diag = k.diagonal()
    total = len(x) + len(y)
    observed = torch.zeros(1, total, dtype=torch.float64)
    observed[0, : len(x)] = 1
    gen = torch.Generator().manual_seed(seed)
    if strata is None:
        groups = [torch.arange(total)]
    else:
        if len(strata) != len(x) or len(x) != len(y):
            raise ValueError("strata need one label per row and two sets of the same size")
        pooled = torch.cat([strata, strata])
        groups = [torch.nonzero(pooled == c).flatten() for c in torch.unique(strata)]
    splits = torch.zeros(num_permutations, total, dtype=torch.float64)
    for idx in groups:  # in every group, the same number of rows goes to the first set as in the observed split
        order = torch.rand(num_permutations, len(idx), generator=gen).argsort(dim=1)
        first = int(observed[0, idx].sum())
        splits[torch.arange(num_permutations)[:, None], idx[order[:, :first]]] = 1
    a = torch.cat([observed, splits])
    b = 1 - a
    m, n = a.sum(1), b.sum(1)
    ka = a @ k
    sxx = (ka * a).sum(1) - a @ diag
    syy = (b @ k * b).sum(1) - b @ diag
    sxy = (ka * b).sum(1)
    stat = sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)
    p = (1 + int((stat[1:] >= stat[0]).sum())) / (1 + num_permutations)
    return float(stat[0]), p


REFERENCE_SAMPLE = 2000  # reference features kept beside the statistics, for KID


def cached_reference(path: str | Path, compute) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference (mean, covariance, a sample of up to 2000 features) from ``path`` (safetensors), computing and
    writing it atomically if absent or written by an older version without the sample."""
    path = Path(path)
    if path.exists():
        data = load_file(str(path))
        if "sample" in data:
            return data["mu"], data["cov"], data["sample"]
    feats = compute()
    mu, cov = feature_stats(feats)
    sample = feats[:REFERENCE_SAMPLE].float().contiguous()
    atomic_write(path, lambda tmp: save_file({"mu": mu.contiguous(), "cov": cov.contiguous(), "sample": sample}, tmp))
    return mu, cov, sample
