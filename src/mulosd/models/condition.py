"""What a GPT is conditioned on: class ids (c2i models) or captions (t2i models).

Every decoder passes its batch's condition around as one object: a LongTensor of class ids [B], or
:class:`Captions`, a batch of text-encoder features [B, T, C] with a mask [B, T] of the positions holding a
caption token. Both support ``len``, slicing by image, ``.to(device)`` and ``.device``, which is all the engine and
the pipeline do with a condition; only the GPT looks inside (:meth:`mulosd.models.gpt.GPT.embed_condition`).

Captions follow LlamaGen's t2i layout: T = 120 positions, caption tokens right-aligned ("left padding": the
padding comes first, so the last condition position, which predicts image token 0, is always a caption token),
padding features zero, and padding positions hidden from every other position's attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mulosd.errors import MulosdError


@dataclass
class Captions:
    """A batch of captions as text-encoder features. ``features`` [B, T, C] float32; ``mask`` [B, T] bool, True
    where a caption token sits (at least one per caption)."""

    features: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.features.dim() != 3:
            raise MulosdError(f"caption features must be [batch, tokens, channels], got shape {tuple(self.features.shape)}")
        if self.mask.shape != self.features.shape[:2]:
            raise MulosdError(f"caption mask {tuple(self.mask.shape)} does not match features {tuple(self.features.shape)}")
        self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index) -> "Captions":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Captions(self.features[index], self.mask[index])

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device) -> "Captions":
        return Captions(self.features.to(device), self.mask.to(device))

    def cpu(self) -> "Captions":
        return self.to("cpu")

    def repeat(self, n: int) -> "Captions":
        """Each caption n times in a row (n images per caption, caption-major, as classes are)."""
        return Captions(self.features.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    @classmethod
    def cat(cls, parts: list["Captions"]) -> "Captions":
        return cls(torch.cat([p.features for p in parts]), torch.cat([p.mask for p in parts]))

    @classmethod
    def from_tokens(cls, features: torch.Tensor, length: int, where: str = "caption") -> "Captions":
        """One caption's features [L, C] (its tokens only, L >= 1) placed as LlamaGen places them: truncated to the
        first ``length`` tokens, right-aligned in ``length`` positions, zeros before."""
        if features.dim() != 2 or features.shape[0] < 1:
            raise MulosdError(f"{where}: caption features must be [tokens, channels] with at least one token, "
                              f"got shape {tuple(features.shape)}")
        n = min(length, features.shape[0])
        out = torch.zeros(1, length, features.shape[1], dtype=torch.float32)
        out[0, length - n:] = features[:n].float()
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[0, length - n:] = True
        return cls(out, mask)


def read_caption_features(path: str | Path, length: int, channels: int) -> Captions:
    """One caption from a feature file: LlamaGen's ``extract_t5_feature.py`` output (``.npy`` [1, L, C], the
    caption's L tokens only), or a plain ``.npy`` / ``.safetensors`` (one tensor) of [L, C] or [length, C]. A full
    [length, C] array is taken as already laid out: rows that are all zero are padding. L tokens are right-aligned;
    more than ``length`` are cut to the first ``length``, as LlamaGen's t2i dataset does. A full array must be
    laid out that way already (zero rows, then the tokens). Anything else is an error naming the shape and what
    is allowed."""
    path = Path(path)
    if not path.is_file():
        raise MulosdError(f"caption feature file {path} not found")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise MulosdError(f"{path} is not a readable .npy array: {exc}") from None
        features = torch.from_numpy(np.asarray(array, dtype=np.float32))
    elif path.suffix == ".safetensors":
        from mulosd.io import read_safetensors

        tensors = read_safetensors(path)
        if len(tensors) != 1:
            raise MulosdError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); a caption file "
                              "must hold exactly one")
        features = next(iter(tensors.values())).float()
    else:
        raise MulosdError(f"caption feature file {path} must be .npy or .safetensors")
    if features.dim() == 3 and features.shape[0] == 1:
        features = features[0]
    allowed = f"[1, L, {channels}] (LlamaGen's extract_t5_feature.py), [L, {channels}] or [{length}, {channels}]"
    if features.dim() != 2 or features.shape[1] != channels or features.shape[0] < 1:
        raise MulosdError(f"{path}: caption features have shape {tuple(features.shape)}; allowed: {allowed} with "
                          f"L >= 1 (the model takes {length} condition tokens of {channels} channels)")
    if not torch.isfinite(features).all():
        raise MulosdError(f"{path}: caption features hold NaN or infinite values")
    if features.shape[0] == length:
        mask = features.abs().sum(-1) > 0
        if not mask.any():
            raise MulosdError(f"{path}: every caption position is zero (padding); a caption needs at least one token")
        first = int(mask.float().argmax())
        if not mask[first:].all():
            raise MulosdError(f"{path}: a [{length}, {channels}] caption must hold its tokens in the last positions "
                              f"after all-zero padding rows (LlamaGen's left padding); rows {first}..{length - 1} are "
                              "not all tokens. Save a caption's own tokens as [L, C] instead (e.g. T5's output cut "
                              "to its attention mask)")
        return Captions(features[None], mask[None])
    return Captions.from_tokens(features, length, str(path))
