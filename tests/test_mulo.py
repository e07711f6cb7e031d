"""MuLo-SD: limiting cases of the threshold rule, exactness of the lossless variant, island scheduling, batching."""

import pytest
import torch

from mulosd.decoding.engine import decode
from mulosd.decoding.grid import label_islands
from mulosd.decoding.methods import get_method
from mulosd.decoding.mulo import MuloSettings, Resamplers, mulo_parts, pad_partial_grid
from mulosd.decoding.schedule import island_ready
from mulosd.decoding.window import generate_ar
from mulosd.decoding.rules import codebook_neighbours
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, process_logits
from mulosd.models.upsample import LatentResampler, LatentResamplerConfig
from toys import assert_matches_distribution, sequence_distribution, toy


def toy_resampler(r, vocab, seed, std=1.0):
    torch.manual_seed(seed)
    m = LatentResampler(LatentResamplerConfig(r=r, vocab_size=vocab, dim=16, n_blocks=1, hi_dim=8)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0, std / max(1, p[0].numel()) ** 0.5)
    return m


class FixedUpsampler:
    """A deterministic training-free stand-in: each low-res code becomes an r x r block of (code * 7 + offset) % V."""

    def __init__(self, r, vocab, down_from):
        self.r, self.V, self.down_from = r, vocab, down_from

    def up(self, tokens):
        B, h, w = tokens.shape
        blocks = (tokens[..., None, None] * 7 + torch.arange(self.r * self.r).view(self.r, self.r)) % self.V
        return blocks.permute(0, 1, 3, 2, 4).reshape(B, h * self.r, w * self.r)



def make(grid=4, r=2, vocab=8, k=3, learned=True, seed=0, **settings):
    target = toy(24, 2, seed, grid=grid, vocab=vocab, std=0.5)
    drafter = toy(16, 1, seed + 1, grid=grid // r, vocab=vocab, std=0.5)
    resampler = toy_resampler(r, vocab, seed + 2)
    if not learned:
        resampler = FixedUpsampler(r, vocab, resampler)
    codebook = torch.randn(vocab, 4, generator=torch.Generator().manual_seed(seed))
    neighbours = codebook_neighbours(codebook, k, include_self=True)
    settings.setdefault("rows", 1)  # several cycles, so re-synchronisation is exercised
    settings.setdefault("drafting", "serial")
    down = resampler.down_from if not learned else resampler
    resamplers = Resamplers(resampler, down, lo=grid // r, hi=grid)
    return target, ToyMulo(target, drafter, resamplers, neighbours, MuloSettings(**settings))


class ToyMulo:
    """MuLo-SD's parts on toy models, built afresh for every call as a method does."""

    def __init__(self, *args):
        self.args = args

    def generate(self, labels, cfg, streams, trace=None):
        return decode(mulo_parts(*self.args), labels, cfg, streams, trace=trace)


CFGS = [SamplingConfig(), SamplingConfig(cfg_scale=2.0, top_k=5), SamplingConfig(temperature=0.8, top_p=0.9)]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("radius", [None, 8])
def test_always_reject_with_the_whole_suffix_is_plain_target_sampling(cfg, radius):
    """tau = inf rejects every candidate; with l covering the block's suffix and serial resampling every cell is
    drawn from the target in raster order with the target's own random stream: AR token for token."""
    target, mulo = make(grid=4, tau=float("inf"), radius=radius, resampling="serial")
    labels = torch.tensor([0, 1, 1])
    ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(3, range(3)))
    out, stats = mulo.generate(labels, cfg, RandomStreams.from_seed(3, range(3)))
    assert torch.equal(out, ar)
    assert stats.accepted == 0 and stats.resampled == 3 * 16


@pytest.mark.parametrize("extra", [{"reverify": 3}, {"commit": "target"}, {"acceptance": "soft"},
                                   {"tau_peaked": 0.9, "reverify": 2, "commit": "target", "acceptance": "soft"}])
def test_always_reject_stays_plain_target_sampling_with_every_quality_option(extra):
    """tau = inf with re-verification, target-drawn commits, soft acceptance or an adaptive threshold: nothing is
    ever kept, so nothing is re-verified or drawn from a pooling set, and the verifier's own streams never shift
    the target's: still AR token for token."""
    target, mulo = make(grid=4, tau=float("inf"), radius=None, resampling="serial", **extra)
    labels = torch.tensor([0, 1, 1])
    cfg = SamplingConfig(cfg_scale=2.0)
    ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(3, range(3)))
    out, stats = mulo.generate(labels, cfg, RandomStreams.from_seed(3, range(3)))
    assert torch.equal(out, ar)
    assert stats.accepted == 0 and stats.reverified == 0


