"""EAGLE-2: exactness of tree verification (enumeration), greedy identity with AR, the tree attention mask, the
head's training pass against its cached decoding, and the refusals."""

import pytest
import torch

from mulosd.decoding.eagle import TreeProposer, TreeScorer, eagle_parts
from mulosd.decoding.engine import decode
from mulosd.decoding.rules import verify_tree
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, process_logits
from mulosd.decoding.window import generate_ar
from mulosd.errors import MulosdError
from mulosd.models.eagle import EagleHead, head_logits
from toys import assert_matches_distribution, sequence_distribution, toy


def toy_head(target, seed=0, std=0.3):
    head = EagleHead.for_target(target).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * std)
    return head


def run(target, head, labels, cfg, depth, topk, tokens, seed=0):
    return decode(eagle_parts(target, head, depth, topk, tokens), labels, cfg,
                  RandomStreams.from_seed(seed, range(len(labels))))


def test_verify_tree_follows_the_tree_while_the_target_agrees():
    """Root with children (tokens 2, 0, 3), child 0 with one child (token 1): the first token follows p exactly, and
    the walk continues only through a matching child."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    n = 200_000
    P = torch.zeros(n, 5, 4)
    P[:, 0] = p
    P[:, 1:] = 0.25
    tokens = torch.tensor([0, 2, 0, 3, 1]).expand(n, -1)
    children = torch.tensor([[1, 2, 3], [4, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]).expand(n, -1, -1)
    v = verify_tree(P, tokens, children, torch.rand(n, 3, generator=torch.Generator().manual_seed(0)))
    first = torch.where(v.num_accepted > 0, tokens.gather(1, v.path[:, :1].clamp_min(0))[:, 0], v.next_token)
    assert torch.allclose(torch.bincount(first, minlength=4).float() / n, p, atol=4e-3)
    assert set(v.num_accepted.tolist()) == {0, 1, 2}
    # accepted path 1 -> 4 exactly when the second draw hit token 1 (p = 0.25) after the first hit token 2
    two = v.num_accepted == 2
    assert bool((v.path[two] == torch.tensor([1, 4])).all()) and abs(two.float().mean().item() - 0.2 * 0.25) < 3e-3
    # no accepted child: the next token is the draw itself, never one of the children
    none = v.num_accepted == 0
    assert set(v.next_token[none].tolist()) <= {1}


@pytest.mark.parametrize("cfg,shape", [(SamplingConfig(), (2, 2, 4)), (SamplingConfig(cfg_scale=2.0, top_k=2), (3, 2, 5)),
                                       (SamplingConfig(temperature=0.8, top_p=0.9), (2, 3, 9))])
def test_eagle2_samples_the_target_sequence_distribution(cfg, shape):
    target = toy(16, 2, 0)
    head = toy_head(target)
    seqs, want = sequence_distribution(target, 1, cfg)
    n = 10_000
    out, stats = run(target, head, torch.ones(n, dtype=torch.long), cfg, *shape)
    assert_matches_distribution(out, want)
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("batch", [1, 3])
def test_eagle2_greedy_is_token_identical_to_ar(batch):
    target = toy(32, 2, 2, grid=4, vocab=16, std=0.3)
    head = toy_head(target, std=0.05)
    cfg = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    labels = torch.arange(batch) % 2
    ar, _ = generate_ar(target, labels, cfg, RandomStreams.from_seed(0, range(batch)))
    for shape in ((1, 1, 1), (3, 2, 5), (5, 4, 16)):
        out, stats = run(target, head, labels, cfg, *shape)
        assert torch.equal(ar, out), shape
    assert stats.accepted > 0


def test_a_batch_decodes_each_image_as_if_alone():
    target = toy(32, 2, 3, grid=4, vocab=16, std=0.3)
    head = toy_head(target, std=0.05)
    cfg = SamplingConfig(cfg_scale=1.5)
    labels = torch.tensor([0, 1, 1, 0])
    batch, _ = run(target, head, labels, cfg, 3, 3, 8, seed=5)
    for b in range(4):
        alone, _ = decode(eagle_parts(target, head, 3, 3, 8), labels[b : b + 1], cfg, RandomStreams.from_seed(5, [b]))
        assert torch.equal(alone[0], batch[b])


@torch.inference_mode()
def test_tree_forward_equals_separate_forwards_of_each_branch():
    """The target's p after every tree node (one forward, tree mask, spare slots) equals a plain causal forward of
    the committed prefix plus that node's branch; the head's tree steps equal its cached chain along the branch."""
    target = toy(32, 2, 4, grid=4, vocab=16, std=0.3)
    head = toy_head(target, std=0.05)
    cfg = SamplingConfig(cfg_scale=2.0)
    labels = torch.tensor([1, 0])
    parts = eagle_parts(target, head, 3, 3, 9)
    scorer, proposer = parts.scorer, parts.proposer
    state = scorer.start(labels, cfg, RandomStreams.from_seed(0, range(2)))
    state.tokens[:, 1:5] = torch.tensor([[3, 7, 1, 9], [2, 2, 5, 4]])
    # commit a few cells by hand through a plain forward (and the head's catch-up features with it)
    logits, hidden = target.decode(torch.cat([state.tokens[:, :4]] * 2), torch.arange(4).expand(4, -1), hidden=True)
    state.frontier.fill_(5)
    state.cells["features"] = torch.cat([target.prefill(torch.tensor([1, 0, 2, 2]), hidden=True)[1][:, None],
                                         hidden], dim=1)
    proposer.start(state)
    state.n_active = 2
    proposal = proposer.propose(state)
    p, _ = scorer.score(state, proposal)
    depth, anc = proposal.extra["depth"], proposal.extra["ancestors"]
    for b in range(2):
        for j in range(proposal.tokens.shape[1]):
            branch = [j] + [a for a in anc[b, j].tolist() if a >= 0]
            path = [int(proposal.tokens[b, k]) for k in reversed(branch)]
            assert len(path) == int(depth[b, j])
            seq = torch.tensor(state.tokens[b, :5].tolist() + path)
            ref = toy_forward(target, labels[b], seq, cfg)
            assert torch.allclose(p[b, j + 1], ref, atol=1e-5), (b, j)
    proposer.finish()
    scorer.finish()


def toy_forward(target, label, seq, cfg):
    """p after the last token of ``seq`` with a fresh cache and the default causal mask."""
    target.clear_cache()
    target.setup_cache(2)
    target.prefill(torch.tensor([int(label), target.null_class]))
    logits = target.decode(torch.stack([seq, seq]), torch.arange(len(seq)).expand(2, -1))
    target.clear_cache()
    return process_logits(logits[:, -1:], cfg)[0, 0]


def test_head_training_pass_matches_its_cached_steps():
    """The teacher-forced pass (training) and the cached catch-up (decoding) compute the same hidden states."""
    target = toy(32, 2, 5, grid=4, vocab=16, std=0.3)
    head = toy_head(target)
    feats, tokens = torch.randn(1, 6, 32), torch.randint(0, 16, (1, 6))
    with torch.no_grad():
        full = head(feats, tokens)
        head.setup_cache(1, 4)
        cells = torch.arange(6)[None]
        mask = torch.arange(20)[None, None, :] <= cells[:, :, None]
        cached = head.step(feats, tokens, cells, cells, mask[..., :20])
        head.clear_cache()
    assert torch.allclose(full, cached, atol=1e-5)
    assert head_logits(target, full).shape == (1, 6, 16)


def test_a_head_for_another_target_is_refused():
    a, b = toy(32, 2, 6, grid=4, vocab=16), toy(32, 2, 7, grid=4, vocab=16)
    with pytest.raises(MulosdError, match="trained for target .* this model set's target is"):
        EagleHead.for_target(a).check(b)
    EagleHead.for_target(a).check(a)


# ---- mulosd train eagle on a user model set ---------------------------------------------------------------------------
@pytest.fixture
def tiny_set(tmp_path):
    """A tiny random c2i model set (4 x 4 grid, 32 codes) to train a head for."""
    from mulosd.models.gpt import GPT, GPTConfig
    from mulosd.models.vq import VQConfig, VQModel
    from mulosd.pipeline import Pipeline

    torch.manual_seed(0)
    tok = VQModel(VQConfig(in_channels=1, channels=8, z_channels=8, codebook_size=32, codebook_dim=4))
    gpt = GPT(GPTConfig(vocab_size=32, grid_size=4, dim=16, n_layer=2, n_head=2, num_classes=2))
    with torch.no_grad():  # peaked distributions, so that a head has something to learn
        gpt.output.weight.normal_(0, 1.0)
    Pipeline(tok, gpt, class_names=("a", "b"), name="tiny").save_pretrained(tmp_path / "set")
    return tmp_path / "set"


def _train_eagle(args):
    from click.testing import CliRunner

    from mulosd.cli import main

    return CliRunner().invoke(main, ["train", "eagle", "--threads", "1", "--batch-size", "4", "--warmup", "1",
                                     "--checkpoint-every", "2", "--samples", "12", *args])


def test_train_eagle_resumes_joins_the_set_and_decodes_exactly(tmp_path, tiny_set):
    import json

    from mulosd.decoding.methods import get_method
    from mulosd.pipeline import Pipeline

    common = ["--model", str(tiny_set)]
    r = _train_eagle([*common, "--out", str(tmp_path / "run"), "--steps", "2", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "run" / "samples").glob("chunk_*.safetensors"))) == 1
    r = _train_eagle([*common, "--out", str(tmp_path / "run"), "--steps", "4", "--resume"])
    assert r.exit_code == 0, r.output
    assert "added eagle_head to model set" in r.output
    r = _train_eagle([*common, "--out", str(tmp_path / "straight"), "--steps", "4", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    resumed = EagleHead.from_pretrained(tmp_path / "run" / "model")
    straight = EagleHead.from_pretrained(tmp_path / "straight" / "model").state_dict()
    assert all(torch.equal(w, straight[k]) for k, w in resumed.state_dict().items())  # killed + resumed = straight
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval"]["held_out_samples"] == 1 and 0 < summary["eval"]["expected_acceptance"] <= 1
    pipe = Pipeline.from_pretrained(str(tiny_set))
    assert pipe.eagle is not None and json.loads((tiny_set / "manifest.json").read_text())["eagle"] == "eagle_head"
    cfg = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    labels = torch.tensor([0, 1, 1])
    ar, _ = get_method("ar")(pipe).generate(labels, cfg, RandomStreams.from_seed(0, range(3)))
    out, _ = get_method("eagle2")(pipe).generate(labels, cfg, RandomStreams.from_seed(0, range(3)))
    assert torch.equal(ar, out)


@pytest.mark.parametrize("args, message", [
    (["--model", "fmnist-32", "--add-to-set"], "is shipped with mulosd and is not written"),
    (["--model", "{set}", "--data-dir", "{tmp}"], "--data-dir and --limit do not apply"),
    (["--model", "{set}", "--samples", "1"], "Invalid value for '--samples'"),
])
def test_bad_train_eagle_input_is_one_line_and_no_run(tmp_path, tiny_set, args, message):
    args = [a.format(set=tiny_set, tmp=tmp_path) for a in args]
    r = _train_eagle([*args, "--out", str(tmp_path / "run"), "--steps", "1"])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_a_set_refuses_a_head_for_another_target_and_eagle2_needs_one(tmp_path, tiny_set):
    from click.testing import CliRunner

    from mulosd.cli import main
    from mulosd.decoding.methods import get_method
    from mulosd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(str(tiny_set))
    with pytest.raises(MulosdError, match="has no EAGLE head; train one"):
        get_method("eagle2")(pipe)
    other = toy(16, 2, 9, grid=4, vocab=32)
    EagleHead.for_target(other).save_pretrained(tmp_path / "head")
    r = CliRunner().invoke(main, ["pack", "--from", str(tiny_set), "--out", str(tmp_path / "out"),
                                  "--eagle", str(tmp_path / "head")])
    assert r.exit_code == 1 and "trained for target" in r.output and not (tmp_path / "out").exists(), r.output
    with pytest.raises(MulosdError, match="depth must be"):
        get_method("eagle2")(Pipeline.from_pretrained("fmnist-32"), depth=0)
