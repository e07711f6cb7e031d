"""How biased is KID when a class-balanced sample is read as an i.i.d. one? (README, Benchmarking.)

Draws real Fashion-MNIST training images class-balanced (N / 10 per class, as `mulosd bench` asks for classes),
computes their classifier-space KID against the bench's test-set reference, once with the i.i.d. formula and
once with the class-stratified weights, over TRIALS draws per N, and prints the means (x1000) and their
difference: the i.i.d. formula's bias. Both share one reference sample, whose own sampling error offsets both
means alike.

    .venv/bin/python scripts/kid_bias.py [TRIALS]
"""

from __future__ import annotations

import sys

import torch

from mulosd import Pipeline
from mulosd.data import FashionMNIST
from mulosd.evaluation.bench import _features, reference_stats
from mulosd.evaluation.fid import kernel_distance
from mulosd.io import cache_dir

trials = int(sys.argv[1]) if len(sys.argv) > 1 else 30
pipe = Pipeline.from_pretrained("fmnist-32")
ref = reference_stats(pipe, cache_dir())[2]
train = FashionMNIST.load("train").head(6000)
feats = _features(pipe, (train.at(32) + 1) / 2)
pools = [torch.nonzero(train.labels == c).flatten() for c in range(10)]
g = torch.Generator().manual_seed(0)
print("N | i.i.d. formula x1000 | class-stratified x1000 | bias x1000 (sd of the difference)")
for n in (20, 100, 400, 1000):
    plain, strat = [], []
    for _ in range(trials):
        idx = torch.cat([pool[torch.randperm(len(pool), generator=g)[: n // 10]] for pool in pools])
        plain.append(kernel_distance(feats[idx], ref, normalise=True))
        strat.append(kernel_distance(feats[idx], ref, normalise=True, strata=train.labels[idx]))
    plain, strat = 1000 * torch.tensor(plain), 1000 * torch.tensor(strat)
    diff = plain - strat
    print(f"{n} | {plain.mean():.2f} | {strat.mean():.2f} | {diff.mean():.2f} ({diff.std():.2f})")