def test_an_adaptive_threshold_with_tau_peaked_equal_to_tau_is_the_fixed_threshold():
    kw = dict(grid=8, vocab=8, k=6, tau=0.6, rows=4, drafting="parallel", seed=3)
    labels, cfg = torch.tensor([0, 1]), SamplingConfig()
    _, fixed = make(**kw)
    _, adaptive = make(tau_peaked=0.6, **kw)
    _, strict = make(tau_peaked=0.99, **kw)
    a, sa = fixed.generate(labels, cfg, RandomStreams.from_seed(2, range(2)))
    b, sb = adaptive.generate(labels, cfg, RandomStreams.from_seed(2, range(2)))
    _, sc = strict.generate(labels, cfg, RandomStreams.from_seed(2, range(2)))
    assert torch.equal(a, b) and sa.accepted == sb.accepted
    assert sc.accepted < sa.accepted  # stricter where the target is certain: fewer candidates pass


def test_presets_fill_only_what_is_not_given():
    from mulosd.decoding.params import MuloParams

    assert MuloParams.parse({}).commit == "target" and MuloParams.parse({"preset": "paper"}).commit == "candidate"
    assert MuloParams.parse({"preset": "paper", "commit": "target"}).commit == "target"
    assert MuloParams.parse({"preset": "paper"}).reverify == 0 == MuloParams.parse({}).reverify


def final_distributions(target, labels, tokens, cfg):
    """The target's sampling distribution of every cell given the finished image [B, N] -> [B, N, V]."""
    with torch.no_grad():
        null = torch.full_like(labels, target.null_class)
        logits = target(torch.cat([labels, null]) if cfg.uses_cfg else labels,
                        torch.cat([tokens, tokens]) if cfg.uses_cfg else tokens)
    return process_logits(logits, cfg)


@pytest.mark.parametrize("resampling", ["serial", "parallel"])
def test_reverification_to_a_fixed_point_leaves_every_kept_cell_passing_in_its_final_context(resampling):
    """With rounds to spare, re-verification stops only when every kept cell passes the rule given the image as
    committed: checked against one teacher-forced target pass over the finished images. Without it some kept cells
    fail in their final context (their acceptance was judged next to rejected drafts): the test can fail."""
    tau, cfg, labels = 0.45, SamplingConfig(), torch.tensor([0, 1, 0, 1])
    failures = {}
    for rounds in (0, 64):
        trace = []
        target, mulo = make(grid=8, vocab=8, k=2, tau=tau, radius=0, rows=4, drafting="parallel",
                            resampling=resampling, reverify=rounds, seed=4)
        out, stats = mulo.generate(labels, cfg, RandomStreams.from_seed(1, range(4)), trace=trace)
        (rec,) = trace
        kept = (rec["accept"] & ~rec["region"]).flatten(1)
        nb = mulo.args[3]
        p = final_distributions(target, labels, out, cfg)
        passes = p.gather(-1, nb[out]).sum(-1) >= tau
        failures[rounds] = int((kept & ~passes).sum())
        if rounds:
            assert stats.reverified > 0 and stats.rerejected > 0
    assert failures[64] == 0 and failures[0] > 0


