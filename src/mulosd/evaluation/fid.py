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
    """Both sets in float64 on the CPU, divided by ``y``'s RMS feature value when ``normalise``; at least 2 rows each."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(x)} and {len(y)}")
    x, y = x.detach().double().cpu(), y.detach().double().cpu()  # on the CPU, like the strata weights
    if normalise:
        scale = y.pow(2).mean().sqrt().clamp_min(1e-12)
        x, y = x / scale, y / scale
    return x, y


def _pair_weights(strata: torch.Tensor | None, m: int,
                  rows: torch.Tensor | None = None) -> tuple[torch.Tensor | float, float]:
    """Weights of the within-set pair sum in KID's unbiased estimate of E k(x, x') for a set of m rows.

    Rows drawn i.i.d.: every pair i != j weighs 1 / (m (m - 1)), returned as (1.0, m (m - 1)). Rows drawn by
    stratum, n_c from each (a bench asks for class i mod C or caption i mod P, so its images are balanced by
    design, not by chance): the i.i.d. weights would under-count pairs from one stratum (n_c - 1 partners of m - 1, against the
    mixture's n_c / m), and same-class pairs are the similar ones, so KID would be biased low (by about 0.0075 at
    N = 1000 and 0.39 at N = 20 for real Fashion-MNIST images in the classifier space; scripts/kid_bias.py).
    The unbiased estimate for the mixture sum_c w_c P_c, w_c = n_c / m, weighs a pair from strata c != c' by
    1 / m^2 and a pair from one stratum by n_c / ((n_c - 1) m^2); returned as (per-pair factor, m^2). The factor
    covers the pairs of ``rows`` (labels; ``strata`` itself by default, the pooled rows of two sets in the
    permutation test). A stratum with a
    single row leaves its own pairs unobserved: the i.i.d. weights are used then, for the whole set
    (``stratified_kid_ok`` tells a caller beforehand)."""
    if strata is None:
        return 1.0, float(m * (m - 1))
    strata = _labels(strata, m)
    if not stratified_kid_ok(strata):
        return 1.0, float(m * (m - 1))
    labels, counts = torch.unique(strata, return_counts=True)
    rows = strata if rows is None else _labels(rows, len(rows))
    n = counts[torch.searchsorted(labels, rows)].double()
    same = rows[:, None] == rows[None, :]
    return 1 + same.double() / (n[:, None] - 1), float(m * m)


def _labels(strata, m: int) -> torch.Tensor:
    """One integer label per row, as a 1-D CPU tensor (a [m, 1] column would broadcast the weights wrongly)."""
    strata = torch.as_tensor(strata).cpu()
    if strata.dim() != 1 or len(strata) != m:
        raise ValueError(f"strata need one label per row: got shape {tuple(strata.shape)} for {m} rows")
    return strata


def stratified_kid_ok(strata) -> bool:
    """Whether every stratum has at least 2 rows, so that KID can weigh the set as a stratified sample without
    bias (a stratum of one row leaves its within-stratum pairs unobserved)."""
    return int(torch.unique(torch.as_tensor(strata), return_counts=True)[1].min()) >= 2


def _within(k: torch.Tensor, weights: torch.Tensor | float, norm: float) -> torch.Tensor:
    """Weighted mean of the off-diagonal entries of one set's kernel matrix (see ``_pair_weights``)."""
    kw = k * weights
    return (kw.sum() - kw.diagonal().sum()) / norm


