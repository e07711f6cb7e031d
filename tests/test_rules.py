"""Exactness of the verification rules: enumeration on small random distributions and Monte-Carlo tests."""

import pytest
import torch
from scipy.stats import chisquare

from mulosd.decoding.rules import acceptance_probability, residual_distribution, verify_exact


def random_dist(g, *shape, zeros=True):
    x = torch.rand(*shape, generator=g, dtype=torch.float64) ** 3
    if zeros:  # some exact zeros, as top-k/top-p produce
        x = x * (torch.rand(*shape, generator=g, dtype=torch.float64) > 0.3)
        x[..., 0] += 1e-3
    return x / x.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", range(20))
def test_one_step_output_distribution_equals_target_by_enumeration(seed):
    """P(out = y) = sum_x q(x) [a(x) 1[y = x] + (1 - a(x)) r(y)] must equal p(y), with a and r the rule's own
    pieces."""
    g = torch.Generator().manual_seed(seed)
    V = int(torch.randint(2, 9, (1,), generator=g))
    p, q = random_dist(g, V), random_dist(g, V)
    a = torch.where(q > 0, acceptance_probability(p, q), torch.zeros_like(q))
    r = residual_distribution(p, q)
    out = q * a + (q * (1 - a)).sum() * r
    assert torch.allclose(out, p, atol=1e-6, rtol=0)


def test_identical_distributions_accept_everything():
    g = torch.Generator().manual_seed(0)
    p = random_dist(g, 4, 3, 7).float()
    draft = torch.multinomial(p[:, :2].reshape(-1, 7), 1, generator=g).view(4, 2)
    v = verify_exact(p, p[:, :2], draft, torch.rand(4, 2, generator=g) * 0.999999, torch.rand(4, generator=g))
    assert v.accept.all() and (v.num_accepted == 2).all()


def test_batched_monte_carlo_two_token_sequences():
    """Draft 2 tokens from q, verify against p; the committed first two tokens follow p (chi-square on the joint)."""
    g = torch.Generator().manual_seed(1)
    V, N = 4, 60_000
    p = random_dist(g, 3, V, zeros=False).float()  # p_0, p_1, bonus p_2 (independent positions for the toy)
    q = random_dist(g, 2, V, zeros=False).float()
    draft = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(2)], 1)
    v = verify_exact(p.expand(N, -1, -1), q.expand(N, -1, -1), draft, torch.rand(N, 2, generator=g), torch.rand(N, generator=g))
    first = torch.where(v.num_accepted >= 1, draft[:, 0], v.next_token)
    # the second token exists in this cycle only when the first was accepted
    ok = v.num_accepted >= 1
    second = torch.where(v.num_accepted >= 2, draft[:, 1], v.next_token)[ok]
    c1 = torch.bincount(first, minlength=V).numpy()
    assert chisquare(c1, (p[0] * N).numpy()).pvalue > 1e-3
    c2 = torch.bincount(second, minlength=V).numpy()
    assert chisquare(c2, (p[1] * ok.sum()).numpy()).pvalue > 1e-3
