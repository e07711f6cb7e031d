import numpy as np
import pytest
import torch
from scipy import ndimage

from mulosd.decoding.grid import first_true, label_islands, resample_region


def test_windows_are_clipped_to_the_grid_and_to_the_first_rejection():
    rej = torch.zeros(2, 5, 5, dtype=torch.bool)
    rej[0, 2, 2] = True  # one rejection in the middle
    rej[1, 0, 4] = True  # top-right corner, plus a later one
    rej[1, 4, 0] = True
    region = resample_region(rej, 1)
    want0 = torch.zeros(5, 5, dtype=torch.bool)
    want0[2, 2:4] = True  # the 3x3 window's cells at or after (2, 2) in raster order
    want0[3, 1:4] = True
    assert torch.equal(region[0], want0)
    want1 = torch.zeros(5, 5, dtype=torch.bool)
    want1[0, 4] = True  # window clipped by the grid edge and by raster order
    want1[1, 3:5] = True
    want1[3, 0:2] = True
    want1[4, 0:2] = True
    assert torch.equal(region[1], want1)
    assert torch.equal(resample_region(rej, 0), rej)
    assert first_true(rej).tolist() == [12, 4] and first_true(torch.zeros(1, 2, 2, dtype=torch.bool)).tolist() == [4]


def test_infinite_radius_is_raster_rejection():
    g = torch.Generator().manual_seed(0)
    rej = torch.rand(6, 7, 7, generator=g) < 0.05
    region = resample_region(rej, None)
    first = first_true(rej)
    for b in range(6):
        assert region[b].flatten().tolist() == [t >= first[b] for t in range(49)]
    big = resample_region(rej, 12)  # window larger than the grid: every cell after the first rejection
    assert torch.equal(big, region)
    with pytest.raises(ValueError, match="radius"):
        resample_region(rej, -1)


@pytest.mark.parametrize("seed", range(10))
def test_islands_match_scipy_8_connectivity(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(4, 9, 11, generator=g) < 0.3 + 0.05 * (seed % 4)
    labels = label_islands(mask)
    for b in range(4):
        ref, n = ndimage.label(mask[b].numpy(), structure=np.ones((3, 3)))
        assert labels[b].max().item() == n
        # same partition: a bijection between our labels and scipy's
        pairs = {(int(a), int(r)) for a, r in zip(labels[b].flatten().tolist(), ref.flatten().tolist())}
        assert len(pairs) == n + (1 if (~mask[b]).any() else 0)
        # numbered 1..n in raster order of each island's first cell
        firsts = [labels[b].flatten().tolist().index(i) for i in range(1, n + 1)]
        assert firsts == sorted(firsts)
