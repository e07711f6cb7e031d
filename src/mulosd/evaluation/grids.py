"""Labelled image grids (one row per class) as PIL images."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from mulosd.outputs import to_uint8


def image_grid(images: torch.Tensor, labels: torch.Tensor, class_names, scale: int = 3, pad: int = 2,
               label_width: int = 84) -> Image.Image:
    """images [N, C, H, W] in [0, 1]; one row per distinct label (in order of first appearance)."""
    arrays = to_uint8(images)  # rounded as every other image file mulosd writes
    rows: dict[int, list] = {}
    for arr, lab in zip(arrays, labels.tolist()):
        rows.setdefault(lab, []).append(arr)
    h, w = images.shape[-2] * scale, images.shape[-1] * scale
    ncol = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (label_width + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (lab, imgs) in enumerate(rows.items()):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), f"{lab}: {class_names[lab]}", fill="black", font=font)
        for c, arr in enumerate(imgs):
            tile = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert("RGB").resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (w + pad), y))
    return canvas