def test_target_drawn_commits_with_the_whole_codebook_pooled_sample_from_the_target_given_the_drafts():
    """commit=target with k = V: every pooling set holds all the mass, so every candidate passes and each cell
    commits a draw from the target's p given the up-sampled drafts before it (the verification forward's context),
    with the verifier's own uniforms."""
    from mulosd.decoding.state import VERIFIER_STREAM
    from mulosd.decoding.sampling import sample

    trace = []
    target, mulo = make(grid=8, vocab=8, k=8, tau=0.5, rows=4, drafting="parallel", commit="target", seed=6)
    labels, cfg = torch.tensor([1, 0]), SamplingConfig()
    streams = RandomStreams.from_seed(2, range(2))
    out, stats = mulo.generate(labels, cfg, streams, trace=trace)
    (rec,) = trace
    assert stats.resampled == 0 and bool(rec["accept"].all())
    draft = rec["draft"]
    p = final_distributions(target, labels, draft, cfg)  # context: the drafts themselves
    u = RandomStreams.from_seed(2, range(2)).fork(VERIFIER_STREAM).uniform(64)
    assert torch.equal(out, sample(p, u))


@pytest.mark.parametrize("extra", [{}, {"commit": "target", "acceptance": "soft", "tau_peaked": 0.6}])
def test_continuous_batching_gives_each_image_its_solo_tokens(extra):
    """batching=continuous: 7 images through 3 slots (images leave the pool as they finish and the next enter, in
    groups) get the tokens each gets alone with the same seed, and the work counts add up to the solo runs'."""
    from mulosd.decoding.mulo import decode_continuous

    target, mulo = make(grid=8, vocab=8, k=2, tau=0.4, rows=4, drafting="parallel", seed=7, **extra)
    labels, cfg = torch.tensor([0, 1, 1, 0, 1, 0, 0]), SamplingConfig(cfg_scale=1.5)
    solo = [mulo.generate(labels[i : i + 1], cfg, RandomStreams.from_seed(5, [i])) for i in range(7)]
    out, stats = decode_continuous(*mulo.args, labels, cfg, RandomStreams.from_seed(5, range(7)), slots=3)
    assert torch.equal(out, torch.cat([t for t, _ in solo]))
    for key in ("accepted", "drafted", "resampled", "tokens", "active_forwards"):
        assert getattr(stats, key) == sum(getattr(st, key) for _, st in solo), key
    assert stats.resampled > 0 and stats.target_forwards < sum(st.target_forwards for _, st in solo)


def test_radius_infinity_is_raster_rejection():
    for resampling in ("serial", "parallel"):
        outs = []
        for radius in (None, 50):
            _, mulo = make(grid=8, tau=0.2, radius=radius, resampling=resampling, seed=5)
            outs.append(mulo.generate(torch.tensor([0, 1]), SamplingConfig(), RandomStreams.from_seed(0, range(2)))[0])
        assert torch.equal(outs[0], outs[1])


def test_accepting_everything_commits_the_upsampled_drafts_with_one_verification_per_block():
    trace = []
    target, mulo = make(grid=8, vocab=8, k=8, tau=1e-9, seed=2)  # k = V pools all mass: every candidate passes
    out, stats = mulo.generate(torch.tensor([0, 1]), SamplingConfig(), RandomStreams.from_seed(0, range(2)), trace=trace)
    assert stats.resampled == 0 and stats.accepted == stats.drafted == 2 * 64
    assert stats.target_forwards == 1 + 4  # prefill + one verification per block of 2 high-res rows
    assert len(trace) == 4
    for rec in trace:
        s, e = rec["block"]
        assert torch.equal(out[:, s:e], rec["draft"]) and bool(rec["accept"].all()) and not bool(rec["region"].any())


@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(cfg_scale=2.0, top_k=2, temperature=0.9)])
def test_exact_acceptance_samples_the_target_sequence_distribution(learned, cfg):
    target, mulo = make(grid=2, r=2, vocab=3, k=1, learned=learned, acceptance="exact", seed=1)
    seqs, want = sequence_distribution(target, 1, cfg)
    n = 10_000
    out, stats = mulo.generate(torch.ones(n, dtype=torch.long), cfg, RandomStreams.from_seed(0, range(n)))
    assert_matches_distribution(out, want)
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("r", [2, 4])
def test_exact_acceptance_greedy_is_token_identical_to_ar(r):
    target, mulo = make(grid=8, r=r, vocab=16, acceptance="exact", rows=1, seed=3)
    cfg = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    labels = torch.tensor([0, 1, 0])
    ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(0, range(3)))
    out, _ = mulo.generate(labels, cfg, RandomStreams.from_seed(0, range(3)))
    assert torch.equal(out, ar)


