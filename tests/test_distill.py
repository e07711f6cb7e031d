"""`mulosd train distill`: a drafter distilled from its target on the target's own samples (issue 20)."""

import json

import pytest
import torch
from click.testing import CliRunner

from mulosd.cli import DIVERGENCE_CHOICES, main
from mulosd.decoding.methods import get_method
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, process_logits


@pytest.fixture
def tiny_set(tmp_path):
    """A tiny random c2i set (4 x 4 grid, 32 codes): a peaked target, a same-grid drafter 'small' that disagrees
    with it, and a low-resolution drafter 'r2'."""
    from mulosd.models.gpt import GPT, GPTConfig
    from mulosd.models.vq import VQConfig, VQModel
    from mulosd.pipeline import Pipeline

    torch.manual_seed(0)
    tok = VQModel(VQConfig(in_channels=1, channels=8, z_channels=8, codebook_size=32, codebook_dim=4))
    target = GPT(GPTConfig(vocab_size=32, grid_size=4, dim=16, n_layer=2, n_head=2, num_classes=2))
    small = GPT(GPTConfig(vocab_size=32, grid_size=4, dim=16, n_layer=1, n_head=2, num_classes=2))
    low = GPT(GPTConfig(vocab_size=32, grid_size=2, dim=16, n_layer=1, n_head=2, num_classes=2))
    with torch.no_grad():
        target.output.weight.normal_(0, 1.0)
    Pipeline(tok, target, drafters={"small": small, "r2": low}, class_names=("a", "b"),
             name="tiny").save_pretrained(tmp_path / "set")
    return tmp_path / "set"


def _distill(args):
    return CliRunner().invoke(main, ["train", "distill", "--threads", "1", "--batch-size", "4", "--warmup", "1",
                                     "--checkpoint-every", "2", "--samples", "24", *args])


