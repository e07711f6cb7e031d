"""LlamaGen's VQ tokenizer: its checkpoint layout, strict loading, the VQModel interface, quantisation.

The files are written here in LlamaGen's layout (``torch.save({"model": state_dict})`` with its training-only
``quantize.codebook_used`` buffer) from tiny random models; LlamaGen's own code is not imported. Its equivalence
to LlamaGen's vq_model.py at the real VQ-16 size was checked outside the repository (tokens and pixels identical).
"""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mulosd.errors import MulosdError
from mulosd.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig, load_llamagen_vq
from mulosd.models.upsample import tokenizer_fingerprint

ARCH = dict(channels=8, channel_mult=(1, 2, 2), z_channels=8, num_res_blocks=1, norm_groups=4)
TINY = LlamaGenVQConfig(codebook_size=64, codebook_dim=4, **ARCH)  # down-sampling factor 4


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: a second OpenMP thread costs more in fork/join than it saves, and on a busy
    machine every operation waits for it (about 1 s per encode instead of 1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llamagen_keys(cfg: LlamaGenVQConfig) -> set[str]:
    """The state-dict keys LlamaGen's VQModel has for ``cfg`` (with encoder_ch_mult = decoder_ch_mult), written
    out from its layout: per level ``res.j`` blocks, ``attn.j`` at the coarsest level, then the resampler."""
    def conv(name):
        return {f"{name}.weight", f"{name}.bias"}

    def res(name, cin, cout):
        keys = set().union(*(conv(f"{name}.{part}") for part in ("norm1", "conv1", "norm2", "conv2")))
        return keys | (conv(f"{name}.nin_shortcut") if cin != cout else set())

    def attn(name):
        return set().union(*(conv(f"{name}.{part}") for part in ("norm", "q", "k", "v", "proj_out")))

    widths = [cfg.channels * m for m in cfg.channel_mult]
    n, top = cfg.num_res_blocks, len(widths) - 1
    keys = {"quantize.embedding.weight", "quantize.codebook_used"} | conv("quant_conv") | conv("post_quant_conv")
    for side in ("encoder", "decoder"):
        keys |= conv(f"{side}.conv_in") | conv(f"{side}.norm_out") | conv(f"{side}.conv_out") | attn(f"{side}.mid.1")
        keys |= res(f"{side}.mid.0", widths[-1], widths[-1]) | res(f"{side}.mid.2", widths[-1], widths[-1])
    cin = cfg.channels
    for i, w in enumerate(widths):
        for j in range(n):
            keys |= res(f"encoder.conv_blocks.{i}.res.{j}", cin if j == 0 else w, w)
            keys |= attn(f"encoder.conv_blocks.{i}.attn.{j}") if i == top else set()
        keys |= conv(f"encoder.conv_blocks.{i}.downsample.conv") if i < top else set()
        cin = w
    for k, i in enumerate(reversed(range(len(widths)))):
        for j in range(n + 1):
            keys |= res(f"decoder.conv_blocks.{k}.res.{j}", cin if j == 0 else widths[i], widths[i])
            keys |= attn(f"decoder.conv_blocks.{k}.attn.{j}") if i == top else set()
        keys |= conv(f"decoder.conv_blocks.{k}.upsample.conv") if i > 0 else set()
        cin = widths[i]
    return keys


def llamagen_state(model: LlamaGenVQ) -> dict[str, torch.Tensor]:
    """The model's weights as LlamaGen's files hold them: plus the 65536-entry codebook_used buffer."""
    return {**model.state_dict(), "quantize.codebook_used": torch.randint(0, 64, (65536,)).float()}


def images(b: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(b, 3, h, w) * 2 - 1


def test_layout_is_llamagens():
    model = LlamaGenVQ(TINY)
    sd = model.state_dict()
    assert set(sd) | {"quantize.codebook_used"} == llamagen_keys(TINY)
    assert sd["encoder.conv_blocks.1.res.0.nin_shortcut.weight"].shape == (16, 8, 1, 1)
    assert sd["decoder.conv_blocks.2.res.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)
    assert sd["quantize.embedding.weight"].shape == (64, 4)
    assert model.embedding is model.quantize.embedding
    assert torch.allclose(model.codebook.norm(dim=-1), torch.ones(64))
    assert len(tokenizer_fingerprint(model)) == 16


def test_real_vq16_size_on_meta_device():
    """VQ-16 at its real size, without allocating it: LlamaGen's parameter count (71,883,403 besides its
    codebook_used buffer, counted from its vq_model.py) and the shapes at 256 and 384 px."""
    with torch.device("meta"):
        model = LlamaGenVQ(LlamaGenVQConfig())
    assert model.config.downsample == 16
    assert sum(p.numel() for p in model.parameters()) == 71_883_403
    assert len(model.state_dict()) + 1 == len(llamagen_keys(model.config)) == 344
    for px in (256, 384):
        tokens = model.encode(torch.empty(2, 3, px, px, device="meta"))
        assert tokens.shape == (2, px // 16, px // 16) and tokens.dtype == torch.int64
        assert model.decode(tokens).shape == (2, 3, px, px)


@pytest.mark.parametrize("fmt", ["llamagen-pt", "safetensors"])
def test_llamagen_file_roundtrip(tmp_path, fmt):
    src = LlamaGenVQ(TINY).eval()
    if fmt == "llamagen-pt":  # exactly as its training script writes it (the sampling scripts read ["model"])
        path = tmp_path / "vq_ds16_c2i.pt"
        torch.save({"model": llamagen_state(src), "steps": 7, "args": argparse.Namespace(vq_model="VQ-16")}, path)
    else:
        path = tmp_path / "vq.safetensors"
        save_file({k: v.contiguous() for k, v in llamagen_state(src).items()}, path)
    loaded = load_llamagen_vq(path, dict(ARCH))  # the codebook size and dimension come from the file
    assert loaded.config == TINY and not loaded.training
    x = images(2, 8, 12)
    tokens = src.encode(x)
    assert torch.equal(loaded.encode(x), tokens)
    assert torch.equal(loaded.decode(tokens), src.decode(tokens))


@pytest.mark.parametrize("size, grid", [((8, 8), (2, 2)), ((12, 20), (3, 5))])
def test_encode_decode_shapes(size, grid):
    model = LlamaGenVQ(TINY).eval()
    tokens = model.encode(images(3, *size))
    assert tokens.shape == (3, *grid) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < TINY.codebook_size
    out = model.decode(tokens)
    assert out.shape == (3, 3, *size) and out.abs().max() <= 1
    assert model.encode_latent(images(1, *size)).shape == (1, TINY.codebook_dim, *grid)


def test_bad_inputs_are_clear_errors():
    model = LlamaGenVQ(TINY).eval()
    with pytest.raises(MulosdError, match=r"positive multiples of 4 .*got 10x12"):
        model.encode(images(1, 10, 12))
    with pytest.raises(MulosdError, match=r"multiples of 4 .*got 2x8"):
        model.encode(images(1, 2, 8))
    with pytest.raises(MulosdError, match=r"\[B, 3, H, W\]; got a tensor of shape \(1, 1, 8, 8\)"):
        model.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(MulosdError, match="integer token grids"):
        model.decode(torch.zeros(1, 2, 2))
    with pytest.raises(MulosdError, match="integer token grids"):
        model.decode(torch.zeros(4, dtype=torch.long))


def test_bad_files_are_clear_errors(tmp_path):
    sd = llamagen_state(LlamaGenVQ(TINY))
    path = tmp_path / "vq.pt"

    def load_error(state, config=TINY) -> str:
        torch.save({"model": state}, path)
        with pytest.raises(MulosdError) as info:
            load_llamagen_vq(path, config)
        assert str(path) in str(info.value)
        return str(info.value)

    missing = {k: v for k, v in sd.items() if k != "decoder.conv_blocks.0.attn.1.q.bias"}
    assert "missing keys ['decoder.conv_blocks.0.attn.1.q.bias']" in load_error(missing)
    assert "unexpected keys ['encoder.extra.weight']" in load_error({**sd, "encoder.extra.weight": torch.zeros(1)})
    bad = {**sd, "encoder.conv_out.weight": torch.zeros(8, 8, 3, 3)}
    assert "encoder.conv_out.weight has shape (8, 8, 3, 3)" in load_error(bad)
    msg = load_error(sd, LlamaGenVQConfig(codebook_size=128, codebook_dim=4, **ARCH))
    assert "64 x 4" in msg and "128 x 4" in msg
    msg = load_error(sd, None)  # None means VQ-16 with the file's codebook: this tiny file's keys do not fit
    assert "missing keys" in msg and "channel_mult=(1, 1, 2, 2, 4)" in msg
    assert "not a LlamaGen VQ" in load_error({k: v for k, v in sd.items() if not k.startswith("quantize.")})
    assert "unknown LlamaGenVQConfig fields ['ch']" in load_error(sd, {"ch": 8})


def test_pretrained_roundtrip(tmp_path):
    src = LlamaGenVQ(TINY).eval()
    src.save_pretrained(tmp_path / "tokenizer")
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["kind"] == "llamagen-vq" and meta["config"]["channel_mult"] == [1, 2, 2]
    loaded = LlamaGenVQ.from_pretrained(tmp_path / "tokenizer")
    assert loaded.config == TINY
    tokens = src.encode(images(1, 8, 8))
    assert torch.equal(loaded.decode(tokens), src.decode(tokens))
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(src)


def test_quantize_picks_the_nearest_normalised_code():
    model = LlamaGenVQ(TINY)
    with torch.no_grad():
        model.embedding.weight.copy_(torch.randn(64, 4) * torch.rand(64, 1) * 5)  # rows of varied length
    z = F.normalize(torch.randn(2, 4, 3, 5), dim=1)
    sim = torch.einsum("bdhw,vd->bvhw", z, F.normalize(model.embedding.weight, dim=-1))
    assert torch.equal(model.quantize(z), sim.argmax(dim=1))
    # a latent on a code's direction finds it whatever the code's raw length; duplicates resolve to the lowest index
    with torch.no_grad():
        model.embedding.weight[40] = model.embedding.weight[7] * 3
    z = model.codebook[[7, 12, 40]].T.reshape(1, 4, 1, 3)
    assert model.quantize(z).tolist() == [[[7, 12, 7]]]
    assert torch.equal(model.lookup(torch.tensor([[[7, 12]]])), model.codebook[[7, 12]].T.reshape(1, 4, 1, 2))


@pytest.mark.parametrize("field, value, match", [
    ("codebook_size", 0, "codebook_size must be a positive integer"),
    ("num_res_blocks", True, "num_res_blocks must be a positive integer"),
    ("channel_mult", (), "channel_mult must be a non-empty list"),
    ("channel_mult", (1, 0), "channel_mult must be a non-empty list"),
    ("norm_groups", 3, r"divisible by norm_groups=3 .*gives \[8, 16\]"),
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\)"),
    ("commit_beta", -0.1, "commit_beta must be a number >= 0"),
])
def test_config_validation(field, value, match):
    with pytest.raises(MulosdError, match=match):
        LlamaGenVQConfig(**{**vars(TINY), field: value})
    assert LlamaGenVQConfig().downsample == 16 and TINY.downsample == 4