@pytest.mark.parametrize("resampling", ["serial", "parallel"])
@pytest.mark.parametrize("acceptance", ["threshold", "exact"])
def test_a_batch_decodes_each_image_as_if_alone(resampling, acceptance):
    """Samples in a batch get different rejection patterns and resampling lengths; each image still comes out as
    it does alone with the same seed."""
    _, mulo = make(grid=8, vocab=16, k=3, tau=0.15, resampling=resampling, acceptance=acceptance, seed=4,
                   drafting="parallel", rows=2)
    cfg = SamplingConfig(cfg_scale=1.5)
    labels = torch.tensor([0, 1, 1, 0])
    trace = []
    batch, _ = mulo.generate(labels, cfg, RandomStreams.from_seed(7, range(4)), trace=trace)
    patterns = {tuple(rec["accept"][b].flatten().tolist()) for rec in trace[:1] for b in range(4)}
    assert len(patterns) > 1  # the samples really did differ
    for b in range(4):
        alone, _ = mulo.generate(labels[b : b + 1], cfg, RandomStreams.from_seed(7, [b]))
        assert torch.equal(alone[0], batch[b])


def test_local_rejection_keeps_accepted_cells_outside_the_windows():
    trace = []
    _, mulo = make(grid=8, vocab=16, k=8, tau=0.1, radius=1, seed=6)
    out, stats = mulo.generate(torch.tensor([1]), SamplingConfig(), RandomStreams.from_seed(1, [0]), trace=trace)
    kept = 0
    for rec in trace:
        s, e = rec["block"]
        keep = (~rec["region"][0]).flatten()
        assert torch.equal(out[0, s:e][keep], rec["draft"][0][keep])  # accepted and outside every window
        rejected = ~rec["accept"][0].flatten()
        assert bool((rec["region"][0].flatten() | ~rejected).all())  # every rejected cell is regenerated
        if rejected.any():  # accepted cells after the first rejection that were kept (raster rejection drops them)
            after = torch.arange(e - s) > int(rejected.float().argmax())
            kept += int((keep & after).sum())
    assert stats.resampled < 64 and kept > 0  # some accepted cells after a first rejection survived


def test_island_ready_follows_the_zipar_rule_inside_islands_only():
    pending = torch.zeros(1, 4, 6, dtype=torch.bool)
    pending[0, 0, 1:4] = True  # island 1: rows 0-1, columns 1-3
    pending[0, 1, 1:4] = True
    pending[0, 2:4, 5] = True  # island 2: column 5, rows 2-3
    islands = torch.zeros(1, 4, 6, dtype=torch.long)
    islands[0, 0:2, 1:4] = 1
    islands[0, 2:4, 5] = 2
    ready = island_ready(pending, islands, window=2)
    want = torch.zeros_like(pending)
    want[0, 0, 1] = True  # first cell of island 1
    want[0, 2, 5] = True  # island 2 starts at once: its predecessor (2, 4) is final
    assert torch.equal(ready, want)
    pending[0, 0, 1:3] = False  # island 1's first row is done up to column 2
    ready = island_ready(pending, islands, window=2)
    assert bool(ready[0, 1, 1]) and not bool(ready[0, 1, 2])  # (1, 1) waits for (0, 1..2); (1, 2) needs (1, 1)
    assert bool(ready[0, 0, 3])
    # the first pending cell in raster order is always ready
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(2, 5, 5, generator=g) < 0.4
        ready = island_ready(mask, label_islands(mask), window=int(torch.randint(1, 4, (1,), generator=g)))
        flat = mask.flatten(1)
        for b in range(2):
            if flat[b].any():
                assert bool(ready.flatten(1)[b, int(flat[b].float().argmax())])
        assert not bool((ready & ~mask).any())


def teacher_forced_probs(target, label, tokens, cfg):
    """p(cell i | tokens before i) for every cell of one image, by one cache-free forward."""
    labels = torch.tensor([label])
    if cfg.uses_cfg:
        labels = torch.cat([labels, torch.full_like(labels, target.null_class)])
        tokens = torch.cat([tokens, tokens])
    with torch.no_grad():
        return process_logits(target(labels, tokens), cfg)[0]


