import pickle

import pytest
import torch
from safetensors.torch import save_file

from mulosd.errors import MulosdError
from mulosd.models.gpt import GPT, GPTConfig
from mulosd.models.llamagen import LLAMAGEN_SIZES, llamagen_config, load_llamagen_gpt

CFG = GPTConfig(vocab_size=64, grid_size=4, dim=48, n_layer=2, n_head=3, multiple_of=32, num_classes=5)


def llamagen_state(model: GPT) -> dict:
    """A state dict exactly as LlamaGen's gpt.py lays it out, plus the strays its files can carry."""
    sd = dict(model.state_dict())
    expected_keys = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight", "norm.weight", "output.weight"}
    for i in range(CFG.n_layer):
        expected_keys |= {f"layers.{i}.attention.wqkv.weight", f"layers.{i}.attention.wo.weight",
                          f"layers.{i}.feed_forward.w1.weight", f"layers.{i}.feed_forward.w2.weight",
                          f"layers.{i}.feed_forward.w3.weight", f"layers.{i}.attention_norm.weight",
                          f"layers.{i}.ffn_norm.weight"}
    assert set(sd) == expected_keys  # our own layout is LlamaGen's
    assert sd["layers.0.attention.wqkv.weight"].shape == (3 * CFG.dim, CFG.dim)
    sd["freqs_cis"] = torch.zeros(17, 6, 2)
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 3, 24, 16)
    return sd


@pytest.mark.parametrize("container", ["model", "module", "state_dict", None])
def test_roundtrip_torch_containers(tmp_path, container):
    src = GPT(CFG).eval()
    sd = llamagen_state(src)
    torch.save({container: sd, "steps": 100} if container else sd, tmp_path / "ckpt.pt")
    loaded = load_llamagen_gpt(tmp_path / "ckpt.pt", CFG)
    labels, toks = torch.tensor([0, 5]), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(src(labels, toks), loaded(labels, toks))


def test_roundtrip_safetensors_and_dict_config(tmp_path):
    src = GPT(CFG)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "m.safetensors")
    loaded = load_llamagen_gpt(tmp_path / "m.safetensors", vars(CFG))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))


def test_mismatches_are_errors(tmp_path):
    sd = llamagen_state(GPT(CFG))
    path = tmp_path / "x.pt"
    bad = dict(sd)
    bad.pop("layers.1.ffn_norm.weight")
    torch.save(bad, path)
    with pytest.raises(MulosdError, match="missing keys"):
        load_llamagen_gpt(path, CFG)
    bad = dict(sd, **{"layers.0.extra.weight": torch.zeros(1)})
    torch.save(bad, path)
    with pytest.raises(MulosdError, match="unexpected keys"):
        load_llamagen_gpt(path, CFG)
    torch.save(sd, path)
    with pytest.raises(MulosdError, match="vocab_size"):
        load_llamagen_gpt(path, GPTConfig(**{**vars(CFG), "vocab_size": 65}))
    with pytest.raises(MulosdError, match="n_layer"):
        load_llamagen_gpt(path, GPTConfig(**{**vars(CFG), "n_layer": 3}))
    bad = dict(sd, **{"layers.1.attention.wo.weight": torch.zeros(48, 47)})
    torch.save(bad, path)
    with pytest.raises(MulosdError, match="shape"):
        load_llamagen_gpt(path, CFG)


def test_t2i_and_pickled_objects_rejected(tmp_path):
    sd = llamagen_state(GPT(CFG))
    sd["cls_embedding.cap_proj.fc1.weight"] = torch.zeros(48, 2048)
    torch.save(sd, tmp_path / "t2i.pt")
    with pytest.raises(MulosdError, match="t2i"):
        load_llamagen_gpt(tmp_path / "t2i.pt", CFG)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(MulosdError, match="weights_only"):
        load_llamagen_gpt(tmp_path / "evil.pt", CFG)


def test_named_sizes():
    cfg = llamagen_config("GPT-B", grid_size=16)
    assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.ffn_hidden) == (12, 12, 768, 2048)
    assert llamagen_config("GPT-XL", grid_size=24).ffn_hidden == 3584
    # parameter count of GPT-B c2i (111 M per the LlamaGen README), computed from shapes without allocating
    c = cfg
    params = 16384 * 768 * 2 + 1001 * 768 + 768 + c.n_layer * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768)
    assert 110e6 < params < 112e6
    with pytest.raises(MulosdError, match="unknown LlamaGen size"):
        llamagen_config("GPT-Q", grid_size=16)
    assert "GPT-3B" in LLAMAGEN_SIZES


def test_checkpoint_as_llamagen_training_writes_it(tmp_path):
    """LlamaGen's train_c2i.py saves {"model", "optimizer", "steps", "args"} with args an argparse.Namespace: read
    safely (the Namespace is the one allowed class), anything else pickled is still refused by name."""
    import argparse

    gpt = GPT(CFG)
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gpt(torch.tensor([1]), torch.zeros(1, CFG.grid_size**2, dtype=torch.long)).sum().backward()
    opt.step()
    args = argparse.Namespace(gpt_model="GPT-B", image_size=256, downsample_size=16, cls_token_num=1, lr=1e-4,
                              results_dir="results", mixed_precision="bf16", no_compile=False, ema=None,
                              betas=[0.9, 0.95])
    torch.save({"model": llamagen_state(gpt), "optimizer": opt.state_dict(), "steps": 7, "args": args},
               tmp_path / "0000007.pt")
    loaded = load_llamagen_gpt(tmp_path / "0000007.pt", CFG)
    for a, b in zip(loaded.state_dict().values(), gpt.state_dict().values()):
        assert torch.equal(a, b)

    import fractions  # a class LlamaGen does not store: refused, and the message lists what is allowed

    torch.save({"model": llamagen_state(gpt), "args": fractions.Fraction(1, 3)}, tmp_path / "other.pt")
    with pytest.raises(MulosdError, match="allowed in a checkpoint: .*argparse.Namespace"):
        load_llamagen_gpt(tmp_path / "other.pt", CFG)
