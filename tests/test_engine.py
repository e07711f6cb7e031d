"""The generic speculative loop with the exact rule: lossless on toy AR models, per-sample frontiers."""

import pytest
import torch

from mulosd.decoding.window import generate_ar, speculative_generate
from mulosd.decoding.proposers import DrafterProposer, JacobiProposer
from mulosd.decoding.rules import verify_exact
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from toys import assert_matches_distribution, sequence_distribution, toy


@pytest.mark.parametrize("gamma,cfg", [(1, SamplingConfig()), (3, SamplingConfig(cfg_scale=2.0, top_k=2)),
                                       (6, SamplingConfig(temperature=0.8, top_p=0.9))])
def test_sd_samples_the_target_sequence_distribution(gamma, cfg):
    target, drafter = toy(16, 2, 0), toy(8, 1, 1)
    seqs, want = sequence_distribution(target, 1, cfg)
    n = 10_000
    out, stats = speculative_generate(target, DrafterProposer(drafter, gamma), verify_exact,
                                      torch.ones(n, dtype=torch.long), cfg, RandomStreams.from_seed(0, range(n)))
    assert_matches_distribution(out, want)
    assert 0 < stats.accepted < stats.drafted  # a real mix of acceptances and rejections


@pytest.mark.parametrize("batch", [1, 5])
def test_sd_greedy_is_token_identical_to_ar(batch):
    target, drafter = toy(32, 2, 2, grid=4, vocab=16, std=0.3), toy(16, 1, 3, grid=4, vocab=16, std=0.3)
    cfg = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    labels = torch.arange(batch) % 2
    ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(0, range(batch)))
    for gamma in (1, 4, 9):
        sd, _ = speculative_generate(target, DrafterProposer(drafter, gamma), verify_exact,
                                     labels, cfg, RandomStreams.from_seed(0, range(batch)))
        assert torch.equal(ar, sd)


def test_drafter_equal_to_target_accepts_everything_and_samples_advance_independently():
    target = toy(16, 2, 4, grid=4, vocab=8)
    cfg = SamplingConfig()
    out, stats = speculative_generate(target, DrafterProposer(target, 5), verify_exact,
                                      torch.tensor([0, 1, 0]), cfg, RandomStreams.from_seed(0, range(3)))
    assert stats.accepted == stats.drafted == 3 * (5 + 5 + 3)  # drafts past the last cell are not counted
    # 16 tokens: 1 from prefill, then cycles of 6 -> 1 + 6 + 6 + 3: three verify passes
    assert stats.target_forwards == 4 and stats.tokens == 48
    # the loop times its two phases: proposing (drafter forwards) and scoring + deciding (the target forward)
    assert set(stats.time_s) == {"drafting", "verification"} and all(t > 0 for t in stats.time_s.values())


JACOBI = [("random", "none"), ("spatial", "none"), ("random", "maximal"), ("spatial", "gumbel")]


@pytest.mark.parametrize("init,coupling", JACOBI)
def test_jacobi_samples_the_target_sequence_distribution(init, coupling):
    target = toy(16, 2, 0)
    cfg = SamplingConfig(cfg_scale=1.5, temperature=0.9)
    seqs, want = sequence_distribution(target, 0, cfg)
    n = 10_000
    out, stats = speculative_generate(target, JacobiProposer(3, 3, init, coupling), verify_exact,
                                      torch.zeros(n, dtype=torch.long), cfg, RandomStreams.from_seed(1, range(n)))
    assert_matches_distribution(out, want)
    assert stats.drafter_forwards == 0 and 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("init,coupling", JACOBI)
def test_jacobi_greedy_is_token_identical_to_ar(init, coupling):
    target = toy(32, 2, 2, grid=4, vocab=16, std=0.3)
    cfg = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    labels = torch.tensor([0, 1, 1])
    ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(0, range(3)))
    for window in (1, 5, 16):
        out, _ = speculative_generate(target, JacobiProposer(16, window, init, coupling), verify_exact,
                                      labels, cfg, RandomStreams.from_seed(0, range(3)))
        assert torch.equal(ar, out)


def test_coupling_raises_draft_persistence():
    """MC-SJD's point: coupled re-drafts accept more than independent ones on the same model."""
    target = toy(32, 2, 5, grid=4, vocab=16, std=0.15)
    cfg = SamplingConfig()
    rates = {}
    for coupling in ("none", "maximal"):
        _, st = speculative_generate(target, JacobiProposer(16, 6, "random", coupling), verify_exact,
                                     torch.zeros(400, dtype=torch.long), cfg, RandomStreams.from_seed(0, range(400)))
        rates[coupling] = st.accepted / st.drafted
    assert rates["maximal"] > rates["none"]


