import itertools

import pytest
import torch
from scipy.stats import chisquare

from mulosd.decoding.sampling import RandomStreams, SamplingConfig, cfg_mix, process_logits, sample, warp
from mulosd.errors import MulosdError


def reference_probs(cond, uncond, s, t, k, p):
    """The documented distribution, computed element by element in float64: CFG -> T -> top-k -> top-p -> softmax."""
    logits = [u + s * (c - u) for c, u in zip(cond.tolist(), uncond.tolist())]
    if t == 0:
        best = max(range(len(logits)), key=lambda i: logits[i])
        return torch.tensor([1.0 if i == best else 0.0 for i in range(len(logits))], dtype=torch.float64)
    logits = [x / t for x in logits]
    keep = set(range(len(logits)))
    if k:
        kth = sorted(logits, reverse=True)[k - 1]
        keep = {i for i in keep if logits[i] >= kth}
    z = sum(torch.tensor(logits[i], dtype=torch.float64).exp() for i in keep)
    probs = {i: torch.tensor(logits[i], dtype=torch.float64).exp() / z for i in keep}
    if p < 1:
        mass, kept = 0.0, set()
        for i in sorted(probs, key=lambda i: -probs[i]):
            if mass >= p:
                break
            kept.add(i)
            mass += probs[i].item()
        z = sum(probs[i] for i in kept)
        probs = {i: probs[i] / z for i in kept}
    return torch.tensor([probs.get(i, torch.tensor(0.0)).item() for i in range(len(logits))], dtype=torch.float64)


@pytest.mark.parametrize("s,t,k,p", list(itertools.product([1.0, 3.0], [0.0, 0.7, 1.0], [0, 3], [1.0, 0.6])))
def test_cfg_and_warpers_give_documented_distribution(s, t, k, p):
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 9, generator=g, dtype=torch.float64).float()
    cfg = SamplingConfig(cfg_scale=s, temperature=t, top_k=k, top_p=p)
    logits = torch.stack([cond, uncond]) if cfg.uses_cfg else cond[None]
    got = process_logits(logits, cfg)[0].double()
    want = reference_probs(cond, uncond if cfg.uses_cfg else cond, s, t, k, p)
    assert torch.allclose(got, want, atol=1e-6)


def test_cfg_mix_formula():
    cond, uncond = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(cfg_mix(torch.cat([cond, uncond]), 4.0), uncond + 4.0 * (cond - uncond))


def test_sample_is_inverse_cdf_and_matches_distribution():
    probs = torch.tensor([0.1, 0.0, 0.25, 0.4, 0.25])
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(3))
    draws = sample(probs.expand(len(u), -1), u)
    counts = torch.bincount(draws, minlength=5)
    assert counts[1] == 0  # zero-probability tokens are never drawn
    nz = probs > 0
    assert chisquare(counts[nz].numpy(), (probs[nz] * len(u)).numpy()).pvalue > 1e-3
    assert sample(probs, torch.tensor(0.0)) == 0 and sample(probs, torch.tensor(0.9999)) == 4


def test_greedy_ignores_warpers_and_is_argmax():
    logits = torch.randn(4, 11)
    probs = warp(logits, SamplingConfig(temperature=0, top_k=2, top_p=0.3))
    assert (probs.argmax(-1) == logits.argmax(-1)).all() and (probs.sum(-1) == 1).all()


def test_streams_are_per_image():
    a = RandomStreams.from_seed(7, [0, 1, 2]).uniform(4)
    b = RandomStreams.from_seed(7, [2]).uniform(4)
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("kw,msg", [
    ({"cfg_scale": -1}, "cfg scale"), ({"temperature": -0.1}, "temperature"), ({"top_k": -2}, "top-k"),
    ({"top_k": 1.5}, "top-k"), ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"),
])
def test_bad_sampling_parameters(kw, msg):
    with pytest.raises(MulosdError, match=msg):
        SamplingConfig(**kw)
