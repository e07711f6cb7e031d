"""PJD (2-D parallel Jacobi, lossless form) and the multi-scale (low-res) initialisation of Jacobi drafts: exactness
by enumeration on toy models, greedy identity with AR, rows = 1 is SJD, the staircase layout, batching."""

import pytest
import torch

from mulosd.decoding.engine import decode
from mulosd.decoding.methods import get_method
from mulosd.decoding.mulo import Resamplers
from mulosd.decoding.pjd import PJDProposer, pjd_layout, pjd_parts
from mulosd.decoding.proposers import JacobiProposer, LowResPrior
from mulosd.decoding.rules import verify_exact
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.decoding.window import generate_ar, speculative_generate
from mulosd.errors import MulosdError
from test_mulo import FixedUpsampler, toy_resampler
from toys import assert_matches_distribution, sequence_distribution, toy


def pjd(target, window, rows, start, init="random", coupling="maximal", prior=None):
    c = target.config
    return lambda: pjd_parts(target, PJDProposer(c.vocab_size, c.grid_size, window, rows, start, init, coupling, prior),
                             verify_exact)


def run(make_parts, labels, cfg, seed=0):
    return decode(make_parts(), labels, cfg, RandomStreams.from_seed(seed, range(len(labels))))


def test_layout_is_a_staircase_below_the_window():
    # 6 x 6 grid, frontier at cell 8 (row 1, col 2), window 3: the window covers cells 8-10; row 2 may draft the
    # columns before 5 - 1*2 = 3, row 3 before 1; rows = 3 stops at row 3 (k = 2)
    aux, standin, source = pjd_layout(torch.tensor([8]), W=6, N=36, window=3, rows=3, start=2)
    assert aux[0].nonzero().flatten().tolist() == [12, 13, 14, 18]
    # row 2's first cell is predicted from cell 11 (row 1's last), which nothing feeds: the stand-in is the window's
    # last cell (10); row 3's first cell from cell 17, stood in for by row 2's last drafted cell (14)
    assert standin[0].nonzero().flatten().tolist() == [11, 17]
    assert source[0, 11] == 10 and source[0, 17] == 14
    # the window reaching the end of its row feeds cell 11 itself: no stand-in there
    aux, standin, _ = pjd_layout(torch.tensor([9]), W=6, N=36, window=3, rows=2, start=2)
    assert aux[0].nonzero().flatten().tolist() == [12, 13, 14, 15] and not standin.any()
    # rows = 1: nothing below the window; a finished sample drafts nothing
    assert not pjd_layout(torch.tensor([8]), 6, 36, 3, 1, 2)[0].any()
    assert not pjd_layout(torch.tensor([36]), 6, 36, 3, 3, 1)[0].any()


COMBOS = [("random", "none"), ("random", "maximal"), ("spatial", "gumbel"), ("random", "gumbel")]


@pytest.mark.parametrize("init,coupling", COMBOS)
def test_pjd_samples_the_target_sequence_distribution(init, coupling):
    # 3 x 3 grid, window 2, three rows at once, c = 1: staircase drafts, stand-ins and window entries all happen
    target = toy(16, 2, 0, grid=3, vocab=2, std=0.8)
    cfg = SamplingConfig(cfg_scale=1.5, temperature=0.9)
    seqs, want = sequence_distribution(target, 0, cfg)
    n = 12_000
    out, stats = run(pjd(target, 2, 3, 1, init, coupling), torch.zeros(n, dtype=torch.long), cfg, seed=1)
    assert_matches_distribution(out, want, vocab=2)
    assert 0 < stats.accepted < stats.drafted


