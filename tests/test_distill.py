"""`mulosd train distill`: a drafter distilled from its target on the target's own samples (issue 20)."""

import json

import pytest
import torch
from click.testing import CliRunner

from mulosd.cli import DIVERGENCE_CHOICES, main
from mulosd.decoding.methods import get_method
from mulosd.decoding.sampling import RandomStreams, SamplingConfig


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


def test_a_killed_run_resumes_to_the_same_weights_and_the_drafter_joins_the_set_exactly(tmp_path, tiny_set):
    from mulosd.models.gpt import GPT
    from mulosd.pipeline import Pipeline

    common = ["--model", str(tiny_set)]
    r = _distill([*common, "--out", str(tmp_path / "run"), "--steps", "2", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    r = _distill([*common, "--out", str(tmp_path / "run"), "--steps", "4", "--resume"])
    assert r.exit_code == 0, r.output
    assert "added drafter_small_2 as drafter 'small'" in r.output
    r = _distill([*common, "--out", str(tmp_path / "straight"), "--steps", "4", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
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
    p, q = d["p"], d["q"]
    assert torch.allclose(fkl, (p * (p.log() - q.log())).sum(-1).mean(), atol=1e-5)
    recipe.divergence = "tvd"
    tvd, _ = recipe.loss(model, index, 0, None)
    assert torch.allclose(tvd, 0.5 * (p - q).abs().sum(-1).mean(), atol=1e-5)  # 1 - sum min(p, q)
    assert m["accept"] == pytest.approx(1 - tvd.item(), abs=1e-4)
    assert torch.equal(DistillRecipe.kl(p, p), torch.zeros_like(p[..., 0]))


@pytest.mark.parametrize("args, message", [
    (["--model", "fmnist-32", "--add-to-set"], "is shipped with mulosd and is not written"),
    (["--model", "{set}", "--data-dir", "{tmp}"], "--data-dir and --limit do not apply"),
    (["--model", "{set}", "--drafter", "r2"], "a low-resolution drafter is not token-aligned"),
    (["--model", "{set}", "--drafter", "big"], "has no drafter 'big'; allowed: r2, small"),
    (["--model", "{set}", "--divergence", "js"], "Invalid value for '--divergence'"),
    (["--model", "{set}", "--samples", "1"], "Invalid value for '--samples'"),
])
def test_bad_train_distill_input_is_one_line_and_no_run(tmp_path, tiny_set, args, message):
    args = [a.format(set=tiny_set, tmp=tmp_path) for a in args]
    r = _distill([*args, "--out", str(tmp_path / "run"), "--steps", "1"])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "run").exists()
