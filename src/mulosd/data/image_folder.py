"""A folder of images (PNG, JPEG) as training data, prepared the way LlamaGen prepares ImageNet.

Every ``.png``, ``.jpg`` and ``.jpeg`` file (any case) under a directory is an example, found recursively so
class sub-folders are allowed (their names are not used: no labels); files and folders whose names start with a
dot are skipped (macOS ``._name.jpg`` resource forks and the like are not images). The order is the sorted
relative paths, the same on every machine.

An image is read with Pillow and converted to RGB (``L`` for a one-channel tokenizer) first, as torchvision's
``ImageFolder`` loader does (alpha is dropped, not composited; EXIF orientation is not applied), then
centre-cropped to a square by :func:`center_crop_arr`, the convention of LlamaGen's ``dataset/augmentation.py``
(from ADM's guided-diffusion): halve with a box filter while the shorter side is at least twice the target size,
resize with bicubic so the shorter side is the target size (the other side rounded), then cut the centre square
(offsets rounded down). Pixels map to [-1, 1] as ``ToTensor`` + ``Normalize(0.5, 0.5)`` map them.

Memory: only the file list is kept. Images are decoded when asked for (``read``, ``load``, ``chunks``), so a
training recipe can stream a large folder in chunks and keep what it derives (tokens), not the pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mulosd.errors import MulosdError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNEL_MODES = {1: "L", 3: "RGB"}


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """``image`` as a ``size`` x ``size`` square, by LlamaGen's (ADM's) centre-crop rule: box-filter halvings while
    the shorter side is >= 2 * size (cheap anti-aliasing before the final resize), one bicubic resize that makes the
    shorter side exactly ``size`` (the longer side rounded with Python's ``round``), then the centre square with its
    offsets rounded down (an odd surplus leaves one more row or column at the bottom or right)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    top, left = (image.height - size) // 2, (image.width - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1], computed as torchvision's ToTensor + Normalize(0.5, 0.5)."""
    return pixels.float().div(255).sub(0.5).div(0.5)


def find_images(root: str | os.PathLike) -> list[str]:
    """The image files under ``root`` (recursively; dot-named files and folders skipped), as sorted paths relative
    to ``root`` in POSIX form. A missing root or one without images is a MulosdError."""
    root = Path(root)
    if not root.exists():
        raise MulosdError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise MulosdError(f"image folder {root} is not a directory")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place: os.walk does not descend into them
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise MulosdError(f"no images in {root}: looked recursively for {', '.join(IMAGE_EXTENSIONS)} files (any case)")
    return sorted(found)


class ImageFolder(torch.utils.data.Dataset):
    """The images under ``root`` as ``channels`` x ``size`` x ``size`` float tensors in [-1, 1] (see the module
    docstring for the order and the crop). ``limit`` keeps the first N files. Only paths are held; each access
    decodes its files, so memory stays bounded whatever the folder's size."""

    def __init__(self, root: str | os.PathLike, size: int, channels: int = 3, limit: int | None = None):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise MulosdError(f"image size must be an integer >= 1, got {size!r}")
        if channels not in CHANNEL_MODES:
            raise MulosdError(f"an image folder gives 1 (grayscale) or 3 (RGB) channels; the tokenizer wants "
                              f"{channels}")
        if limit is not None and limit < 1:
            raise MulosdError(f"limit must be >= 1, got {limit}")
        self.root, self.size, self.channels = Path(root), size, channels
        self.files = find_images(self.root)[:limit]

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 [C, size, size] (a quarter of the float's memory, for callers that cache)."""
        path = self.path(index)
        try:
            with Image.open(path) as image:
                image = image.convert(CHANNEL_MODES[self.channels])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # OSError covers unidentified and truncated files; Pillow raises the others for some corrupt headers
            raise MulosdError(f"cannot read image {path}: {exc}") from None
        pixels = np.asarray(center_crop_arr(image, self.size), dtype=np.uint8).reshape(self.size, self.size, -1)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_signed(self.read(index))

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as one float batch [n, C, size, size] in [-1, 1]."""
        return to_signed(torch.stack([self.read(i) for i in indices]))

    def chunks(self, chunk_size: int) -> Iterator[torch.Tensor]:
        """Every image in order, ``chunk_size`` at a time (float batches in [-1, 1]): one chunk in memory at once."""
        for start in range(0, len(self), chunk_size):
            yield self.load(range(start, min(start + chunk_size, len(self))))