def test_distillation_lowers_the_held_out_kl_and_raises_expected_acceptance(tmp_path, tiny_set):
    r = _distill(["--model", str(tiny_set), "--out", str(tmp_path / "run"), "--steps", "40", "--lr", "3e-3",
                  "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]
    assert ev["held_out_samples"] == 2
    before, after = ev["start"], ev["distilled"]
    assert after["kl_per_token"] < 0.8 * before["kl_per_token"]  # measured on samples never trained on
    assert after["expected_acceptance"] > before["expected_acceptance"]


def _killed_at(monkeypatch, recipe, step):
    """Make ``recipe``'s loss raise at training step ``step``, as if the process were killed there."""
    loss = recipe.loss

    def dying(self, model, index, s, gen):
        if s == step:
            raise KeyboardInterrupt("killed")
        return loss(self, model, index, s, gen)

    monkeypatch.setattr(recipe, "loss", dying)


def test_a_killed_run_resumes_to_the_same_weights_and_the_drafter_joins_the_set_exactly(tmp_path, tiny_set,
                                                                                       monkeypatch):
    from mulosd.models.gpt import GPT
    from mulosd.pipeline import Pipeline
    from mulosd.training.recipes import DistillRecipe

    common = ["--model", str(tiny_set), "--steps", "5", "--warmup", "2"]
    r = _distill([*common, "--out", str(tmp_path / "straight"), "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    with monkeypatch.context() as m:
        _killed_at(m, DistillRecipe, 3)  # after the checkpoint of step 2
        r = _distill([*common, "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and not (tmp_path / "run" / "model.json").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    r = _distill([*common, "--out", str(tmp_path / "run"), "--resume"])
    assert r.exit_code == 0, r.output
    assert "added drafter_small_2 as drafter 'small'" in r.output
    resumed = GPT.from_pretrained(tmp_path / "run" / "model").state_dict()
    straight = GPT.from_pretrained(tmp_path / "straight" / "model").state_dict()
    assert all(torch.equal(w, straight[k]) for k, w in resumed.items())
    assert json.loads((tiny_set / "manifest.json").read_text())["drafters"]["small"] == "drafter_small_2"
    pipe = Pipeline.from_pretrained(str(tiny_set))
    cfg = SamplingConfig(temperature=0.0, cfg_scale=2.0)  # sd with the distilled drafter: AR's tokens, greedy
    labels = torch.tensor([0, 1, 1])
    ar, _ = get_method("ar")(pipe).generate(labels, cfg, RandomStreams.from_seed(0, range(3)))
    sd, _ = get_method("sd")(pipe).generate(labels, cfg, RandomStreams.from_seed(0, range(3)))
    assert torch.equal(ar, sd)


def test_the_losses_are_the_divergences_they_name(tmp_path, tiny_set):
    from mulosd.training.recipes import DIVERGENCES, DistillRecipe

    assert DIVERGENCE_CHOICES == DIVERGENCES
    recipe = DistillRecipe(model=str(tiny_set), samples_dir=str(tmp_path / "s"), num_samples=6, half_weight=0.0)
    model = recipe.build_model()
    index = torch.arange(4)
    fkl, m = recipe.loss(model, index, 0, None)
    d = recipe._distributions(model, index)
    p, q = d["lp"].exp(), d["lq"].exp()
    tokens, labels = recipe.tokens[index], recipe.labels[index]  # the distributions sd samples from, step by step
    with torch.no_grad():
        rows = model(recipe.target.with_null(labels), torch.cat([tokens, tokens]))
    want = process_logits(rows, recipe.cfg, predicts=torch.arange(tokens.shape[1]))
    assert torch.allclose(q, want, atol=1e-6)
    assert torch.allclose(fkl, (p * (p.log() - q.log())).sum(-1).mean(), atol=1e-5)
    recipe.divergence = "tvd"
    tvd, _ = recipe.loss(model, index, 0, None)
    assert torch.allclose(tvd, 0.5 * (p - q).abs().sum(-1).mean(), atol=1e-5)  # 1 - sum min(p, q)
    assert m["accept"] == pytest.approx(1 - tvd.item(), abs=1e-4)
    assert torch.equal(DistillRecipe.kl(d["lp"], d["lp"]), torch.zeros_like(p[..., 0]))
    plain = DistillRecipe(model=str(tiny_set), samples_dir=str(tmp_path / "s1"), num_samples=6, cfg_scale=1.0)
    assert plain._distributions(model, index)["lq"].shape == (4, 16, 32)  # no CFG: no null-condition rows


@pytest.mark.parametrize("args, message", [
    (["--model", "fmnist-32", "--add-to-set"], "is shipped with mulosd and is not written"),
    (["--model", "{set}", "--data-dir", "{tmp}"], "--data-dir and --limit do not apply"),
    (["--model", "{set}", "--drafter", "r2"], "a low-resolution drafter is not token-aligned"),
    (["--model", "{set}", "--drafter", "big"], "has no drafter 'big'; allowed: r2, small"),
    (["--model", "{set}", "--divergence", "js"], "Invalid value for '--divergence'"),
    (["--model", "{set}", "--samples", "1"], "Invalid value for '--samples'"),
    (["--model", "{set}", "--positions", "4"], "--positions apply only with --continuous"),
    (["--model", "{set}", "--chain", "aligned"], "--chain apply only with --continuous"),
    (["--model", "{set}", "--resume"], "checkpoint.pt does not exist"),
])
def test_bad_train_distill_input_is_one_line_and_no_run(tmp_path, tiny_set, args, message):
    args = [a.format(set=tiny_set, tmp=tmp_path) for a in args]
    r = _distill([*args, "--out", str(tmp_path / "run"), "--steps", "1"])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "run").exists()


# ---- the continuous family (cspd's drafter) ------------------------------------------------------------------------
def _cmodel(dim, layers, seed, tokenizer_id, clip=5.0, variance="fixed_small"):
    from mulosd.models.cgpt import ContinuousGPT, ContinuousGPTConfig

    torch.manual_seed(seed)
    cfg = ContinuousGPTConfig(grid_size=4, dim=dim, n_layer=layers, n_head=2, token_dim=2, head_width=16,
                              head_depth=1, diffusion_steps=60, sample_steps=5, tokenizer_id=tokenizer_id,
                              num_classes=2, clip_x0=clip, variance=variance)
    m = ContinuousGPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random heads start with zero outputs: shake them so each is its own function
        for p in m.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def test_trajectory_kl_follows_the_teachers_chain_and_measures_a_known_offset():
    import copy

    from mulosd.models.diffusion import trajectory_kl

    teacher = _cmodel(16, 1, 0, "", clip=0.0).head
    base = teacher.net  # tamed: noise predicted near x keeps x0 and the chain O(1), so float32 keeps its digits
    teacher.net = lambda x, t, zz: (x + 0.01 * base(x, t, zz)[0], base(x, t, zz)[1])
    student = copy.deepcopy(teacher)
    z = torch.randn(6, 16)
    noise = torch.randn(len(teacher.sampling) + 1, 3, 2)
    same = trajectory_kl(teacher, student, z, z, noise, cfg_scale=2.0)
    assert torch.allclose(same["kl"], torch.zeros(3), atol=1e-6) and torch.allclose(same["last_gap"], torch.zeros(3))
    s = teacher.sampling
    net = student.net
    for steps, temperature in (([0], 1.0), (list(range(len(s) - 1)), 1.0), (list(range(len(s) - 1)), 0.7)):
        delta = 0.05  # the student's predicted noise off by delta in every dimension at reverse steps `steps` only
        offset = torch.zeros(teacher.config.train_steps + 1)
        offset[s.timesteps[steps]] = delta
        student.net = lambda x, t, zz: (net(x, t, zz)[0] + offset[t][:, None], net(x, t, zz)[1])
        got = trajectory_kl(teacher, student, z, z, noise, cfg_scale=2.0, temperature=temperature)["kl"]
        # guidance keeps the offset (delta + 2 (delta - delta)); the mean moves by c0 k_inv k_noise delta, the fixed
        # small std is temperature x sqrt(post_var): KL = 2 dimensions x shift^2 / (2 std^2)
        want = sum(2 * (s.c0[i] * s.k_inv[i] * s.k_noise[i] * delta) ** 2 / (2 * temperature**2 * s.post_var[i].item())
                   for i in steps)
        assert torch.allclose(got, torch.full((3,), want), rtol=1e-3), (steps, temperature)
        aligned = trajectory_kl(teacher, student, z, z, noise, cfg_scale=2.0, temperature=temperature, aligned=True)
        if steps == [0]:  # an error at the last step only leaves no drift: both chains agree up to it
            assert torch.allclose(aligned["kl"], got, rtol=1e-3)
        else:  # earlier errors move the student's own chain, and the drift is charged at every later step
            assert (aligned["kl"] > 1.01 * got).all(), (aligned["kl"], got)
    student.net = net
    same = trajectory_kl(teacher, student, z, z, noise, cfg_scale=2.0, aligned=True)
    assert torch.allclose(same["kl"], torch.zeros(3), atol=1e-6)


@pytest.fixture
def continuous_set(tmp_path):
    """fmnist-32's discrete family with a tiny continuous one: a random target and a smaller random drafter."""
    from mulosd.models.kl import KLAutoencoder, KLConfig

    kl = KLAutoencoder(KLConfig(channels=8, z_channels=8, token_dim=2)).eval()
    kl.save_pretrained(tmp_path / "kl")
    _cmodel(32, 2, 0, kl.fingerprint()).save_pretrained(tmp_path / "t")
    _cmodel(16, 1, 1, kl.fingerprint()).save_pretrained(tmp_path / "d")
    r = CliRunner().invoke(main, ["pack", "--from", "fmnist-32", "--out", str(tmp_path / "set"), "--dtype", "fp32",
                                  "--continuous-tokenizer", str(tmp_path / "kl"), "--continuous-target",
                                  str(tmp_path / "t"), "--continuous-drafter", f"small={tmp_path / 'd'}"])
    assert r.exit_code == 0, r.output
    return tmp_path / "set"


def test_continuous_distillation_lowers_the_path_kl_resumes_and_joins_the_set(tmp_path, continuous_set, monkeypatch):
    from mulosd.models.cgpt import ContinuousGPT
    from mulosd.pipeline import Pipeline

    common = ["--model", str(continuous_set), "--continuous", "--positions", "4", "--samples", "12"]
    r = _distill([*common, "--out", str(tmp_path / "long"), "--steps", "40", "--lr", "3e-3", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "long" / "summary.json").read_text())["eval"]
    before, after = ev["start"], ev["distilled"]
    assert after["path_kl_per_token"] < 0.8 * before["path_kl_per_token"]  # held-out samples
    assert after["median_aligned_gap_sigmas"] < before["median_aligned_gap_sigmas"]
    assert 0 <= before["expected_acceptance"] <= 1 and 0 <= after["expected_acceptance"] <= 1
    r = _distill([*common, "--out", str(tmp_path / "straight"), "--steps", "4", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    r = _distill([*common, "--out", str(tmp_path / "run"), "--steps", "4", "--no-add-to-set", "--chain", "aligned"])
    assert r.exit_code == 0, r.output
    aligned = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]["start"]  # evaluated teacher-forced
    straight_ev = json.loads((tmp_path / "straight" / "summary.json").read_text())["eval"]["start"]
    assert aligned == straight_ev
    from mulosd.training.recipes import ContinuousDistillRecipe

    with monkeypatch.context() as m:
        _killed_at(m, ContinuousDistillRecipe, 3)
        r = _distill([*common, "--out", str(tmp_path / "killed"), "--steps", "4"])
    assert r.exit_code != 0
    r = _distill([*common, "--out", str(tmp_path / "killed"), "--steps", "4", "--resume"])
    assert r.exit_code == 0, r.output
    assert "added continuous_drafter_small_2 as continuous drafter 'small'" in r.output
    resumed = ContinuousGPT.from_pretrained(tmp_path / "killed" / "model").state_dict()
    straight = ContinuousGPT.from_pretrained(tmp_path / "straight" / "model").state_dict()
    assert all(torch.equal(w, straight[k]) for k, w in resumed.items())
    assert json.loads((continuous_set / "manifest.json").read_text())["continuous"]["drafters"]["small"] == \
        "continuous_drafter_small_2"
    pipe = Pipeline.from_pretrained(str(continuous_set))
    joined = pipe.continuous_models().drafters["small"].state_dict()
    assert all(torch.equal(w.float(), straight[k]) for k, w in joined.items())  # the set holds the distilled weights
    car = pipe([1, 0], method="car", seed=0, cfg_scale=2.0)
    full = pipe([1, 0], method="cspd", prefill=1.0, seed=0, cfg_scale=2.0)  # prefill 1 is the target alone
    assert torch.equal(car.tokens, full.tokens)
    out = pipe([1, 0], method="cspd", gamma=2, prefill=0.0, seed=0, cfg_scale=2.0)  # the distilled drafter drafts
    assert out.tokens.shape == (2, 4, 4, 2) and torch.isfinite(out.tokens).all()
    assert out.stats["drafter_forwards"] > 0
