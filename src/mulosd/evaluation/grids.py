"""Labelled image grids (one row per class) as PIL images."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


def image_grid(images: torch.Tensor, labels: torch.Tensor, class_names, scale: int = 3, pad: int = 2,
               label_width: int = 84) -> Image.Image:
    """images [N, C, H, W] in [0, 1]; one row per distinct label (in order of first appearance)."""
    images = images.clamp(0, 1)
    rows: dict[int, list[torch.Tensor]] = {}
    for img, lab in zip(images, labels.tolist()):
        rows.setdefault(lab, []).append(img)
    h, w = images.shape[-2] * scale, images.shape[-1] * scale
    ncol = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (label_width + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (lab, imgs) in enumerate(rows.items()):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), f"{lab}: {class_names[lab]}", fill="black", font=font)
        for c, img in enumerate(imgs):
            arr = (img.mul(255).round().byte().permute(1, 2, 0).squeeze(-1).numpy())
            tile = Image.fromarray(arr).convert("RGB").resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (w + pad), y))
    return canvas