@pytest.mark.parametrize("resampling", ["serial", "parallel"])
def test_every_verification_scores_the_final_tokens_before_its_block(resampling):
    """Hand-computed expectation of every cycle: a candidate is accepted exactly when the target mass pooled over
    its k nearest codes, under the *final* tokens of all earlier blocks and the block's own candidates before it
    (computed here by a cache-free teacher-forced forward), reaches tau. This holds only if the engine re-feeds
    every stale cache slot that resampling left behind before it verifies the next block."""
    cfg = SamplingConfig(cfg_scale=1.5)
    target, mulo = make(grid=4, vocab=8, k=2, tau=0.3, radius=1, resampling=resampling, seed=7)
    neighbours = mulo.args[3]
    for label, seed in ((0, 1), (1, 2), (1, 5)):
        trace = []
        out, stats = mulo.generate(torch.tensor([label]), cfg, RandomStreams.from_seed(seed, [0]), trace=trace)
        assert len(trace) == 2 and stats.resampled > 0  # two blocks, and some resampling happened before block 2
        for rec in trace:
            s, e = rec["block"]
            context = torch.cat([out[0, :s], rec["draft"][0], out[0, e:]])[None]  # final prefix, block drafts
            p = teacher_forced_probs(target, label, context, cfg)[s:e]
            pooled = p.gather(-1, neighbours[rec["draft"][0]]).sum(-1)
            assert torch.equal(rec["accept"][0].flatten(), pooled >= 0.3)


def test_one_threshold_cycle_commits_what_the_rule_and_region_say():
    """One block of a 4x4 grid with radius 0 and serial resampling: accepted candidates are committed as drafted;
    exactly the rejected cells at or after the first rejection are regenerated; the work is one prefill, one
    verification, and one forward per regenerated cell."""
    target, mulo = make(grid=4, vocab=8, k=1, tau=0.2, radius=0, resampling="serial", rows=2, seed=3)
    trace = []
    out, stats = mulo.generate(torch.tensor([1]), SamplingConfig(), RandomStreams.from_seed(4, [0]), trace=trace)
    (rec,) = trace
    accept, region = rec["accept"][0].flatten(), rec["region"][0].flatten()
    assert bool((~accept).any()) and bool(accept.any())
    assert torch.equal(region, ~accept)  # radius 0: the rejected cells alone (all at/after the first rejection)
    assert torch.equal(out[0][accept], rec["draft"][0][accept])
    assert stats.target_forwards == 1 + 1 + int(region.sum())
    assert stats.accepted == int(accept.sum()) and stats.resampled == int(region.sum())


def test_pixel_downsampling_pads_a_partial_grid_through_the_method(monkeypatch):
    """The down-sampler that re-synchronises the drafter must see a full square grid on the pixel path (the VQ
    convolutions look past the bottom edge of a partial one). Checked through the method and pipeline, where an
    untyped adapter once skipped the padding."""
    from mulosd import Pipeline
    from mulosd.models.upsample import PixelResampler

    seen = []
    original = PixelResampler.down

    def spy(self, tokens):
        seen.append(tuple(tokens.shape[1:]))
        return original(self, tokens)

    monkeypatch.setattr(PixelResampler, "down", spy)
    pipe = Pipeline.from_pretrained("fmnist-32")
    pipe(classes=[3], method="mulo", downsampler="pixel", rows=4, batch_size=1)
    assert seen and all(shape == (16, 16) for shape in seen)


def test_pad_partial_grid_repeats_the_last_row():
    x = torch.arange(12).view(1, 2, 6) % 5
    padded = pad_partial_grid(x)
    assert padded.shape == (1, 6, 6) and torch.equal(padded[:, :2], x)
    assert bool((padded[:, 2:] == x[:, -1:]).all())
    assert pad_partial_grid(padded) is padded


# ---- on the shipped fmnist-32 set ---------------------------------------------------------------------------------