from mulosd.decoding.schedule import generate_zipar, zipar_schedule_step  # noqa: E402


@pytest.mark.parametrize("cfg", [SamplingConfig(cfg_scale=2.0), SamplingConfig(temperature=0.0)])
def test_zipar_with_full_window_is_ar(cfg):
    target = toy(32, 2, 2, grid=4, vocab=16, std=0.3)
    labels = torch.tensor([0, 1, 1])
    ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(3, range(3)))
    for window in (4, 9):
        out, stats = generate_zipar(target, labels, cfg, RandomStreams.from_seed(3, range(3)), window)
        assert torch.equal(ar, out) and stats.target_forwards == 16


def test_zipar_parallel_schedule():
    """Window 2 on a 4x4 grid: row r starts once row r-1 has 2 tokens, one token per active row per forward."""
    W, counts, fed, steps = 4, [1, 0, 0, 0], set(), 0
    while min(counts) < W:
        feeds, stand_ins = zipar_schedule_step(counts, fed, W, 2)
        for cell, nxt in feeds:
            if cell not in stand_ins:
                fed.add(cell)
            if nxt is not None:
                counts[nxt // W] += 1
        steps += 1
        if steps == 2:  # forward 1 gives row 0 its 2nd token; forward 2 gives its 3rd and starts row 1
            assert counts[:2] == [3, 1]
    assert steps == 9  # forwards after the prefill, instead of AR's 15
    target = toy(32, 2, 2, grid=4, vocab=16, std=0.3)
    out, stats = generate_zipar(target, torch.tensor([0, 1]), SamplingConfig(), RandomStreams.from_seed(0, range(2)), 2)
    assert stats.target_forwards == 1 + steps and out.shape == (2, 16)


def test_zipar_never_attends_to_unwritten_slots():
    """Poison every unwritten cache slot with huge values: outputs must not change."""
    target = toy(32, 2, 2, grid=4, vocab=16, std=0.3)
    cfg = SamplingConfig()
    a, _ = generate_zipar(target, torch.tensor([1]), cfg, RandomStreams.from_seed(0, [0]), 2)
    original = target.setup_cache

    def poisoned(batch, dtype=None, slack=0):
        original(batch, dtype, slack)
        for layer in target.layers:
            layer.attention.kv_cache.k.fill_(1e4)
            layer.attention.kv_cache.v.fill_(1e4)

    target.setup_cache = poisoned
    b, _ = generate_zipar(target, torch.tensor([1]), cfg, RandomStreams.from_seed(0, [0]), 2)
    assert torch.equal(a, b)


def test_gsd_group_one_equals_sjd_end_to_end():
    import functools

    from mulosd.decoding.rules import verify_grouped

    target = toy(32, 2, 2, grid=4, vocab=16, std=0.3)
    book = torch.nn.functional.normalize(torch.randn(16, 4), dim=-1)
    labels, cfg = torch.tensor([0, 1, 1, 0]), SamplingConfig(cfg_scale=1.5)
    sjd, s1 = speculative_generate(target, JacobiProposer(16, 5), verify_exact,
                                   labels, cfg, RandomStreams.from_seed(0, range(4)))
    gsd, s2 = speculative_generate(target, JacobiProposer(16, 5), functools.partial(verify_grouped,
                                   codebook=book, group=1), labels, cfg, RandomStreams.from_seed(0, range(4)))
    assert torch.equal(sjd, gsd) and s1.target_forwards == s2.target_forwards


def test_lantern_delta_zero_equals_sd_end_to_end():
    import functools

    from mulosd.decoding.rules import codebook_neighbours, verify_lantern

    target, drafter = toy(32, 2, 2, grid=4, vocab=16, std=0.3), toy(16, 1, 3, grid=4, vocab=16, std=0.3)
    rule = functools.partial(verify_lantern, neighbours=codebook_neighbours(torch.randn(16, 4), 6), delta=0.0)
    labels, cfg = torch.tensor([0, 1, 1]), SamplingConfig(cfg_scale=2.0)
    sd, _ = speculative_generate(target, DrafterProposer(drafter, 4), verify_exact,
                                 labels, cfg, RandomStreams.from_seed(0, range(3)))
    lt, _ = speculative_generate(target, DrafterProposer(drafter, 4), rule,
                                 labels, cfg, RandomStreams.from_seed(0, range(3)))
    assert torch.equal(sd, lt)
