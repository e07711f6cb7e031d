"""MuLo-SD at any resolution ratio with the training-free pixel resampler: the one row mapping (covered_rows), the
resampler's shapes and geometry, and the method end to end on tiny random models (a 4x4 drafter under a 6x6
target, r = 1.5; a 4x4 drafter under an 8x8 target, r = 2)."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from mulosd import Pipeline
from mulosd.decoding.methods import REGISTRY
from mulosd.decoding.mulo import Resamplers
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.decoding.window import generate_ar
from mulosd.errors import MulosdError
from mulosd.models.upsample import PixelResampler, area_average, covered_rows
from mulosd.models.vq import VQConfig, VQModel
from toys import toy

V = 16  # codebook size of the toy tokenizer and vocabulary of the toy transformers


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return VQModel(VQConfig(channels=8, z_channels=4, codebook_size=V, codebook_dim=4)).eval()


# ---- the row mapping ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,H,blocks", [
    (4, 6, [[0], [1, 2], [3], [4, 5]]),  # r = 1.5: high-res row 1 straddles low-res rows 0 and 1
    (8, 16, [[2 * i, 2 * i + 1] for i in range(8)]),  # r = 2
    (4, 16, [list(range(4 * i, 4 * i + 4)) for i in range(4)]),  # r = 4
    (16, 20, [b for k in range(4) for b in ([5 * k], [5 * k + 1], [5 * k + 2], [5 * k + 3, 5 * k + 4])]),  # 1.25
])
def test_covered_rows_releases_a_high_res_row_once_every_low_res_row_it_overlaps_is_drafted(h, H, blocks):
    """Row j of an n-row grid covers the band [j / n, (j + 1) / n) of the image; a row of one grid is covered by the
    first `done` rows of the other when its band ends within theirs. Both directions, checked against that
    definition in exact fractions; each low-res row releases at least one high-res row, and every high-res row is
    released exactly once."""
    for done in range(h + 1):
        assert covered_rows(done, h, H) == sum(Fraction(j + 1, H) <= Fraction(done, h) for j in range(H))
    for done in range(H + 1):
        assert covered_rows(done, H, h) == sum(Fraction(i + 1, h) <= Fraction(done, H) for i in range(h))
    released = [list(range(covered_rows(i, h, H), covered_rows(i + 1, h, H))) for i in range(h)]
    assert sum(released, []) == list(range(H)) and all(released)
    assert released == blocks


def test_the_down_mapping_and_the_blocks_of_several_low_res_rows():
    assert [covered_rows(done, 6, 4) for done in range(7)] == [0, 0, 1, 2, 2, 3, 4]  # committed -> re-synced rows
    res = Resamplers(up=None, down=None, lo=4, hi=6)
    assert [res.hi_rows(slice(i, i + 2)) for i in (0, 2)] == [slice(0, 3), slice(3, 6)]
    assert [res.hi_rows(slice(i, i + 1)) for i in range(4)] == [slice(0, 1), slice(1, 3), slice(3, 4), slice(4, 6)]


# ---- the pixel resampler --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,h,H", [(1.5, 4, 6), (1.25, 16, 20), (10 / 7, 7, 10), (2, 4, 8)])
def test_pixel_resampler_maps_any_ratio_to_whole_grids(vq, r, h, H):
    rs = PixelResampler(vq, r)
    lo = torch.randint(0, V, (2, h, h))
    for rows in sorted({1, 2, h - 1, h}):  # partial grids give the high-res rows they cover
        assert rs.up(lo[:, :rows]).shape == (2, covered_rows(rows, h, H), H)
    assert rs.down(torch.randint(0, V, (2, H, H))).shape == (2, h, h)
    assert rs.down(rs.up(lo)).shape == lo.shape


class BlockTokenizer:
    """A stand-in tokenizer: decoding paints every token as a 2 x 2 block of grey; encoding remembers the image it
    was given (the resized pixels) and returns tokens of the matching size."""

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.float() / V * 2 - 1)[:, None].repeat_interleave(2, -2).repeat_interleave(2, -1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images
        return torch.zeros(images.shape[0], images.shape[-2] // 2, images.shape[-1] // 2, dtype=torch.long)


@pytest.mark.parametrize("mode,inside", [("bicubic", 7), ("bilinear", 8), ("lanczos", 5)])
def test_a_partial_image_is_resized_with_the_full_images_geometry(mode, inside):
    """8 -> 12 tokens (r = 1.5, 16 -> 24 px): the full image is resized to exactly the high-res pixel size; 3 drafted
    low-res rows (6 px) give the 4 high-res rows they cover (8 px), and every pixel row whose kernel stays inside the
    drafted rows (bicubic, 2 taps each side: the first 7; bilinear: all 8; Lanczos, 3 taps: the first 5) equals the
    full image's; past them the partial image's bottom edge is extended by replication."""
    tok = BlockTokenizer()
    rs = PixelResampler(tok, 1.5, mode)
    lo = torch.randint(0, V, (1, 8, 8))
    rs.up(lo)
    full = tok.seen
    assert full.shape[-2:] == (24, 24)
    assert rs.up(lo[:, :3]).shape == (1, 4, 12) and tok.seen.shape[-2:] == (8, 24)
    assert torch.allclose(tok.seen[..., :inside, :], full[..., :inside, :], atol=1e-6)
    assert inside == 8 or not torch.allclose(tok.seen[..., inside:, :], full[..., inside:8, :], atol=1e-6)


def test_area_average_weights_each_pixel_by_the_area_it_shares_with_a_cell():
    """3 -> 2 px: a cell covers 1.5 pixels, the middle pixel counting half in each; an integer factor keeps average
    pooling bit for bit."""
    img = torch.rand(2, 3, 3, 3)
    w = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]) / 1.5
    assert torch.allclose(area_average(img, (2, 2)), w @ img @ w.T, atol=1e-6)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(area_average(x, (4, 4)), F.avg_pool2d(x, 2))
    assert torch.allclose(area_average(x, (6, 6)).mean((-1, -2)), x.mean((-1, -2)), atol=1e-6)  # nothing lost


# ---- the method -----------------------------------------------------------------------------------------------------


def toy_pipeline(vq, grid: int, low: int, seed: int = 0) -> Pipeline:
    """A target on a grid x grid grid and its low-res drafter (role r<grid/low>) over the toy tokenizer."""
    target = toy(24, 2, seed, grid=grid, vocab=V, std=0.5)
    drafter = toy(16, 1, seed + 1, grid=low, vocab=V, std=0.5)
    return Pipeline(vq, target, drafters={f"r{grid / low:g}": drafter}, class_names=("a", "b"))


@pytest.fixture(scope="module")
def pipes(vq):
    return {1.5: toy_pipeline(vq, 6, 4, seed=4), 2: toy_pipeline(vq, 8, 4, seed=3)}  # seed 4: exact accepts some


def mulo(pipe, **params):
    """The mulo method on a toy pipeline: pixel up-sampler, pooling sets of 4 of the 16 codes unless given."""
    return REGISTRY["mulo"](pipe, **{"upsampler": "pixel", "k": 4, **params})


@pytest.mark.parametrize("r,blocks", [(1.5, [(0, 6), (6, 18), (18, 24), (24, 36)]),
                                      (2, [(0, 16), (16, 32), (32, 48), (48, 64)])])
def test_mulo_row_by_row_gives_complete_grids_and_each_image_as_if_alone(pipes, r, blocks):
    """Batch 3, samples rejecting differently (ragged), and batch 1: every grid is complete, the blocks are the
    high-res rows each low-res row releases, and each image of the batch is the image decoded alone."""
    method = mulo(pipes[r], r=r, rows=1, drafting="serial", tau=0.2, k=2, resampling="parallel")
    assert method.params()["drafter"] == f"r{r:g}" and method.params()["downsampler"] == "pixel"  # auto: pixel
    H = pipes[r].target.config.grid_size
    labels, cfg = torch.tensor([0, 1, 1]), SamplingConfig(cfg_scale=1.5)
    trace = []
    batch, stats = method.generate(labels, cfg, RandomStreams.from_seed(5, range(3)), trace=trace)
    assert batch.shape == (3, H * H) and bool(((batch >= 0) & (batch < V)).all())
    assert [rec["block"] for rec in trace] == blocks
    assert stats.tokens == 3 * H * H and 0 < stats.accepted < stats.drafted
    assert len({tuple(torch.cat([rec["accept"][b].flatten() for rec in trace]).tolist()) for b in range(3)}) > 1
    for b in range(3):
        alone, _ = method.generate(labels[b : b + 1], cfg, RandomStreams.from_seed(5, [b]))
        assert torch.equal(alone[0], batch[b])


@pytest.mark.parametrize("r", [1.5, 2])
def test_mulo_resynchronises_the_drafter_with_the_low_res_rows_the_committed_rows_cover(pipes, r, monkeypatch):
    """Row by row at r = 1.5 the committed high-res rows 0, 0-2, 0-3 determine low-res rows none, 0-1, 0-1: the
    drafter is re-synchronised once, with rows 0 and 1; at r = 2 every block re-synchronises its own low-res row."""
    calls = []
    original = Resamplers.downsample

    def spy(self, x_rows, lo_rows):
        calls.append((x_rows.shape[1], lo_rows))
        return original(self, x_rows, lo_rows)

    monkeypatch.setattr(Resamplers, "downsample", spy)
    mulo(pipes[r], r=r, rows=1, drafting="serial").generate(torch.tensor([1]), SamplingConfig(),
                                                            RandomStreams.from_seed(0, [0]))
    want = [(3, slice(0, 2))] if r == 1.5 else [(2, slice(0, 1)), (4, slice(1, 2)), (6, slice(2, 3))]
    assert calls == want


@pytest.mark.parametrize("params,cfg,accepts", [
    ({"tau": "inf", "rejection": "raster", "resampling": "serial"}, SamplingConfig(cfg_scale=2.0, top_k=5), False),
    ({"acceptance": "exact"}, SamplingConfig(temperature=0.0, cfg_scale=2.0), True),
])
@pytest.mark.parametrize("rows", [1, None])
def test_mulo_at_r_1_5_in_its_limiting_cases_is_ar_token_for_token(pipes, params, cfg, accepts, rows):
    """tau = inf rejects every candidate and raster rejection regenerates the rest of the block from the target's
    own streams; exact acceptance of greedy decoding keeps a candidate only where it is the target's argmax (some
    are, here). Either way: AR, whether a cycle drafts one low-res row or the whole low-res image."""
    pipe = pipes[1.5]
    labels = torch.tensor([0, 1, 0])
    ar, _ = generate_ar(pipe.target, labels, cfg, RandomStreams.from_seed(2, range(3)))
    out, stats = mulo(pipe, r="1.5", rows=rows, **params).generate(labels, cfg, RandomStreams.from_seed(2, range(3)))
    assert torch.equal(out, ar)
    assert (stats.accepted > 0) == accepts and stats.tokens == 3 * 36


def test_mulo_refuses_learned_resamplers_and_ratios_without_a_whole_grid_at_r_1_5(pipes):
    pipe = pipes[1.5]
    with pytest.raises(MulosdError, match=r"upsampler=learned needs an integer r .*got r=1.5; allowed at r=1.5: "
                                          r"upsampler=pixel or auto"):
        REGISTRY["mulo"](pipe, r=1.5, upsampler="learned")
    with pytest.raises(MulosdError, match=r"downsampler=learned needs an integer r .*allowed at r=1.5: "
                                          r"downsampler=pixel or auto"):
        mulo(pipe, r=1.5, downsampler="learned")
    with pytest.raises(MulosdError, match=r"r=1.4 does not divide the target's 6x6 grid into a whole low-res grid "
                                          r"\(6 / 1.4 = 4.286\); allowed: r = 6 / h for a whole h from 1 to 5"):
        mulo(pipe, r=1.4)
    with pytest.raises(MulosdError, match=r"no low-resolution drafter for r=2 \(no role 'r2' on a 3x3 grid\); allowed r: 1.5"):
        mulo(pipe, r=2)