def lowres_prior(target, learned, seed=2):
    c = target.config
    drafter = toy(16, 1, seed, grid=c.grid_size // 2, vocab=c.vocab_size, std=0.5)
    up = toy_resampler(2, c.vocab_size, seed + 1)
    if not learned:
        up = FixedUpsampler(2, c.vocab_size, up)
    return LowResPrior(drafter, Resamplers(up, up, lo=c.grid_size // 2, hi=c.grid_size), 2, c.vocab_size)


@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("method", ["sjd", "pjd"])
def test_lowres_initialisation_samples_the_target_sequence_distribution(learned, method):
    target = toy(16, 2, 1, grid=2, vocab=3)
    cfg = SamplingConfig(cfg_scale=2.0, top_k=2, temperature=0.9)
    seqs, want = sequence_distribution(target, 1, cfg)
    n = 10_000
    prior = lowres_prior(target, learned)
    if method == "sjd":
        out, stats = speculative_generate(target, JacobiProposer(3, 2, "lowres", "maximal", prior), verify_exact,
                                          torch.ones(n, dtype=torch.long), cfg, RandomStreams.from_seed(0, range(n)))
    else:
        out, stats = run(pjd(target, 1, 2, 1, "lowres", "maximal", prior), torch.ones(n, dtype=torch.long), cfg)
    assert_matches_distribution(out, want)
    assert 0 < stats.accepted < stats.drafted and stats.drafter_forwards > 0


@pytest.mark.parametrize("init,coupling", [("random", "none"), ("spatial", "maximal"), ("random", "gumbel"),
                                           ("lowres", "maximal")])
def test_pjd_greedy_is_token_identical_to_ar(init, coupling):
    target = toy(32, 2, 2, grid=6, vocab=16, std=0.3)
    cfg = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    prior = lowres_prior(target, True) if init == "lowres" else None
    for labels in (torch.tensor([1]), torch.tensor([0, 1, 1])):
        ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(0, range(len(labels))))
        for window, rows, start in ((1, 3, 1), (4, 2, 2), (6, 4, 1), (9, 3, 3)):
            out, _ = run(pjd(target, window, rows, start, init, coupling, prior), labels, cfg)
            assert torch.equal(ar, out), (window, rows, start)


@pytest.mark.parametrize("init,coupling", [("random", "none"), ("spatial", "maximal"), ("random", "gumbel")])
def test_pjd_with_one_row_is_sjd_token_for_token(init, coupling):
    target = toy(32, 2, 5, grid=4, vocab=16, std=0.3)
    cfg = SamplingConfig(cfg_scale=1.5)
    labels = torch.tensor([0, 1, 0, 1])
    for window in (3, 16):
        sjd, s1 = speculative_generate(target, JacobiProposer(16, window, init, coupling), verify_exact, labels, cfg,
                                       RandomStreams.from_seed(3, range(4)))
        out, s2 = run(pjd(target, window, 1, 2, init, coupling), labels, cfg, seed=3)
        assert torch.equal(sjd, out) and s1.target_forwards == s2.target_forwards


def test_a_batch_decodes_each_image_as_if_alone():
    target = toy(32, 2, 6, grid=6, vocab=16, std=0.3)
    cfg = SamplingConfig(cfg_scale=1.5)
    labels = torch.tensor([0, 1, 1, 0])
    make = pjd(target, 4, 3, 2, "random", "maximal")
    batch, stats = run(make, labels, cfg, seed=7)
    assert stats.accepted > 0
    for b in range(4):
        alone, _ = decode(make(), labels[b : b + 1], cfg, RandomStreams.from_seed(7, [b]))
        assert torch.equal(alone[0], batch[b])


@pytest.fixture(scope="module")
def pipe():
    from mulosd.pipeline import Pipeline

    return Pipeline.from_pretrained("fmnist-32")


@pytest.mark.parametrize("batch", [1, 3])
def test_new_lossless_methods_greedy_on_fmnist_equal_ar(pipe, batch):
    cfg = SamplingConfig(temperature=0.0)
    labels = torch.arange(batch) * 3
    ar, _ = get_method("ar")(pipe).generate(labels, cfg, RandomStreams.from_seed(0, range(batch)))
    for name, params in (("pjd", {}), ("pjd", {"init": "lowres"}), ("mcsjd", {"init": "lowres", "init_r": 2}),
                         ("mulo", {"acceptance": "exact"}), ("eagle2", {}), ("eagle2", {"depth": 4, "topk": 3})):
        out, _ = get_method(name)(pipe, **params).generate(labels, cfg, RandomStreams.from_seed(0, range(batch)))
        assert torch.equal(out, ar), (name, params)


def test_staircase_and_lowres_drafts_raise_the_accepted_length_on_fmnist(pipe):
    """The point of both: cells enter the window with refined (staircase) or low-res drafts instead of random ones,
    so each target forward commits more tokens than SJD's with the same window and coupling (the real model: toy
    models have no spatial structure for either to use)."""
    cfg = SamplingConfig(cfg_scale=3.0)
    labels = torch.tensor([0, 3, 7, 9])

    def tokens_per_forward(name, **params):
        _, st = get_method(name)(pipe, **params).generate(labels, cfg, RandomStreams.from_seed(0, range(4)))
        return st.tokens / st.active_forwards

    base = tokens_per_forward("pjd", rows=1)
    assert tokens_per_forward("pjd", rows=3, start=4) > 1.1 * base
    assert tokens_per_forward("mcsjd", init="lowres") > 1.1 * base


@pytest.mark.parametrize("params,msg", [({"start": 0}, "start must be"), ({"window": 0}, "window must be"),
                                        ({"rows": 0}, "rows must be"), ({"init_r": 4}, "init_r and init_upsampler apply to init=lowres"),
                                        ({"init": "lowres", "init_r": 3}, "allowed init_r: 2, 4"), ({"init": "lowres", "init_r": 1}, "init_r must be"),
                                        ({"init": "diagonal"}, "init must be one of random, spatial, lowres")])
def test_bad_parameters(pipe, params, msg):
    with pytest.raises(MulosdError, match=msg):
        get_method("pjd")(pipe, **params)
