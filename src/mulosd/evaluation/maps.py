"""Acceptance maps for MuLo-SD: which cells each cycle drafted, accepted, rejected and resampled.

A trace is a list of per-image cycles, each ``{"block": (start, end), "accept": [rows, W] bool,
"region": [rows, W] bool}`` (raster cells ``start .. end - 1`` of the token grid; ``region``: the cells the
repairer regenerated). A cell's status is:

* accepted  - drafted and accepted, kept;
* rejected  - drafted and rejected (exact acceptance: by the block's first verification);
* resampled - drafted and accepted, but regenerated because it lies next to (threshold acceptance: in the window
  of) a rejected cell.

The map is self-explaining: a title (how many images, "first N of M" when cut), one row per image with its class
label, one column per cycle titled "cycle k" plus a "summary" column (a single column when there is one cycle,
since the summary then equals it), and a legend. A cycle's panel colours the cells that cycle drafted; above them
is the image as committed by earlier cycles, below them grey (not drafted yet). The summary colours every cell by
its status in the cycle that drafted it.

Colours are Okabe and Ito's colour-blind-safe set, screen-blended over the image: over black they are the palette
colour itself, over the garment lighter, so the image shows through. ``simulate_cvd`` lets the tests check that
they stay apart from each other and from black for protanopes, deuteranopes and tritanopes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from mulosd.errors import MulosdError
from mulosd.io import atomic_write

STATES = ("accepted", "rejected", "resampled", "not drafted")  # index = the cell code _cell_codes writes
ACCEPTED, REJECTED, RESAMPLED, NOT_DRAFTED = range(4)
PLAIN = -1  # no overlay: the image as committed by an earlier cycle
PALETTE = {
    "accepted": (0x00, 0x9E, 0x73),  # Okabe-Ito bluish green
    "rejected": (0xD5, 0x5E, 0x00),  # Okabe-Ito vermillion
    "resampled": (0xF0, 0xE4, 0x42),  # Okabe-Ito yellow
    "not drafted": (80, 80, 80),  # flat grey, lighter than the images' black background
}
LEGEND = {
    "accepted": "draft accepted",
    "rejected": "draft rejected",
    "resampled": "draft accepted, but resampled (near a rejection)",
    "not drafted": "not drafted yet (a later cycle's cells)",
}
SCREEN = 0.5  # how much the image lightens an overlay colour: 0 flat colour, 1 white where the image is white

# Machado, Oliveira and Fernandes (2009), "A physiologically-based model for simulation of color vision
# deficiency", severity 1.0; they act on linear RGB.
CVD_MATRICES = {
    "protanopia": ((0.152286, 1.052583, -0.204868), (0.114503, 0.786281, 0.099216), (-0.003882, -0.048116, 1.051998)),
    "deuteranopia": ((0.367322, 0.860646, -0.227968), (0.280085, 0.672501, 0.047413), (-0.011820, 0.042940, 0.968881)),
    "tritanopia": ((1.255528, -0.076749, -0.178779), (-0.078411, 0.930809, 0.147602), (0.004733, 0.691367, 0.303900)),
}

GAP = 4  # pixels between panels and around the blocks of the picture
MIN_WIDTH = 300  # a one-column map still leaves the title and legend room for a few words a line


def simulate_cvd(rgb, kind: str) -> torch.Tensor:
    """sRGB colours (0-255, any shape [..., 3]) as a viewer with ``kind`` (a CVD_MATRICES key, or "normal")
    sees them, as sRGB floats in 0-255: linearise, apply Machado et al.'s matrix, clip, re-encode."""
    c = torch.as_tensor(rgb, dtype=torch.float64) / 255
    if kind == "normal":
        return c * 255
    lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    sim = (lin @ torch.tensor(CVD_MATRICES[kind], dtype=torch.float64).T).clamp(0, 1)
    enc = torch.where(sim <= 0.0031308, sim * 12.92, 1.055 * sim ** (1 / 2.4) - 0.055)
    return enc * 255


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than the width gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 3


