"""What ``mulosd generate`` writes besides its labelled grid: one PNG per image, and an ``.npz`` of tokens and
uint8 images (what FID evaluators and downstream scripts read). Both are written so that a reader never sees a
partial file, and a killed run never leaves a half-filled image folder under the requested name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mulosd.errors import MulosdError
from mulosd.io import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """images [N, C, H, W] in [0, 1] -> uint8 [N, H, W, C] (NHWC, the layout of image files and FID evaluators),
    rounded exactly as the grid rounds them, so every format shows the same pixels."""
    return images.detach().cpu().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_file_name(index: int, label: int, class_names) -> str:
    """``00007_8-bag.png``: the image's index in the run (its random stream) and its class id and name."""
    name = str(class_names[label]).replace(" ", "-").replace("/", "-") if 0 <= label < len(class_names) else "class"
    return f"{index:05d}_{label}-{name}.png"


def check_image_dir(directory: str | os.PathLike) -> Path:
    """Fail before any work when ``directory`` cannot receive the images: it is a file, or it already holds
    files other than a previous run's images."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise MulosdError(f"--save-images {directory} is a file; give a directory (new or empty)")
    if directory.is_dir():
        foreign = [p.name for p in directory.iterdir() if not p.name.endswith(".png")]
        if foreign:
            raise MulosdError(f"--save-images {directory} holds other files ({', '.join(sorted(foreign)[:3])}); "
                              "give a new or empty directory, or one holding only images")
    return directory


def save_image_files(directory: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, class_names,
                     first_index: int = 0) -> list[Path]:
    """One PNG per image in ``directory`` (named by ``image_file_name``). The files are written into a temporary
    folder beside it and moved in only when all are written, so a killed run adds no partial image; images of an
    earlier run under the same names are replaced."""
    from PIL import Image

    directory = check_image_dir(directory)
    arrays = to_uint8(images)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        names = []
        for i, (arr, label) in enumerate(zip(arrays, labels.tolist())):
            name = image_file_name(first_index + i, int(label), class_names)
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(staging / name, format="PNG")
            names.append(name)
        directory.mkdir(exist_ok=True)
        for name in names:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [directory / n for n in names]


def save_npz(path: str | os.PathLike, tokens: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
             predictions: torch.Tensor | None = None, first_index: int = 0) -> Path:
    """An ``.npz`` with ``tokens`` (as decoded: [N, g, g] codes, or [N, g, g, C] continuous tokens), ``images``
    (uint8 [N, H, W, C]), ``labels`` [N], ``indices`` [N] (each image's random stream) and, when the run classified
    its images, ``predictions`` [N]; written atomically."""
    arrays = {
        "tokens": tokens.detach().cpu().numpy(),
        "images": to_uint8(images),
        "labels": labels.detach().cpu().numpy().astype(np.int64),
        "indices": np.arange(first_index, first_index + len(labels), dtype=np.int64),
    }
    if predictions is not None:
        arrays["predictions"] = predictions.detach().cpu().numpy().astype(np.int64)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write)