import json  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from mulosd import Pipeline  # noqa: E402
from mulosd.cli import main  # noqa: E402
from mulosd.errors import MulosdError  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("fmnist-32")


@pytest.mark.parametrize("params", [{}, {"r": 4, "rows": 2, "resampling": "serial"}])
def test_mulo_on_fmnist_decodes_each_image_as_if_alone(pipe, params):
    """The shipped models through the pipeline: a batch of 3 gives the images of 3 batches of 1, and every phase
    of a cycle is timed."""
    kw = dict(classes=[1, 7, 9], num_per_class=1, method="mulo", seed=2, **params)
    one, three = pipe(batch_size=1, **kw), pipe(batch_size=3, **kw)
    assert torch.equal(one.tokens, three.tokens) and one.stats["counts"]["resampled"] > 0
    assert set(three.stats["time_breakdown_s"]) == {"drafting", "upsampling", "verification", "resampling", "downsampling"}


def test_mulo_continuous_batching_on_fmnist_is_solo_decoding(pipe):
    """Pipeline.generate hands a continuously batched method every image at once with batch_size in flight: 5
    images through 2 slots equal 5 batches of 1; acceptance maps need static batches."""
    kw = dict(classes=[0, 3, 5, 6, 9], num_per_class=1, method="mulo", seed=6)
    one = pipe(batch_size=1, **kw)
    cont = pipe(batch_size=2, batching="continuous", **kw)
    assert torch.equal(one.tokens, cont.tokens)
    assert cont.stats["resampled_per_image"] == one.stats["resampled_per_image"] > 0
    assert cont.stats["params"]["batching"] == "continuous"
    with pytest.raises(MulosdError, match="acceptance maps record the cycles of static batches"):
        pipe(batch_size=2, batching="continuous", trace=True, **kw)
    auto = pipe(batch_size=2, trace=True, **kw)  # batching=auto: static batches when maps are drawn
    assert torch.equal(auto.tokens, one.tokens) and len(auto.traces) == 5


def test_mulo_always_reject_is_ar_on_fmnist(pipe):
    kw = dict(classes=[2, 8], num_per_class=1, batch_size=2, seed=4)
    ar = pipe(method="ar", **kw)
    out = pipe(method="mulo", tau="inf", rejection="raster", resampling="serial", **kw)
    assert torch.equal(ar.tokens, out.tokens)
    assert out.stats["acceptance_rate"] == 0 and out.stats["resampled_per_image"] == 256


