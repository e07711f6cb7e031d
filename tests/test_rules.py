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


from mulosd.decoding.rules import codebook_neighbours, lantern_pooling, verify_grouped, verify_lantern  # noqa: E402


def batch_case(seed, B=64, G=5, V=12):
    g = torch.Generator().manual_seed(seed)
    p = random_dist(g, B, G + 1, V).float()
    q = random_dist(g, B, G, V).float()
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, G)
    return p, q, draft, torch.rand(B, G, generator=g), torch.rand(B, generator=g), torch.randn(V, 4, generator=g)


def same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("accept", "num_accepted", "next_token"))


@pytest.mark.parametrize("seed", range(5))
def test_lantern_limits_reproduce_exact_sd(seed):
    p, q, draft, ua, ur, book = batch_case(seed)
    exact = verify_exact(p, q, draft, ua, ur)
    assert same(exact, verify_lantern(p, q, draft, ua, ur, codebook_neighbours(book, 5), delta=0.0))
    assert same(exact, verify_lantern(p, q, draft, ua, ur, codebook_neighbours(book, 0), delta=0.4))
    assert same(exact, verify_lantern(p, q, draft, ua, ur, codebook_neighbours(book, 5), lam=1.0))


@pytest.mark.parametrize("seed", range(5))
def test_gsd_group_one_reproduces_exact_rule(seed):
    p, q, draft, ua, ur, book = batch_case(seed)
    book = torch.nn.functional.normalize(book, dim=-1)
    assert same(verify_exact(p, q, draft, ua, ur), verify_grouped(p, q, draft, ua, ur, book, group=1))
    # a group spanning the whole vocabulary has p(C) = q(C) = 1 (up to float rounding): every draft is accepted
    everything = verify_grouped(p, q, draft, ua.clamp(max=0.999), ur, book, group=2 * p.shape[-1], prob_tol=1.1, embed_tol=3.0)
    assert everything.accept.all()


def lantern_one_step(p, q, neighbours, delta):
    """Exact one-step output distribution of the LANTERN rule, from its own pooling function."""
    out = torch.zeros_like(p)
    for x in range(len(p)):
        if q[x] == 0:
            continue
        p_tilde, pooled = lantern_pooling(p, torch.tensor(x), neighbours, delta)
        a = acceptance_probability(p_tilde, q[x])
        out[x] += q[x] * a
        out += q[x] * (1 - a) * residual_distribution(p, q.masked_fill(pooled, 0.0))
    return out


def test_lantern_deviation_grows_with_delta():
    """Lossy by design: report the one-step total variation to p for growing delta (0 at delta = 0)."""
    g = torch.Generator().manual_seed(4)
    V = 16
    book = torch.randn(V, 3, generator=g, dtype=torch.float64)
    nb = codebook_neighbours(book, 6)
    pairs = [(random_dist(g, V), random_dist(g, V)) for _ in range(10)]
    tv = {}
    for delta in (0.0, 0.05, 0.1, 0.2, 0.4):
        tv[delta] = sum(0.5 * (lantern_one_step(p, q, nb, delta) - p).abs().sum().item() for p, q in pairs) / len(pairs)
    assert tv[0.0] < 1e-9 and tv[0.4] > tv[0.05] > 0
    for out in (lantern_one_step(random_dist(g, V), random_dist(g, V), nb, 0.3),):
        assert abs(out.sum().item() - 1) < 1e-9  # still a distribution


def test_neighbour_tables():
    book = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    assert codebook_neighbours(book, 2).tolist() == [[1, 2], [0, 2], [3, 1], [2, 1]]
    assert codebook_neighbours(book, 2, include_self=True).tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]
    with pytest.raises(ValueError, match="allowed: 0..3"):
        codebook_neighbours(book, 4)


def test_pooled_threshold_acceptance():
    from mulosd.decoding.rules import pooled_threshold_accept

    book = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    p = torch.tensor([[0.10, 0.30, 0.25, 0.35]])
    nb1, nb2 = codebook_neighbours(book, 1, include_self=True), codebook_neighbours(book, 2, include_self=True)
    draft = torch.tensor([[0, 1, 2, 3]]).T.expand(-1, 1)  # each code as the draft, [4, 1]
    pp = p.expand(4, -1)[:, None]  # [4, 1, V]
    assert pooled_threshold_accept(pp, draft, nb1, 0.3)[:, 0].tolist() == [False, True, False, True]
    # k = 2 pools {0,1}, {1,0}, {2,3}, {3,2}: masses 0.4, 0.4, 0.6, 0.6
    assert pooled_threshold_accept(pp, draft, nb2, 0.5)[:, 0].tolist() == [False, False, True, True]
    assert not pooled_threshold_accept(pp, draft, nb2, 1.01).any()
    g = torch.Generator().manual_seed(0)
    big = random_dist(g, 3, 5, 12).float()
    d = torch.randint(0, 12, (3, 5), generator=g)
    all_codes = codebook_neighbours(torch.randn(12, 2, generator=g), 12, include_self=True)
    assert pooled_threshold_accept(big, d, all_codes, 0.999).all()  # pooling every code gives mass 1