def _text_block(text: str, width: int, font, min_lines: int = 0) -> Image.Image:
    """``text`` wrapped to ``width``, black on white, at least ``min_lines`` lines tall."""
    lines = _wrap(text, font, width - 2 * GAP)
    lh = _line_height(font)
    img = Image.new("RGB", (width, lh * max(len(lines), min_lines) + GAP), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((GAP, GAP // 2 + i * lh), line, fill="black", font=font)
    return img


def _vstack(parts: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _cell_codes(cycles: list[dict], upto: int | None, grid: int) -> torch.Tensor:
    """[grid, grid] codes of one panel: a STATES index, or PLAIN. ``upto``: the cycle shown (None: summary)."""
    codes = torch.full((grid * grid,), PLAIN)
    for cyc in cycles if upto is None else [cycles[upto]]:
        start, end = cyc["block"]
        accept, region = cyc["accept"].flatten().cpu(), cyc["region"].flatten().cpu()
        codes[start:end] = torch.where(~accept, REJECTED, torch.where(region, RESAMPLED, ACCEPTED))
    if upto is not None:
        codes[cycles[upto]["block"][1]:] = NOT_DRAFTED
    return codes.view(grid, grid)


def _panel(image: torch.Tensor, grid: int, cycles: list[dict], upto: int | None, scale: int) -> Image.Image:
    """One image [C, H, W] in [0, 1] coloured by cycle ``upto`` (None: every cycle's status, the summary)."""
    C, H, W = image.shape
    rgb = image.detach().float().cpu().clamp(0, 1)
    rgb = rgb.expand(3, -1, -1) if C == 1 else rgb[:3]
    codes = _cell_codes(cycles, upto, grid)
    palette = torch.tensor([PALETTE[s] for s in STATES], dtype=torch.float32) / 255
    per_cell = torch.cat([palette[codes.clamp_min(0)].permute(2, 0, 1), codes[None].float()])  # [4, grid, grid]
    colour, code = F.interpolate(per_cell[None], size=(H, W), mode="nearest")[0].split([3, 1])
    screened = 1 - (1 - colour) * (1 - SCREEN * rgb)  # the palette colour over black, lighter over the garment
    out = torch.where(code == PLAIN, rgb, torch.where(code == NOT_DRAFTED, colour, screened))
    px = (out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(px, "RGB").resize((W * scale, H * scale), Image.NEAREST)


def _legend(width: int, font, with_not_drafted: bool) -> Image.Image:
    """One line per colour: a swatch (outlined, so it shows on white) and its meaning, wrapped to ``width``."""
    keys = [k for k in STATES if with_not_drafted or k != "not drafted"]
    lh, sw = _line_height(font), 12
    wrapped = [_wrap(LEGEND[k], font, width - 3 * GAP - sw) for k in keys]
    img = Image.new("RGB", (width, lh * sum(len(w) for w in wrapped) + 2 * GAP), "white")
    draw = ImageDraw.Draw(img)
    y = GAP
    for key, lines in zip(keys, wrapped):
        draw.rectangle([GAP, y + 1, GAP + sw, y + 1 + sw], fill=PALETTE[key], outline=(0, 0, 0))
        for line in lines:
            draw.text((2 * GAP + sw, y), line, fill="black", font=font)
            y += lh
    return img


def _columns(num_cycles: int) -> tuple[list[int | None], list[str]]:
    """The panels of a row (cycle indices, None = summary) and their titles; one column for one cycle."""
    if num_cycles == 1:
        return [None], ["cycle 1 (the only one)"]
    return list(range(num_cycles)) + [None], [f"cycle {c + 1}" for c in range(num_cycles)] + ["summary"]


def _title(shown: int, total: int, num_cycles: int) -> str:
    images = f"first {shown} of {total} images" if shown < total else f"{total} image{'s' * (total != 1)}"
    cycles = "1 cycle" if num_cycles == 1 else f"{num_cycles} cycles"
    return f"MuLo-SD acceptance map: {images}, {cycles} each"


def _note(num_cycles: int) -> str:
    if num_cycles == 1:
        return "One cycle drafted and verified every cell. Colours lighten where the image is bright."
    return ("Cycle k colours the cells it drafted; above them, the image as earlier cycles committed it. The summary "
            "colours every cell by its status in the cycle that drafted it. Colours lighten where the image is bright.")


def _label_texts(labels, class_names, n: int) -> list[str] | None:
    if labels is None:
        return None
    if len(labels) < n:
        raise MulosdError(f"acceptance map: {len(labels)} labels for {n} images")
    ids = [int(labels[i]) for i in range(n)]
    return [f"{c}: {class_names[c]}" if class_names is not None else f"class {c}" for c in ids]


def _shown(images, traces, max_images: int) -> tuple[int, int]:
    if len(traces) < len(images):
        raise MulosdError(f"acceptance map: {len(traces)} traces for {len(images)} images")
    n = min(len(images), max_images)
    if n < 1 or any(len(traces[i]) == 0 for i in range(n)):
        raise MulosdError("acceptance map: nothing to draw (no images, or an image without cycles)")
    return n, max(len(traces[i]) for i in range(n))


def _cycle(traces_i: list[dict], column: int | None) -> int | None:
    """The cycle a column shows for one image; an image with fewer cycles shows its summary in the extra ones."""
    return column if column is not None and column < len(traces_i) else None


def acceptance_map(images: torch.Tensor, traces: list[list[dict]], grid: int, max_images: int = 8, scale: int = 4,
                   *, labels=None, class_names=None) -> Image.Image:
    """A PNG-ready picture: title, column titles, one row per image (at most ``max_images``, labelled
    ``"<id>: <class name>"`` when ``labels`` are given), then the legend and a short reading guide."""
    n, num_cycles = _shown(images, traces, max_images)
    font = _font()
    columns, titles = _columns(num_cycles)
    texts = _label_texts(labels, class_names, n)
    panels = [[_panel(images[i], grid, traces[i], _cycle(traces[i], c), scale) for c in columns] for i in range(n)]
    pw, ph = panels[0][0].size
    label_w = 0 if texts is None else min(110, max(int(font.getlength(t)) for t in texts)) + 2 * GAP
    lh = _line_height(font)
    body = Image.new("RGB", (label_w + len(columns) * (pw + GAP) + GAP, lh + n * (ph + GAP) + GAP), "white")
    draw = ImageDraw.Draw(body)
    for j, title in enumerate(titles):
        x = label_w + GAP + j * (pw + GAP)
        draw.text((x + (pw - font.getlength(title)) / 2, GAP // 2), title, fill="black", font=font)
    for i, row in enumerate(panels):
        y = lh + GAP + i * (ph + GAP)
        if texts is not None:
            lines = _wrap(texts[i], font, label_w - 2 * GAP)
            for k, line in enumerate(lines):
                draw.text((GAP, y + (ph - len(lines) * lh) // 2 + k * lh), line, fill="black", font=font)
        for j, panel in enumerate(row):
            body.paste(panel, (label_w + GAP + j * (pw + GAP), y))
    width = max(body.width, MIN_WIDTH)
    return _vstack([_text_block(_title(n, len(images), num_cycles), width, font), body,
                    _legend(width, font, num_cycles > 1), _text_block(_note(num_cycles), width, font)])


def acceptance_frames(images: torch.Tensor, traces: list[list[dict]], grid: int, max_images: int = 8,
                      scale: int = 4, *, labels=None, class_names=None) -> list[Image.Image]:
    """GIF frames: frame k shows cycle k for every image side by side (captioned with its class label when
    ``labels`` are given); the last frame is the summary (the only frame when there is one cycle)."""
    n, num_cycles = _shown(images, traces, max_images)
    font = _font()
    columns, _ = _columns(num_cycles)
    texts = _label_texts(labels, class_names, n)
    lh = _line_height(font)
    ph, pw = images.shape[-2] * scale, images.shape[-1] * scale
    width = max(n * (pw + GAP) + GAP, MIN_WIDTH)
    captions = [[] for _ in range(n)] if texts is None else [_wrap(t, font, pw) for t in texts]
    cap_h = lh * max(len(c) for c in captions)
    heads = []
    for c in columns:
        what = ("Summary of all cycles" if c is None and num_cycles > 1 else
                "Cycle 1 of 1" if c is None else f"Cycle {c + 1} of {num_cycles}")
        heads.append(f"{what} ({_title(n, len(images), num_cycles)})")
    head_lines = max(len(_wrap(h, font, width - 2 * GAP)) for h in heads)
    legend = _legend(width, font, num_cycles > 1)
    note = _text_block(_note(num_cycles), width, font)
    frames = []
    for c, head in zip(columns, heads):
        row = Image.new("RGB", (width, cap_h + ph + 2 * GAP), "white")
        draw = ImageDraw.Draw(row)
        for i in range(n):
            x = GAP + i * (pw + GAP)
            for k, line in enumerate(captions[i]):
                draw.text((x, GAP + k * lh), line, fill="black", font=font)
            row.paste(_panel(images[i], grid, traces[i], _cycle(traces[i], c), scale), (x, GAP + cap_h))
        frames.append(_vstack([_text_block(head, width, font, head_lines), row, legend, note]))
    return frames


def save_acceptance_map(path, images, traces, grid, max_images: int = 8, *, labels=None, class_names=None) -> None:
    """Write ``acceptance_map`` as a PNG. ``labels`` [N] class ids and ``class_names`` (id -> name) label the
    rows; both optional."""
    picture = acceptance_map(images, traces, grid, max_images, labels=labels, class_names=class_names)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_acceptance_gif(path, images, traces, grid, max_images: int = 8, ms_per_frame: int = 600, *, labels=None,
                        class_names=None) -> None:
    """Write ``acceptance_frames`` as a looping GIF; the summary frame stays up four times as long."""
    frames = acceptance_frames(images, traces, grid, max_images, labels=labels, class_names=class_names)
    durations = [ms_per_frame] * (len(frames) - 1) + [ms_per_frame * 4]
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=durations, loop=0))