@pytest.mark.parametrize("params,msg", [
    ({"tau": 0}, "tau must be a number in (0.0, 1.0], got 0"),
    ({"tau": 1.5}, "tau must be a number in (0.0, 1.0], got 1.5"),
    ({"radius": -1}, "radius must be an integer >= 0 or inf, got -1"),
    ({"k": 513}, "k must be at most 512 (the codebook has 512 entries), got 513"),
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"drafter": "small"}, "drafter 'small' works on a 16x16 grid; this method needs 8x8"),
    ({"r": 4, "drafter": "r2"}, "drafter 'r2' works on a 8x8 grid; this method needs 4x4"),
    ({"r": 3}, "r=3 does not divide the target's 16x16 grid"),
    ({"r": 1.5, "upsampler": "pixel"}, "r=1.5 does not divide the target's 16x16 grid into a whole low-res grid"),
    ({"r": 1.6, "upsampler": "pixel"}, "model set fmnist-32 has no low-resolution drafter for r=1.6 (no role 'r1.6' on a 10x10 grid); "
                                       "allowed r: 2, 4"),
    ({"r": 1.6, "upsampler": "learned"}, "upsampler=learned needs an integer r (the learned model turns each "
                                         "low-res cell into an r x r block), got r=1.6; allowed at r=1.6: "
                                         "upsampler=pixel or auto"),
    ({"r": 1.6, "upsampler": "pixel", "downsampler": "learned"}, "downsampler=learned needs an integer r"),
    ({"rejection": "global"}, "rejection must be one of raster, naive_local, local; got 'global'"),
    ({"resampling": "random"}, "resampling must be one of serial, parallel"),
    ({"acceptance": "lossless"}, "acceptance must be one of threshold, soft, exact"),
    ({"commit": "argmax"}, "commit must be one of candidate, target"),
    ({"reverify": -1}, "reverify must be an integer >= 0"),
    ({"tau_peaked": 1.5}, "tau_peaked must be a number in (0.0, 1.0]"),
    ({"preset": "fast"}, "preset must be one of ours, paper"),
    ({"batching": "continuous", "resampling": "serial"}, "batching=continuous runs threshold or soft acceptance with "
                                                         "parallel resampling and no re-verification; got "
                                                         "resampling=serial (use batching=static)"),
    ({"batching": "continuous", "reverify": 1}, "got reverify=1 (use batching=static)"),
    ({"batching": "continuous", "rows": 2}, "batching=continuous needs whole-image cycles (rows unset or 8, the "
                                            "low-res grid), got rows=2"),
    ({"rows": 0}, "rows must be an integer >= 1, got 0"),
])
def test_mulo_bad_parameters(pipe, params, msg):
    with pytest.raises(MulosdError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        pipe(classes=[0], method="mulo", **params)


def test_mulo_refuses_an_upsampler_for_another_r_or_tokenizer(pipe):
    swapped = Pipeline(pipe.tokenizer, pipe.target, pipe.classifier, pipe.drafters,
                       upsamplers={2: pipe.upsamplers[4], 4: pipe.upsamplers[2]})
    with pytest.raises(MulosdError, match="trained for r=4; this run needs r=2"):
        swapped(classes=[0], method="mulo", r=2)
    from mulosd.models.vq import VQModel

    other_tok = VQModel(pipe.tokenizer.config)
    foreign = Pipeline(other_tok, pipe.target, pipe.classifier, pipe.drafters, upsamplers=pipe.upsamplers)
    with pytest.raises(MulosdError, match="trained for tokenizer"):
        foreign(classes=[0], method="mulo")
    bare = Pipeline(pipe.tokenizer, pipe.target, pipe.classifier, pipe.drafters)
    with pytest.raises(MulosdError, match="no learned up-sampler for r=2"):
        bare(classes=[0], method="mulo", upsampler="learned")
    bare(classes=[0], method="mulo", upsampler="pixel")  # the training-free path needs nothing extra
    auto = get_method("mulo")(bare)  # auto: pixel when the set has no learned model for r, learned when it has
    assert (auto.params()["upsampler"], auto.params()["downsampler"]) == ("pixel", "pixel")
    assert {k: get_method("mulo")(pipe).params()[k] for k in ("r", "drafter", "upsampler", "downsampler")} == {
        "r": 2, "drafter": "r2", "upsampler": "learned", "downsampler": "learned"}  # fmnist-32: the old defaults


def test_cli_acceptance_map_png_and_gif(tmp_path):
    out, png, gif, stats = tmp_path / "g.png", tmp_path / "map.png", tmp_path / "map.gif", tmp_path / "s.json"
    r = CliRunner().invoke(main, ["generate", "--method", "mulo", "--classes", "0,7", "--num-per-class", "1",
                                  "--tau", "0.2", "--radius", "2", "--resampling", "serial", "--rows", "1",
                                  "--drafting", "serial", "--out", str(out),
                                  "--acceptance-map", str(png), "--acceptance-gif", str(gif), "--stats-json", str(stats),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    s = json.loads(stats.read_text())
    assert s["params"]["tau"] == 0.2 and s["params"]["radius"] == 2 and s["params"]["resampling"] == "serial"
    assert Image.open(png).size[1] > 2 * 128
    g = Image.open(gif)
    assert g.n_frames == 8 + 1  # one frame per cycle (8 low-res rows at r=2) plus the summary
    bad = CliRunner().invoke(main, ["generate", "--method", "sd", "--classes", "0", "--num-per-class", "1",
                                    "--out", str(out), "--acceptance-map", str(png), "--no-progress"])
    assert bad.exit_code == 1 and "--acceptance-map needs --method mulo" in bad.output
    bad = CliRunner().invoke(main, ["generate", "--method", "mulo", "--radius", "x", "--out", str(out), "--no-progress"])
    assert bad.exit_code == 2 and "not an integer >= 0 or inf" in bad.output