def test_soft_pooled_acceptance_keeps_a_passing_set_and_accepts_the_rest_in_proportion():
    """acceptance=soft: accept with probability min(1, p(B_k(x)) / tau). A set at or over tau passes for every
    uniform (the hard rule's acceptances are kept), tau = inf rejects everything, and over a fine grid of uniforms
    a set under tau passes in exactly the share p(B_k(x)) / tau."""
    from mulosd.decoding.rules import pooled_mass, pooled_threshold_accept

    book = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    p = torch.tensor([0.10, 0.30, 0.25, 0.35])
    nb2 = codebook_neighbours(book, 2, include_self=True)  # masses 0.4, 0.4, 0.6, 0.6
    n = 1000
    u = (torch.arange(n) + 0.5) / n
    draft = torch.arange(4)[:, None].expand(-1, n)
    pp = p.expand(4, n, -1)
    soft = pooled_threshold_accept(pp, draft, nb2, 0.5, u[None].expand(4, -1))
    assert soft[2:].all()  # 0.6 >= 0.5: always
    assert soft[:2].float().mean(1).tolist() == pytest.approx([0.8, 0.8], abs=1e-3)  # 0.4 / 0.5
    assert not pooled_threshold_accept(pp, draft, nb2, float("inf"), u[None].expand(4, -1)).any()
    hard = pooled_threshold_accept(pp, draft, nb2, 0.5)
    assert (soft | ~hard).all()
    assert pooled_mass(pp, draft, nb2)[:, 0].tolist() == pytest.approx([0.4, 0.4, 0.6, 0.6])


def test_restricted_sample_is_p_on_the_pooling_set_and_plain_sampling_when_the_set_is_everything():
    from mulosd.decoding.rules import restricted_sample
    from mulosd.decoding.sampling import sample

    g = torch.Generator().manual_seed(3)
    V = 12
    p = random_dist(g, 4, 6, V).float()
    draft = torch.randint(0, V, (4, 6), generator=g)
    u = torch.rand(4, 6, generator=g)
    everything = codebook_neighbours(torch.randn(V, 2, generator=g), V, include_self=True)
    assert torch.equal(restricted_sample(p, draft, everything, u), sample(p, u))  # k = V: token for token
    # k = 3: the draws follow p restricted to B_3(x) and renormalised, exactly (a fine grid of uniforms)
    nb = codebook_neighbours(torch.randn(V, 2, generator=g), 3, include_self=True)
    n = 3000
    grid = ((torch.arange(n) + 0.5) / n)
    x = torch.tensor(5)
    drawn = restricted_sample(p[0, 0].expand(n, -1), x.expand(n), nb, grid)
    freq = torch.bincount(drawn, minlength=V).float() / n
    want = torch.zeros(V)
    want[nb[5]] = p[0, 0, nb[5]] / p[0, 0, nb[5]].sum()
    assert torch.allclose(freq, want, atol=2 / n)
    outside = next(c for c in range(V) if c not in nb[5].tolist())
    lone = torch.zeros(1, V)
    lone[0, outside] = 1.0  # no mass on B_3(5): the candidate is kept
    assert restricted_sample(lone, x[None], nb, torch.tensor([0.3])).item() == 5


def test_entropy_adaptive_threshold_runs_from_tau_peaked_to_tau():
    from mulosd.decoding.rules import entropy_tau

    V, k = 16, 4
    point = torch.zeros(V)
    point[3] = 1.0
    spread = torch.zeros(V)
    spread[:k] = 1.0 / k  # entropy log k
    wide = torch.full((V,), 1.0 / V)
    half = torch.tensor([0.5, 0.5] + [0.0] * (V - 2))  # entropy log 2 = half of log 4
    got = entropy_tau(torch.stack([point, spread, wide, half]), 0.1, 0.5, k)
    assert got.tolist() == pytest.approx([0.5, 0.1, 0.1, 0.3])
    assert entropy_tau(wide[None], 0.2, 0.2, k).item() == pytest.approx(0.2)  # tau_peaked = tau: constant
