"""Acceptance maps read without docs: legend, column titles, class labels, truncation note, one column for one
cycle, and colours that stay apart on black for colour-blind viewers."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mulosd.errors import MulosdError
from mulosd.evaluation import maps
from mulosd.evaluation.maps import (PALETTE, acceptance_frames, acceptance_map, save_acceptance_gif,
                                    save_acceptance_map, simulate_cvd)

GRID, SIZE = 4, 8  # 4x4 token grid over 8x8 px images: a cell is 2x2 px, 8x8 px at scale 4
NAMES = ("t-shirt", "trouser", "pullover", "dress")
VISIONS = ("normal", "protanopia", "deuteranopia", "tritanopia")

# Thresholds in CIE L*a*b* (CIE76). A cell is only 8 px wide, and chromatic contrast sensitivity falls off at such
# small sizes, so against the black background we ask for lightness contrast: dL* >= 30, about the lightness of a
# (75, 75, 75) grey on black. Between two cell colours we ask for dE76 >= 15, some 6 just-noticeable differences
# (JND ~ 2.3): different at a glance, not merely on a side-by-side comparison.
MIN_DL_ON_BLACK, MIN_DE_PAIR = 30.0, 15.0


def _lab(rgb) -> np.ndarray:
    """sRGB 0-255 [..., 3] -> CIE L*a*b* (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _colour_problems(colours: dict, on_black: bool) -> list[str]:
    """Every pair closer than MIN_DE_PAIR (and, ``on_black``, every colour darker than MIN_DL_ON_BLACK against
    black), for normal vision and each simulated colour blindness."""
    problems = []
    black = _lab(simulate_cvd((0, 0, 0), "normal"))
    for vision in VISIONS:
        lab = {k: _lab(simulate_cvd(v, vision)) for k, v in colours.items()}
        for (a, la), (b, lb) in itertools.combinations(lab.items(), 2):
            if np.linalg.norm(la - lb) < MIN_DE_PAIR:
                problems.append(f"{vision}: {a} vs {b} dE {np.linalg.norm(la - lb):.1f}")
        if on_black:
            problems += [f"{vision}: {k} vs black dL {v[0] - black[0]:.1f}" for k, v in lab.items()
                         if v[0] - black[0] < MIN_DL_ON_BLACK]
    return problems


def _cycles(rows_per_cycle: int, accept=None, region=None) -> list[dict]:
    """One image's trace: blocks of ``rows_per_cycle`` token rows (GRID // rows_per_cycle cycles)."""
    out = []
    for start in range(0, GRID, rows_per_cycle):
        shape = (rows_per_cycle, GRID)
        out.append({"block": (start * GRID, (start + rows_per_cycle) * GRID),
                    "accept": torch.ones(shape, dtype=torch.bool) if accept is None else accept,
                    "region": torch.zeros(shape, dtype=torch.bool) if region is None else region})
    return out


def _black(n: int) -> torch.Tensor:
    return torch.zeros(n, 1, SIZE, SIZE)


@pytest.fixture
def drawn_text(monkeypatch):
    """Every string the maps draw, in order."""
    texts = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        texts.append(text)
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return texts


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _has(px: np.ndarray, colour) -> bool:
    return bool((px == np.array(colour, dtype=np.uint8)).all(-1).any())


def _panel_columns(img: Image.Image) -> int:
    """Panels across the first image row: runs of non-white pixels along a line through its top cells (the
    maps here have no label column, and their images are black with every top cell drafted in cycle 1)."""
    px = _px(img)
    ys = np.nonzero((px == np.array(PALETTE["accepted"], dtype=np.uint8)).all(-1).any(1))[0]
    line = ~(px[ys[0] + 2] == 255).all(-1)
    return int((line[1:] & ~line[:-1]).sum() + line[0])


def _panel_rows(img: Image.Image) -> int:
    """Image rows: runs of accepted-colour pixels down a line through the rightmost panel column (the legend's
    swatches sit at the left edge; the maps here are all accepted cells over black images)."""
    px = _px(img)
    xs = np.nonzero((px == np.array(PALETTE["accepted"], dtype=np.uint8)).all(-1).any(0))[0]
    line = (px[:, xs[-1] - 2] == np.array(PALETTE["accepted"], dtype=np.uint8)).all(-1)
    return int((line[1:] & ~line[:-1]).sum() + line[0])


# ---- colours ----------------------------------------------------------------------------------------------------


def test_simulation_merges_the_confusions_each_deficiency_has():
    grey = torch.tensor([[0, 0, 0], [128, 128, 128], [255, 255, 255]])
    red, green, blue = (200, 30, 30), (30, 160, 30), (30, 30, 200)
    for kind in VISIONS:
        assert torch.allclose(simulate_cvd(grey, kind), grey.double(), atol=0.6)  # neutral colours stay put

    def de(a, b, kind):
        return np.linalg.norm(_lab(simulate_cvd(a, kind)) - _lab(simulate_cvd(b, kind)))

    for kind in ("protanopia", "deuteranopia"):  # red-green confusion
        assert de(red, green, kind) < 0.5 * de(red, green, "normal")
    assert de(blue, green, "tritanopia") < 0.6 * de(blue, green, "normal")  # blue-green confusion
    assert de(red, green, "tritanopia") > 0.5 * de(red, green, "normal")  # tritanopes keep red vs green


def test_panel_colours_stay_apart_on_black_and_over_a_white_garment():
    """The colours as the panel draws them (one cycle panel holding every state) over a black and a white image."""
    accept = torch.tensor([[True, False, True, True]])
    region = torch.tensor([[False, True, True, False]])
    trace = _cycles(1, accept, region)  # cycle 1: accepted, rejected, resampled cells; rows below not drafted
    centres = {"accepted": (0, 0), "rejected": (0, 1), "resampled": (0, 2), "not drafted": (1, 0)}
    for value, on_black in ((0.0, True), (1.0, False)):
        image = torch.full((1, SIZE, SIZE), value)
        px = _px(maps._panel(image, GRID, trace, 0, 4))
        cell = px.shape[0] // GRID
        drawn = {k: tuple(int(v) for v in px[r * cell + cell // 2, c * cell + cell // 2])
                 for k, (r, c) in centres.items()}
        if on_black:
            assert drawn == PALETTE  # over black the legend's swatch is exactly what the cells show
        assert _colour_problems(drawn, on_black) == []


def test_the_old_palette_fails_the_same_check():
    """The check can fail: the old overlay (alpha 110/255 over black) turned red into maroon, and its green and
    orange merge for protanopes even at full strength."""
    old = {"accepted": (40, 200, 70), "rejected": (230, 40, 40), "resampled": (255, 160, 0)}
    as_drawn_on_black = {k: tuple(round(v * 110 / 255) for v in c) for k, c in old.items()}
    problems = _colour_problems(as_drawn_on_black, on_black=True)
    assert any("rejected vs black" in p for p in problems)
    assert any(p.startswith("deuteranopia: accepted vs rejected") for p in problems)
    assert any(p.startswith("protanopia: accepted vs resampled") for p in _colour_problems(old, on_black=False))


# ---- layout -----------------------------------------------------------------------------------------------------


def test_one_cycle_gives_one_column_and_n_cycles_give_n_plus_summary():
    one = acceptance_map(_black(2), [_cycles(GRID)] * 2, GRID, scale=8)
    four = acceptance_map(_black(2), [_cycles(1)] * 2, GRID, scale=8)  # 5 panels of 64 px: wider than MIN_WIDTH
    assert _panel_columns(one) == 1
    assert _panel_columns(four) == 5
    assert four.width > one.width


def test_column_titles_title_and_legend(drawn_text):
    acceptance_map(_black(2), [_cycles(2)] * 2, GRID)  # two cycles
    text = " ".join(drawn_text)
    for title in ("cycle 1", "cycle 2", "summary"):
        assert title in drawn_text
    assert "2 images, 2 cycles each" in text and "first" not in text
    for meaning in maps.LEGEND.values():
        assert meaning in text
    drawn_text.clear()
    acceptance_map(_black(2), [_cycles(GRID)] * 2, GRID)  # one cycle: no "summary", no "not drafted" entry
    assert "summary" not in drawn_text and "cycle 2" not in drawn_text
    assert "cycle 1 (the only one)" in drawn_text
    assert maps.LEGEND["not drafted"] not in " ".join(drawn_text)


def test_legend_shows_every_colour_the_panels_use():
    # the panels hold only accepted cells, so rejected / resampled / grey pixels come from the legend
    multi = _px(acceptance_map(_black(1), [_cycles(1)], GRID))
    for key in PALETTE:
        assert _has(multi, PALETTE[key])
    single = _px(acceptance_map(_black(1), [_cycles(GRID)], GRID))
    assert _has(single, PALETTE["rejected"]) and _has(single, PALETTE["resampled"])
    assert not _has(single, PALETTE["not drafted"])  # nothing is ever undrafted in a one-cycle map


def test_truncation_says_first_n_of_m(drawn_text):
    img = acceptance_map(_black(5), [_cycles(GRID)] * 5, GRID, max_images=2)
    assert "first 2 of 5 images" in " ".join(drawn_text)
    assert _panel_rows(img) == 2


def test_class_labels_label_the_rows(drawn_text):
    labels = torch.tensor([3, 1, 0])
    plain = acceptance_map(_black(3), [_cycles(1)] * 3, GRID, scale=8)
    assert not any(name in " ".join(drawn_text) for name in NAMES)
    labelled = acceptance_map(_black(3), [_cycles(1)] * 3, GRID, scale=8, labels=labels, class_names=NAMES)
    assert "3: dress 1: trouser 0: t-shirt" in " ".join(drawn_text)  # in row order
    assert labelled.width > plain.width  # the label column
    drawn_text.clear()
    acceptance_map(_black(3), [_cycles(1)] * 3, GRID, labels=labels)  # ids only
    assert "class 3" in " ".join(drawn_text)
    with pytest.raises(MulosdError, match="2 labels for 3 images"):
        acceptance_map(_black(3), [_cycles(1)] * 3, GRID, labels=labels[:2])


def test_gif_frames_one_per_cycle_plus_summary(drawn_text):
    frames = acceptance_frames(_black(3), [_cycles(1)] * 3, GRID, max_images=2, labels=torch.tensor([2, 3, 0]),
                               class_names=NAMES)
    assert len(frames) == 5 and len({f.size for f in frames}) == 1
    text = " ".join(drawn_text)
    assert "Cycle 2 of 4" in text and "Summary of all cycles" in text and "first 2 of 3 images" in text
    assert "2: pullover" in text and "3: dress" in text and "t-shirt" not in text  # the third image is cut
    assert len(acceptance_frames(_black(1), [_cycles(GRID)], GRID)) == 1  # one cycle: one frame


def test_old_callers_and_new_keywords_write_files(tmp_path):
    images, traces = _black(2), [_cycles(2)] * 2
    save_acceptance_map(tmp_path / "a.png", images, traces, GRID)
    save_acceptance_map(tmp_path / "b.png", images, traces, GRID, 1, labels=torch.tensor([0, 1]), class_names=NAMES)
    save_acceptance_gif(tmp_path / "c.gif", images, traces, GRID, labels=[0, 1], class_names=NAMES)
    with Image.open(tmp_path / "c.gif") as gif:
        assert gif.n_frames == 3
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG"
