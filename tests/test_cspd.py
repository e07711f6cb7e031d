"""Continuous-token decoding: car and cspd on small random continuous models (fast, seeded)."""

import copy
import math

import pytest
import torch

from mulosd.decoding.continuous import generate_car, generate_cspd
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.errors import MulosdError
from mulosd.models.cgpt import ContinuousGPT, ContinuousGPTConfig
from mulosd.models.kl import KLAutoencoder, KLConfig

CFG = SamplingConfig(cfg_scale=2.0)


def _perturb(model, seed, scale=0.3):
    """Random models have zero-initialised head outputs (every head would be the same function): shake them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _model(dim, layers, heads, seed, tokenizer_id="", grid=4, steps=6, width=32):
    torch.manual_seed(seed)
    cfg = ContinuousGPTConfig(grid_size=grid, dim=dim, n_layer=layers, n_head=heads, token_dim=2, head_width=width,
                              head_depth=2, diffusion_steps=60, sample_steps=steps, tokenizer_id=tokenizer_id)
    return _perturb(ContinuousGPT(cfg), seed)


@pytest.fixture(scope="module")
def models():
    """A random target and a drafter that is a slightly perturbed copy of it: the surrogate ratio is so sharp (the
    last reverse step's std is ~0.01) that independent random models accept nothing; a close pair accepts some."""
    kl = KLAutoencoder(KLConfig(channels=8, z_channels=8, token_dim=2)).eval()
    target = _model(32, 2, 2, 0, kl.fingerprint())
    return kl, target, _perturb(copy.deepcopy(target), 9, 0.001)


def _streams(seed, n, first=0):
    return RandomStreams.from_seed(seed, range(first, first + n))


def test_prefill_one_is_target_only_sampling_token_for_token(models):
    _, target, drafter = models
    labels = torch.tensor([3, 1, 7])
    ref, _ = generate_car(target, labels, CFG, _streams(0, 3))
    out, stats = generate_cspd(target, drafter, labels, CFG, _streams(0, 3), gamma=3, prefill=1.0)
    assert torch.equal(out, ref)
    assert stats.drafted == 0 and stats.target_forwards == 16


def test_identical_draft_and_target_accept_everything(models):
    _, target, _ = models
    labels = torch.tensor([0, 5])
    out, stats = generate_cspd(target, target, labels, CFG, _streams(1, 2), gamma=4, prefill=0.0)
    assert stats.drafted > 0 and stats.accepted == stats.drafted and stats.resampled == 0
    assert stats.active_forwards < 16 * 2 / 3  # about 5 tokens per forward instead of 1
    assert torch.isfinite(out).all()


def test_different_drafter_rejects_and_resamples_with_counted_tries(models):
    _, target, drafter = models
    labels = torch.arange(4)
    trace = []
    out, stats = generate_cspd(target, drafter, labels, CFG, _streams(2, 4), gamma=3, prefill=0.0, trace=trace)
    assert 0 < stats.accepted < stats.drafted and stats.resampled > 0
    assert stats.residual_tries >= stats.resampled and stats.tokens == 4 * 16
    assert all(torch.isfinite(c["log_ratio"]).all() for c in trace)
    # a bound of one try makes fallbacks likely; they are counted, never hidden
    _, s1 = generate_cspd(target, drafter, labels, CFG, _streams(2, 4), gamma=3, prefill=0.0, max_tries=1)
    assert s1.residual_tries == s1.resampled and s1.fallbacks <= s1.resampled


def test_batch_members_match_their_solo_runs(models):
    _, target, drafter = models
    labels = torch.tensor([2, 9, 4])
    both, stats = generate_cspd(target, drafter, labels, CFG, _streams(3, 3), gamma=3, prefill=0.1)
    for i in range(3):
        alone, _ = generate_cspd(target, drafter, labels[i : i + 1], CFG, _streams(3, 1, first=i), gamma=3, prefill=0.1)
        assert torch.allclose(both[i], alone[0], atol=1e-4), i


def test_alignment_raises_acceptance(models):
    """The paper's observation on our models: replaying the drafter's noises beats independent target noises."""
    _, target, drafter = models
    labels = torch.arange(10)
    _, on = generate_cspd(target, drafter, labels, SamplingConfig(), _streams(4, 10), gamma=3, prefill=0.0)
    _, off = generate_cspd(target, drafter, labels, SamplingConfig(), _streams(4, 10), gamma=3, prefill=0.0, align=False)
    assert on.accepted / on.drafted > off.accepted / off.drafted


def _check_decodes_against_teacher_forcing(model, calls, final, labels):
    """A cached ``decode`` call whose context is committed must return what a fresh teacher-forced pass over the
    final committed tokens (with the fed cells holding what was fed) returns: a stale KV entry (a replaced token
    still cached under its old value) would show as a difference."""
    for feed, cells, z in calls:
        for b in range(len(labels)):
            # row k of the teacher-forced pass conditions token k; compare the rows that condition grid cells (drafts
            # past the end of the grid are fed but never committed)
            on = cells[b] + 1 < final.shape[1]
            seq = final[b : b + 1].clone()
            seq[0, cells[b][on]] = feed[b][on]
            want = model(labels[b : b + 1], seq)[0, cells[b][on] + 1]
            assert torch.allclose(z[b][on], want, atol=1e-4), (cells[b].tolist(), (z[b][on] - want).abs().max())


def _recording(model, calls):
    orig = model.decode

    def decode(tokens, cells, mask=None):
        z = orig(tokens, cells, mask)
        calls.append((tokens.clone(), cells.clone(), z.clone()))
        return z

    model.decode = decode
    return orig


@pytest.mark.parametrize("independent", [False, True])
def test_caches_hold_the_committed_tokens(models, independent):
    """Both bookkeepings, target and drafter: after rejections and replacements every cached forward agrees with
    teacher forcing on the committed image (independent mode re-feeds the last gamma + 1 cells to get there)."""
    _, target, drafter = models
    target, drafter = copy.deepcopy(target), copy.deepcopy(drafter)
    labels = torch.tensor([1, 6])
    tcalls, dcalls = [], []
    _recording(target, tcalls), _recording(drafter, dcalls)
    out, stats = generate_cspd(target, drafter, labels, SamplingConfig(), _streams(5, 2), gamma=3, prefill=0.1,
                               relax=3.0, independent=independent)
    assert 0 < stats.accepted < stats.drafted and stats.resampled > 0
    with torch.inference_mode():
        _check_decodes_against_teacher_forcing(target, tcalls, out, labels)
        # the drafter's one-cell calls feed its own drafts of the cycle, whose context legitimately holds the
        # cycle's earlier (not yet verified) drafts; its multi-cell calls (pre-fill, the re-feed that opens every
        # cycle) must see the committed image only
        _check_decodes_against_teacher_forcing(drafter, [c for c in dcalls if c[1].shape[1] > 1], out, labels)


def test_independent_bookkeeping_commits_every_draft(models):
    """The public code's bookkeeping: every cycle commits gamma cells (gamma + 1 when all were accepted), each
    rejected draft replaced; identical heads accept everything; a batch member matches its solo run."""
    _, target, drafter = models
    labels = torch.tensor([2, 9, 4])
    trace = []
    both, stats = generate_cspd(target, drafter, labels, CFG, _streams(3, 3), gamma=3, prefill=0.1, relax=3.0,
                                independent=True, trace=trace)
    n_pre = 2  # round(0.1 * 16)
    assert stats.tokens == 3 * 16 and stats.target_forwards <= n_pre + math.ceil((16 - n_pre) / 3)
    assert stats.resampled == stats.drafted - stats.accepted > 0  # every rejected draft was replaced
    steps = torch.stack([c["frontier"] for c in trace] + [torch.full((3,), 16)]).diff(dim=0)
    for c, step in zip(trace, steps):  # 3 cells per cycle, 4 when all three drafts were accepted, clipped at the end
        full = torch.where(c["accepted"] == 3, 4, 3)
        assert torch.equal(torch.where(c["active"], torch.minimum(full, 16 - c["frontier"]), 0), step)
    for i in range(3):
        alone, _ = generate_cspd(target, drafter, labels[i : i + 1], CFG, _streams(3, 1, first=i), gamma=3, prefill=0.1,
                                 relax=3.0, independent=True)
        assert torch.allclose(both[i], alone[0], atol=1e-4), i
    _, same = generate_cspd(target, target, labels, CFG, _streams(1, 3), gamma=4, prefill=0.0, independent=True)
    assert same.accepted == same.drafted and same.resampled == 0


def test_fixed_variance_makes_the_std_product_exact(models):
    """With a fixed variance two different heads on one schedule have identical per-step stds: the surrogate's
    std-product term is exactly 0 in log space (with learned variances it is not)."""
    _, target, drafter = models
    z = torch.randn(5, target.config.dim)
    zd = torch.randn(5, drafter.config.dim)
    noise = torch.randn(len(target.head.sampling) + 1, 5, 2)
    learned = target.head.sample(z, noise=noise)["log_std_prefix"] - drafter.head.sample(zd, noise=noise)["log_std_prefix"]
    assert learned.abs().max() > 1e-3
    for variance in ("fixed_small", "fixed_large"):
        t, d = copy.deepcopy(target), copy.deepcopy(drafter)
        t.head.config.variance = d.head.config.variance = variance
        a, b = t.head.sample(z, noise=noise), d.head.sample(zd, noise=noise)
        assert torch.equal(a["log_std_prefix"], b["log_std_prefix"]) and torch.equal(a["last_std"], b["last_std"])
        # the reference step uses the same fixed std: beta~ (small) or beta (large) of the step, for every row
        i, sched = len(t.head.sampling) - 1, t.head.sampling
        _, std = t.head.step(noise[0], i, z)
        want = 0.5 * (sched.log_post_var[i] if variance == "fixed_small" else sched.log_beta[i])
        assert torch.allclose(std, torch.full_like(std, math.exp(want)))
    with pytest.raises(MulosdError, match="variance must be one of learned, fixed_small, fixed_large"):
        ContinuousGPTConfig(grid_size=4, dim=16, n_layer=1, n_head=1, token_dim=2, variance="wide")


def test_bad_inputs_are_clear_errors(models):
    kl, target, drafter = models
    labels = torch.tensor([0])
    s = _streams(0, 1)
    with pytest.raises(MulosdError, match="gamma must be an integer >= 1"):
        generate_cspd(target, drafter, labels, CFG, s, gamma=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(MulosdError, match=r"prefill must be a fraction in \[0, 1\]"):
            generate_cspd(target, drafter, labels, CFG, s, gamma=2, prefill=bad)
    other_dim = _model(16, 1, 1, 2, grid=4)
    other_dim.config.token_dim = 3
    with pytest.raises(MulosdError, match="3 dimensions; the target's have 2"):
        generate_cspd(target, other_dim, labels, CFG, s, gamma=2)
    with pytest.raises(MulosdError, match="2x2 grid"):
        generate_cspd(target, _model(16, 1, 1, 2, grid=2), labels, CFG, s, gamma=2)
    with pytest.raises(MulosdError, match="same number"):
        generate_cspd(target, _model(16, 1, 1, 2, steps=4), labels, CFG, s, gamma=2)
    with pytest.raises(MulosdError, match="top-k / top-p"):
        generate_car(target, labels, SamplingConfig(top_k=5), s)
    with pytest.raises(MulosdError, match="temperature > 0"):
        generate_car(target, labels, SamplingConfig(temperature=0.0), s)
    broken = _model(16, 1, 1, 5)
    with torch.no_grad():
        broken.head.out.bias.fill_(float("nan"))
    with pytest.raises(MulosdError, match="NaN"):
        generate_cspd(target, broken, labels, CFG, s, gamma=2, prefill=0.0)


def test_toy_bias_measurement_limits():
    """The docs/CSPD.md bias table's machinery: identical aligned chains accept everything and reproduce p exactly
    (the same draws); alignment raises acceptance; the paper's ratio stays within sampling noise of p where the
    relaxed one does not have to."""
    from mulosd.evaluation.cspd_toy import BASE, MixtureChain, cspd_step, schedule

    sched = schedule(10)
    same = cspd_step(BASE, BASE, 20000, sched)
    assert same["acceptance"] == 1.0 and same["tv_cspd"] == same["tv_draft"]
    wider = MixtureChain((0.6, 0.4), (-1.0, 1.2), (0.65, 0.39))
    on = cspd_step(BASE, wider, 20000, sched)
    off = cspd_step(BASE, wider, 20000, sched, align=False)
    assert on["acceptance"] > off["acceptance"]
    assert on["tv_cspd"] < 2 * on["tv_floor"] < on["tv_draft"]


def test_pack_and_generate_through_the_cli(models, tmp_path):
    """A model set with a continuous family: packed with --from, then `mulosd generate --method car / cspd`."""
    from click.testing import CliRunner

    from mulosd.cli import main
    from mulosd.pipeline import Pipeline

    kl, target, drafter = models
    for name, m in (("kl", kl), ("t", target), ("d", drafter)):
        m.save_pretrained(tmp_path / name)
    runner = CliRunner()
    res = runner.invoke(main, ["pack", "--from", "fmnist-32", "--out", str(tmp_path / "set"), "--dtype", "fp32",
                               "--continuous-tokenizer", str(tmp_path / "kl"), "--continuous-target", str(tmp_path / "t"),
                               "--continuous-drafter", f"small={tmp_path / 'd'}"])
    assert res.exit_code == 0, res.output
    pipe = Pipeline.from_pretrained(str(tmp_path / "set"))
    assert pipe.continuous is not None and set(pipe.continuous.drafters) == {"small"}
    out = pipe([1, 7], method="cspd", gamma=2, prefill=0.25, seed=0, cfg_scale=2.0, batch_size=2)
    assert out.images.shape == (2, 1, 8, 8) and out.tokens.shape == (2, 4, 4, 2)
    st = out.stats
    assert st["drafter_forwards"] > 0 and 0 <= st["acceptance_rate"] <= 1 and "class_accuracy" in st
    assert st["counts"]["residual_tries"] >= st["counts"]["resampled"]
    car = pipe([1, 7], method="car", seed=0, cfg_scale=2.0)
    full = pipe([1, 7], method="cspd", prefill=1.0, seed=0, cfg_scale=2.0)
    assert torch.equal(car.tokens, full.tokens)
    res = runner.invoke(main, ["generate", "--model", str(tmp_path / "set"), "--method", "cspd", "--classes", "3",
                               "--num-per-class", "1", "--gamma", "2", "--no-align", "--relax", "42",
                               "--out", str(tmp_path / "g.png"), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["generate", "--model", str(tmp_path / "set"), "--method", "cspd", "--classes", "3",
                               "--num-per-class", "1", "--independent", "--relax", "42", "--out", str(tmp_path / "i.png"),
                               "--stats-json", str(tmp_path / "i.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    import json
    st = json.loads((tmp_path / "i.json").read_text())
    assert st["params"]["independent"] is True and st["target_forwards_per_image"] < 16
    for bad, msg in ((["--gamma", "0"], "gamma must be an integer >= 1"), (["--prefill", "2"], "prefill must be a number in"),
                     (["--relax", "0.5"], "relax must be a number in"), (["--top-k", "3"], "top-k / top-p")):
        res = runner.invoke(main, ["generate", "--model", str(tmp_path / "set"), "--method", "cspd", "--classes", "3",
                                   "--num-per-class", "1", "--out", str(tmp_path / "g.png"), "--no-progress", *bad])
        assert res.exit_code != 0 and msg in res.output, res.output
    # a set without the continuous family says what is missing
    with pytest.raises(MulosdError, match="no continuous-token models"):
        Pipeline(pipe.tokenizer, pipe.target, pipe.classifier)([1], method="car")
