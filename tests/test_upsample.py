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
    with pytest.raises(MulosdError, match="r must be an integer >= 2"):
        PixelResampler(vq, 1)
    with pytest.raises(MulosdError, match="resize mode 'nearest-ish' unknown"):
        PixelResampler(vq, 2, "nearest-ish")
    with pytest.raises(MulosdError, match="cannot be down-sampled by r=4"):
        PixelResampler(vq, 4).down(torch.randint(0, 512, (1, 6, 6)))


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
