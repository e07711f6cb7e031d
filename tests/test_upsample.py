import math

import pytest
import torch

from conftest import needs_fmnist
from mulosd import Pipeline
from mulosd.errors import MulosdError
from mulosd.models.upsample import PixelResampler


@pytest.fixture(scope="module")
def vq():
    return Pipeline.from_pretrained("fmnist-32").tokenizer


def test_shapes_and_validation(vq):
    low = torch.randint(0, 512, (3, 4, 4))
    assert PixelResampler(vq, 2).up(low).shape == (3, 8, 8)
    assert PixelResampler(vq, 4, "lanczos").up(low).shape == (3, 16, 16)
    assert PixelResampler(vq, 4).down(torch.randint(0, 512, (2, 16, 16))).shape == (2, 4, 4)
    assert PixelResampler(vq, 1.5).up(low).shape == (3, 6, 6)
    assert PixelResampler(vq, 1.5).down(torch.randint(0, 512, (2, 6, 6))).shape == (2, 4, 4)
    for bad in (1, 0.5, True, float("inf")):
        with pytest.raises(MulosdError, match="r must be a number > 1"):
            PixelResampler(vq, bad)
    with pytest.raises(MulosdError, match="resize mode 'nearest-ish' unknown"):
        PixelResampler(vq, 2, "nearest-ish")
    with pytest.raises(MulosdError, match="cannot be down-sampled by r=4"):
        PixelResampler(vq, 4).down(torch.randint(0, 512, (1, 6, 6)))
    with pytest.raises(MulosdError, match="r=1.5 maps a 5-token-wide grid to 7.5 tokens"):
        PixelResampler(vq, 1.5).up(torch.randint(0, 512, (1, 5, 5)))


@needs_fmnist
@pytest.mark.parametrize("r,px,min_psnr", [(2, 16, 18.0), (4, 8, 14.5)])
def test_pixel_upsampling_quality_on_real_images(vq, r, px, min_psnr):
    """Regression guard (measured on 500 test images: 20.1 dB at r=2, 16.4 dB at r=4 for bicubic)."""
    from mulosd.data import FashionMNIST

    test = FashionMNIST.load("test")
    low = vq.encode(test.at(px)[:200])
    rs = PixelResampler(vq, r)
    up = rs.up(low)
    mse = ((vq.decode(up) - test.images[:200]) / 2).pow(2).mean().item()
    assert 10 * math.log10(1 / mse) > min_psnr
    assert (rs.down(up) == low).float().mean() > 0.2  # down(up(x)) keeps a good share of the low-res tokens


def test_learned_resampler_is_row_causal_and_round_trips(tmp_path):
    from mulosd.models.upsample import LatentResampler, LatentResamplerConfig

    torch.manual_seed(0)
    m = LatentResampler(LatentResamplerConfig(r=2, vocab_size=32, dim=16, n_blocks=2, hi_dim=8, tokenizer_id="abc")).eval()
    lo = torch.randint(0, 32, (2, 4, 4))
    full = m.up_logits(lo)
    assert full.shape == (2, 32, 8, 8)
    # rows 0..1 of the low-res grid decide high-res rows 0..3 whatever comes below
    changed = lo.clone()
    changed[:, 2:] = torch.randint(0, 32, (2, 2, 4))
    assert torch.allclose(m.up_logits(changed)[:, :, :4], full[:, :, :4])
    assert torch.allclose(m.up_logits(lo[:, :2]), full[:, :, :4], atol=1e-6)
    hi = torch.randint(0, 32, (2, 8, 8))
    assert torch.allclose(m.down_logits(hi[:, :4]), m.down_logits(hi)[:, :, :2], atol=1e-6)
    m.save_pretrained(tmp_path / "up")
    again = LatentResampler.from_pretrained(tmp_path / "up")
    assert torch.equal(again.up(lo), m.up(lo)) and again.config == m.config


def test_learned_resampler_refuses_another_r_or_tokenizer():
    from mulosd.models.upsample import LatentResampler, LatentResamplerConfig, tokenizer_fingerprint
    from mulosd.models.vq import VQConfig, VQModel

    vq = VQModel(VQConfig(channels=8, z_channels=4, codebook_size=32, codebook_dim=4))
    m = LatentResampler(LatentResamplerConfig(r=2, vocab_size=32, dim=16, tokenizer_id=tokenizer_fingerprint(vq)))
    m.check(vq, 2)
    with pytest.raises(MulosdError, match="trained for r=2; this run needs r=4"):
        m.check(vq, 4)
    other = VQModel(VQConfig(channels=8, z_channels=4, codebook_size=32, codebook_dim=4))
    with pytest.raises(MulosdError, match="trained for tokenizer"):
        m.check(other, 2)