def kernel_distance(features: torch.Tensor, ref: torch.Tensor, normalise: bool = False,
                    strata: torch.Tensor | None = None, ref_strata: torch.Tensor | None = None) -> float:
    """KID: the unbiased estimate of the squared MMD between two feature sets with the cubic polynomial kernel
    k(x, y) = (x.y / D + 1)^3 (Binkowski et al., 2018). Unlike FID it has no bias that grows as N shrinks, so it
    compares methods fairly at small N; it can be slightly negative when the sets are alike.

    Each set is an i.i.d. sample of its distribution unless ``strata`` (for ``features``) or ``ref_strata`` (for
    ``ref``) gives its rows' class labels: then it is a stratified sample (n_c rows of class c, as a bench draws
    them) of the mixture with weights n_c / N, and its within-set term is weighted so that the estimate stays
    unbiased (``_pair_weights``); the i.i.d. formula would be biased low by as much as the classes differ.

    ``normalise`` divides both sets by the reference's RMS feature value first, so x.y / D is about 1 for any
    feature space (the kernel was designed for Inception's pool features; without it a feature space with larger
    activations, like the classifier's, puts KID on an arbitrary scale). Inception KID stays unnormalised."""
    x, y = _kid_inputs(features, ref, normalise)
    m, n = len(x), len(y)
    within_x = _within(_polynomial_kernel(x, x), *_pair_weights(strata, m))
    within_y = _within(_polynomial_kernel(y, y), *_pair_weights(ref_strata, n))
    return float(within_x + within_y - 2 * _polynomial_kernel(x, y).mean())


def kid_permutation_test(features: torch.Tensor, other: torch.Tensor, strata: torch.Tensor | None = None,
                         num_permutations: int = 1000, seed: int = 0, normalise: bool = False) -> tuple[float, float]:
    """Is ``features`` drawn from the same distribution as ``other``? Returns (KID between the two sets, p-value).

    The statistic is KID (the unbiased squared MMD with the cubic polynomial kernel, as in ``kernel_distance``); its
    null distribution comes from re-splitting the pooled sets at random, ``num_permutations`` times, on one kernel
    matrix (so the test costs a few matrix products, not one KID per split). ``strata`` (one label per row, the same
    label sequence for both sets, e.g. the requested class) restricts the re-splits to rows of one label, so two sets
    with the same class mix are compared class for class, and weighs both within-set sums for stratified samples
    (as ``kernel_distance`` with ``strata`` and ``ref_strata`` does). p = (1 + #{split statistic >= observed}) /
    (1 + num_permutations): small p means the sets differ by more than sampling noise. Sets generated from shared
    random streams are positively correlated, which only makes the test conservative (larger p).
    ``normalise`` scales both by ``other``'s RMS feature value first (as ``kernel_distance`` does)."""
    x, y = _kid_inputs(features, other, normalise)
    m, n = len(x), len(y)
    z = torch.cat([x, y])
    k = _polynomial_kernel(z, z)
    observed = torch.zeros(1, m + n, dtype=torch.float64)
    observed[0, :m] = 1
    gen = torch.Generator().manual_seed(seed)
    if strata is None:
        groups, weights = [torch.arange(m + n)], (1.0, float(m * (m - 1)), float(n * (n - 1)))
    else:
        if len(strata) != m or m != n:
            raise ValueError("strata need one label per row and two sets of the same size")
        strata = _labels(strata, m)
        pooled = torch.cat([strata, strata])
        groups = [torch.nonzero(pooled == c).flatten() for c in torch.unique(strata)]
        # every split keeps each stratum's count in both sets (the same n_c in each), so one pair-weight matrix
        # over the pooled rows serves both within-set sums of every split; the cross-set pairs it also weighs are
        # masked out of those sums
        factor, norm = _pair_weights(strata, m, pooled)
        weights = (factor, norm, norm)
    splits = torch.zeros(num_permutations, m + n, dtype=torch.float64)
    for idx in groups:  # in every group, the same number of rows goes to the first set as in the observed split
        order = torch.rand(num_permutations, len(idx), generator=gen).argsort(dim=1)
        first = int(observed[0, idx].sum())
        splits[torch.arange(num_permutations)[:, None], idx[order[:, :first]]] = 1
    a = torch.cat([observed, splits])
    b = 1 - a
    kw = k * weights[0]
    dw = kw.diagonal()
    akw = a @ kw
    sxx = (akw * a).sum(1) - a @ dw
    syy = ((kw.sum(0) - akw) * b).sum(1) - b @ dw  # b @ kw, as b = 1 - a
    sxy = (a @ k * b).sum(1)
    stat = sxx / weights[1] + syy / weights[2] - 2 * sxy / (m * n)
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
