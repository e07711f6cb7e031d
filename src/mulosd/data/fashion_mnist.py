"""Fashion-MNIST from the standard IDX files.

The files come from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) or any
directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Images are 28x28 uint8; we pad them
with black to 32x32 (2 px each side) and map them to [-1, 1]. Low-resolution copies (16x16, 8x8) are made by
area averaging, the exact anti-aliased factor-2 down-sampler.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mulosd.errors import MulosdError

CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)

DEFAULT_DATA_DIRS = ("/usr/share/datasets/fashion-mnist",)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array, validating its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MulosdError(f"{path} is not an IDX file: its first two bytes must be zero")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise MulosdError(f"{path}: unknown IDX element type 0x{dtype_code:02x}; allowed: {sorted(_IDX_DTYPES)}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise MulosdError(f"{path}: header announces shape {dims} ({expected} bytes) but the file holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    prefix = _SPLIT_PREFIX[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        hits = [directory / f"{prefix}-{kind}-ubyte{sfx}" for sfx in (".gz", "")]
        hits = [h for h in hits if h.exists()]
        if not hits:
            return None
        found.append(hits[0])
    return found[0], found[1]


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Locate the IDX files: an explicit directory, then $MULOSD_DATA, then Debian's install location."""
    candidates = [Path(data_dir)] if data_dir is not None else []
    if data_dir is None and os.environ.get("MULOSD_DATA"):
        candidates.append(Path(os.environ["MULOSD_DATA"]))
    if data_dir is None:
        candidates += [Path(d) for d in DEFAULT_DATA_DIRS]
    for cand in candidates:
        if _split_files(cand, "train") or _split_files(cand, "test"):
            return cand
    where = ", ".join(str(c) for c in candidates)
    raise MulosdError(
        f"Fashion-MNIST IDX files not found in: {where}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --data-dir / set MULOSD_DATA to a "
        "directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
    )


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Down-sample [N, C, H, W] images to size x size by area averaging (exact for integer factors)."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] % size:
        raise MulosdError(f"cannot area-resize {images.shape[-1]} px to {size} px: the factor must be an integer")
    return F.interpolate(images, size=(size, size), mode="area")


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N, 1, 32, 32] float in [-1, 1], labels [N] int64) for ``split`` in {train, test}."""
    if split not in _SPLIT_PREFIX:
        raise MulosdError(f"unknown split {split!r}; allowed: {sorted(_SPLIT_PREFIX)}")
    directory = find_data_dir(data_dir)
    files = _split_files(directory, split)
    if files is None:
        raise MulosdError(f"{directory} has no {split} split ({_SPLIT_PREFIX[split]}-images-idx3-ubyte[.gz])")
    images = read_idx(files[0])
    labels = read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MulosdError(f"{directory}: images {images.shape} and labels {labels.shape} do not form a dataset")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    pad = (32 - x.shape[-1]) // 2
    x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))


@dataclass
class FashionMNIST:
    """Fashion-MNIST at 32x32 with its area-downscaled copies, kept in memory (70 k images are ~300 MB fp32)."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def load(cls, split: str = "train", data_dir: str | os.PathLike | None = None) -> "FashionMNIST":
        return cls(*load_fashion_mnist(split, data_dir))

    def at(self, size: int) -> torch.Tensor:
        """Images at ``size`` px (32, 16 or 8)."""
        if size not in (32, 16, 8):
            raise MulosdError(f"image size {size} not available; allowed: 32, 16, 8")
        return resize_images(self.images, size)

    def head(self, n: int | None) -> "FashionMNIST":
        """The first n examples (all when n is None)."""
        if n is None:
            return self
        if n < 1:
            raise MulosdError(f"--limit must be >= 1, got {n}")
        return FashionMNIST(self.images[:n], self.labels[:n])

    def __len__(self) -> int:
        return len(self.labels)
