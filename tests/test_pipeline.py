import pytest
import torch

from mulosd import Pipeline
from mulosd.errors import MulosdError
from mulosd.models.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("fmnist-32")


def test_shipped_set_is_consistent(pipe):
    t = pipe.target.config
    assert t.grid_size == 16 and t.vocab_size == pipe.tokenizer.config.codebook_size
    assert pipe.drafters["r2"].config.grid_size == 8 and pipe.drafters["r4"].config.grid_size == 4
    for role in ("r2", "r4"):  # same architecture and size as the target
        d = pipe.drafters[role].config
        assert (d.n_layer, d.dim, d.n_head) == (t.n_layer, t.dim, t.n_head)
    assert pipe.drafters["small"].config.grid_size == 16
    assert sum(p.numel() for p in pipe.drafters["small"].parameters()) < 0.2 * sum(p.numel() for p in pipe.target.parameters())


def test_greedy_is_deterministic_and_batch_invariant(pipe):
    kw = dict(classes=[7, 1], num_per_class=2, temperature=0.0, cfg_scale=2.0)
    a = pipe(batch_size=4, **kw)
    b = pipe(batch_size=4, **kw)
    c = pipe(batch_size=1, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert torch.equal(a.tokens[0], a.tokens[1])  # greedy: same class -> same image, whatever the seed stream


def test_same_seed_same_images(pipe):
    kw = dict(classes="sneaker,bag", num_per_class=2, seed=5, top_k=50, top_p=0.95)
    a, b = pipe(batch_size=3, **kw), pipe(batch_size=2, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
    assert not torch.equal(a.tokens, pipe(**{**kw, "seed": 6}).tokens)


def test_stats_and_images(pipe):
    out = pipe(classes=[0], num_per_class=2, batch_size=2)
    s = out.stats
    for key in ("method", "num_images", "batch_size", "wall_time_s", "tokens_per_image", "target_forwards",
                "drafter_forwards", "step_compression", "class_accuracy"):
        assert key in s
    assert "mean_accepted_length" not in s  # the same number as step_compression: one name only
    assert (s["method"], s["num_images"], s["tokens_per_image"], s["drafter_forwards"]) == ("ar", 2, 256, 0)
    assert s["step_compression"] == 1.0 and s["target_forwards"] == 256 and s["target_forwards_per_image"] == 256
    assert out.predictions.shape == (2,) and s["class_accuracy"] == (out.predictions == out.labels).float().mean().item()
    assert out.images.shape == (2, 1, 32, 32) and 0 <= out.images.min() and out.images.max() <= 1


def test_generate_reuses_one_built_method_and_matches_call(pipe, monkeypatch):
    """``generate`` decodes with a method built once; split into calls at any first_index it gives the images one
    ``pipe(...)`` call gives, and classifies each image once (``classify=False``: not at all)."""
    from mulosd.decoding.methods import get_method
    from mulosd.decoding.sampling import SamplingConfig

    whole = pipe(classes=[7, 2], num_per_class=2, method="sd", gamma=2, seed=3, batch_size=2)
    sd = get_method("sd")(pipe, gamma=2)
    sampling = SamplingConfig(cfg_scale=3.0)
    parts = [pipe.generate(sd, whole.labels[lo:hi], sampling, seed=3, batch_size=2, first_index=lo)
             for lo, hi in ((0, 1), (1, 4))]
    assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
    assert torch.equal(torch.cat([p.predictions for p in parts]), whole.predictions)
    assert parts[1].stats["method"] == "sd" and parts[1].stats["params"] == {"gamma": 2, "drafter": "small"}
    calls = []
    real = type(pipe).classify
    monkeypatch.setattr(type(pipe), "classify", lambda self, images: calls.append(len(images)) or real(self, images))
    out = pipe.generate(sd, torch.tensor([1, 2, 3]), sampling, batch_size=2)
    bare = pipe.generate(sd, torch.tensor([1]), sampling, classify=False)
    assert calls == [3] and out.predictions.shape == (3,) and "class_accuracy" in out.stats
    assert bare.predictions is None and "class_accuracy" not in bare.stats
    with pytest.raises(MulosdError, match="batch_size must be >= 1"):
        pipe.generate(sd, torch.tensor([1]), sampling, batch_size=0)
    with pytest.raises(MulosdError, match="acceptance maps need a method that records its cycles"):
        pipe.generate(sd, torch.tensor([1]), sampling, trace=True)


def test_drafters_sample_alone_at_their_resolution(pipe):
    out = pipe(classes=[1], num_per_class=1, method="ar", model="r2")
    assert out.images.shape[-1] == 16 and out.stats["tokens_per_image"] == 64
    with pytest.raises(MulosdError, match="no model 'r3'"):
        pipe(classes=[1], method="ar", model="r3")


def test_target_samples_are_recognisable(pipe):
    """Quality regression guard on a small sample (the full measurement lives in docs/MODELS.md)."""
    out = pipe(classes=list(range(10)), num_per_class=3, batch_size=10, seed=1, cfg_scale=3.0)
    assert out.stats["class_accuracy"] >= 0.7


def test_bad_inputs(pipe):
    with pytest.raises(MulosdError, match="unknown class 'cat'"):
        pipe.class_ids("0,cat")
    with pytest.raises(MulosdError, match="out of range"):
        pipe.class_ids([10])
    with pytest.raises(MulosdError, match="num_per_class"):
        pipe(classes=[0], num_per_class=0)
    with pytest.raises(MulosdError, match="unknown method"):
        pipe(classes=[0], method="nope")
    with pytest.raises(MulosdError, match="no parameters"):
        pipe(classes=[0], method="ar", gamma=3)


def test_vocab_mismatch_is_an_error(pipe):
    other = GPT(GPTConfig(vocab_size=100, grid_size=16, dim=32, n_layer=1, n_head=4))
    with pytest.raises(MulosdError, match="vocab_size 100 does not match the tokenizer's codebook size 512"):
        Pipeline(pipe.tokenizer, other)


@pytest.mark.parametrize("batch", [1, 3])
def test_lossless_methods_greedy_token_identical_to_ar_on_fmnist(pipe, batch):
    kw = dict(classes=[0, 5, 9], num_per_class=1, temperature=0.0, cfg_scale=3.0, batch_size=batch)
    ar = pipe(method="ar", **kw)
    for method, params in [("sd", {"gamma": 4}), ("sjd", {}), ("mcsjd", {}), ("mcsjd", {"coupling": "gumbel"})]:
        out = pipe(method=method, **kw, **params)
        assert torch.equal(ar.tokens, out.tokens), method
        assert out.stats["target_forwards_per_image"] < 256


def test_sd_sampling_stats(pipe):
    out = pipe(classes=[7, 8], num_per_class=2, method="sd", gamma=6, batch_size=4, seed=2)
    s = out.stats
    assert 0 < s["acceptance_rate"] < 1 and s["step_compression"] > 1
    assert s["step_compression"] == round(s["counts"]["tokens"] / s["counts"]["active_forwards"], 4)
    assert s["params"] == {"gamma": 6, "drafter": "small"}
    with pytest.raises(MulosdError, match="gamma must be an integer >= 1"):
        pipe(classes=[0], method="sd", gamma=0)
    with pytest.raises(MulosdError, match="works on a 8x8 grid"):
        pipe(classes=[0], method="sd", drafter="r2")


def test_drafter_vocab_mismatch_is_an_error(pipe):
    other = GPT(GPTConfig(vocab_size=100, grid_size=16, dim=32, n_layer=1, n_head=4))
    with pytest.raises(MulosdError, match="small model vocab_size 100 does not match"):
        Pipeline(pipe.tokenizer, pipe.target, drafters={"small": other})


@pytest.mark.parametrize("method", ["sjd", "mcsjd", "lantern", "gsd", "zipar"])
def test_every_method_runs_at_batch_1_and_8(pipe, method):
    for batch in (1, 8):
        out = pipe(classes=[3], num_per_class=batch, method=method, batch_size=batch, seed=1)
        assert out.tokens.shape == (batch, 16, 16) and out.stats["step_compression"] > 1


def test_shipped_continuous_families():
    """fmnist-32's continuous family (issue 20): 8x8 tokens of 16 channels, drafters of the same family 2-5x smaller
    than the target; the earlier family stays loadable as fmnist-32-c16, which shares fmnist-32's discrete files."""
    from mulosd.io import weights_fingerprint

    def size(m):
        return sum(p.numel() for p in m.parameters())

    cont = Pipeline.from_pretrained("fmnist-32").continuous_models()
    t = cont.target.config
    assert (t.grid_size, t.token_dim, t.sample_steps, t.variance) == (8, 16, 10, "fixed_small")
    assert set(cont.drafters) == {"small", "distilled"}
    for d in cont.drafters.values():
        c = d.config
        assert (c.grid_size, c.token_dim, c.tokenizer_id, c.sample_steps) == (8, 16, t.tokenizer_id, 10)
        assert 2 <= size(cont.target) / size(d) <= 5
    old = Pipeline.from_pretrained("fmnist-32-c16")
    assert old.name == "fmnist-32-c16"
    c16 = old.continuous_models()
    assert (c16.target.config.grid_size, c16.target.config.token_dim) == (16, 4) and set(c16.drafters) == {"small"}
    new = Pipeline.from_pretrained("fmnist-32")
    for a, b in ((old.target, new.target), (old.tokenizer, new.tokenizer), (old.classifier, new.classifier)):
        assert weights_fingerprint(*a.state_dict().values()) == weights_fingerprint(*b.state_dict().values())


@pytest.mark.parametrize("drafter", ["small", "distilled"])
def test_cspd_with_the_shipped_drafters_keeps_its_limiting_cases(pipe, drafter):
    """prefill 1 is car token for token; the target drafting for itself with aligned noises accepts every draft."""
    car = pipe([3, 8], method="car", seed=4)
    full = pipe([3, 8], method="cspd", drafter=drafter, prefill=1.0, seed=4)
    assert torch.equal(car.tokens, full.tokens)
    out = pipe([3, 8], method="cspd", drafter=drafter, gamma=2, seed=4)
    assert out.stats["drafter_forwards"] > 0 and torch.isfinite(out.tokens).all()
    own = pipe([3, 8], method="cspd", drafter="target", gamma=2, seed=4)
    assert own.stats["acceptance_rate"] == 1.0
