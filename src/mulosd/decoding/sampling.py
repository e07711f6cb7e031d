"""The one sampling module every decoder, drafter and verifier uses.

Order of operations (fixed, documented, shared by all methods):

1. **CFG mixing** on logits: ``uncond + s * (cond - uncond)``. The batch is laid out ``[cond ; uncond]``
   (first half conditional, second half the null condition). When guidance is on depends on the convention:
   ``mulosd`` (default) guides whenever ``cfg_scale != 1`` (a scale below 1 moves away from the condition);
   ``llamagen`` guides only when ``cfg_scale > 1``, as LlamaGen's ``generate`` does (a scale <= 1 samples the
   conditional model alone). ``cfg_interval`` >= 0 is LlamaGen's option of the same name: guidance for image
   tokens 0 .. cfg_interval + 1 only (its decoding loop counts from the second token), the conditional logits
   alone after that; -1 (default) guides every token. The unconditional half is still computed throughout.
2. **Temperature**: logits / T. ``T == 0`` means greedy: the distribution is one-hot at the argmax of the
   CFG-mixed logits (top-k / top-p do not change the argmax, so they are skipped).
3. **Top-k**: keep logits >= the k-th largest (ties at the boundary are kept). ``k == 0`` disables it.
4. **Top-p** (nucleus): sort the remaining probabilities descending and keep the smallest prefix whose mass
   reaches p (the token that crosses p is kept; the top token is always kept). ``p == 1`` disables it.
5. **Softmax** over what is left.

Continuous tokens (:mod:`mulosd.decoding.continuous`) take steps 1 and 2 inside their diffusion head: guidance
mixes the head's predicted noise with the same scale and layout, and the temperature scales every reverse step's
standard deviation (MAR's convention); top-k and top-p are refused (:func:`check_continuous`).

``process_logits`` returns the final probabilities (what drafters record as q and verifiers use as p);
``sample`` draws from them by inverse CDF with uniforms from per-sample random streams, so an image's
randomness does not depend on which batch it was drawn in.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, fields

import torch

from mulosd.errors import MulosdError


CFG_CONVENTIONS = ("mulosd", "llamagen")


@dataclass(frozen=True)
class SamplingConfig:
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_convention: str = "mulosd"
    cfg_interval: int = -1

    def __post_init__(self):
        if not (0.0 <= self.cfg_scale <= 50.0):
            raise MulosdError(f"cfg scale {self.cfg_scale} out of range; allowed: 0 <= cfg-scale <= 50 (1 = no guidance)")
        if not (0.0 <= self.temperature <= 10.0):
            raise MulosdError(f"temperature {self.temperature} out of range; allowed: 0 (greedy) <= temperature <= 10")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise MulosdError(f"top-k {self.top_k} out of range; allowed: an integer >= 0 (0 = off)")
        if not (0.0 < self.top_p <= 1.0):
            raise MulosdError(f"top-p {self.top_p} out of range; allowed: 0 < top-p <= 1 (1 = off)")
        if self.cfg_convention not in CFG_CONVENTIONS:
            raise MulosdError(f"cfg convention {self.cfg_convention!r} unknown; allowed: {', '.join(CFG_CONVENTIONS)}")
        if isinstance(self.cfg_interval, bool) or int(self.cfg_interval) != self.cfg_interval or self.cfg_interval < -1:
            raise MulosdError(f"cfg interval {self.cfg_interval} out of range; allowed: -1 (guide every token) or an "
                              "integer >= 0 (guide image tokens 0 .. interval + 1, as LlamaGen's --cfg-interval)")

    @property
    def uses_cfg(self) -> bool:
        """Whether decoders must run the doubled [cond ; uncond] batch (see the convention in the module doc)."""
        return self.cfg_scale > 1.0 if self.cfg_convention == "llamagen" else self.cfg_scale != 1.0

    @property
    def last_guided(self) -> int | None:
        """The last image-token index that gets guidance, or None when every token does."""
        return self.cfg_interval + 1 if self.uses_cfg and self.cfg_interval >= 0 else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def record(self) -> dict:
        """The settings as a run's configuration records them (bench, sample: compared on resume): LlamaGen's two
        guidance options only when they are not the default, so runs written before they existed still resume."""
        out = dict(vars(self))
        defaults = {f.name: f.default for f in fields(self)}
        for key in ("cfg_convention", "cfg_interval"):
            if out[key] == defaults[key]:
                del out[key]
        return out


@dataclass
class SamplingSettings:
    """The sampling settings as a run's configuration carries them (bench, sample: flat fields, as their JSON
    records them); ``sampling()`` is the checked SamplingConfig."""

    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_convention: str = "mulosd"
    cfg_interval: int = -1

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in fields(SamplingConfig)})


def cfg_mix(logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """[2B, ..., V] laid out [cond ; uncond] -> [B, ..., V] guided logits (``scale`` a number, or a tensor
    broadcastable to [B, ..., 1]: one scale per row, 1 giving the conditional logits)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def warp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Steps 2-5 on (already CFG-mixed) logits [..., V] -> probabilities [..., V]."""
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        drop_sorted = before >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def guidance_scale(cfg: SamplingConfig, predicts: torch.Tensor | int | None) -> float | torch.Tensor:
    """The CFG scale for logits that predict image tokens ``predicts`` (indices in raster order, any shape): the
    configured scale, or, with a ``cfg_interval``, that scale up to token interval + 1 and 1 (the conditional
    logits) after it. ``predicts`` may be None only when no interval is set."""
    last = cfg.last_guided
    if last is None:
        return cfg.cfg_scale
    if predicts is None:
        raise ValueError("a cfg_interval needs the token indices the logits predict (process_logits(predicts=...))")
    predicts = torch.as_tensor(predicts)
    scale = torch.where(predicts <= last, cfg.cfg_scale, 1.0).float()
    return scale.unsqueeze(-1)


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, predicts: torch.Tensor | int | None = None) -> torch.Tensor:
    """Raw model logits [rows, ..., V] (the doubled batch when ``cfg.uses_cfg``) -> final sampling probabilities
    [B, ..., V], computed in float32 whatever the model's dtype (guidance amplifies rounding: s * (cond - uncond)).
    ``predicts`` (shape [B, ...], or an int for every row): the image-token index each row's logits predict, which
    ``cfg_interval`` needs (the row fed at cell c predicts token c + 1; a prefill predicts token 0)."""
    logits = logits.float()
    if cfg.uses_cfg:
        scale = guidance_scale(cfg, predicts)
        logits = cfg_mix(logits, scale.to(logits.device) if isinstance(scale, torch.Tensor) else scale)
    return warp(logits, cfg)


# Seeds a run accepts: image i of seed s uses the stream s * SEED_STRIDE + i, which must stay a valid 64-bit seed.
MAX_SEED = 2**32 - 1
SEED_STRIDE = 1_000_003


def check_seed(seed) -> int:
    """A run's seed as an int, or a clear error naming the allowed range."""
    try:
        value = operator.index(seed)  # ints and numpy/torch integers; never floats or bools' silent truth values
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or not 0 <= value <= MAX_SEED:
        raise MulosdError(f"seed {seed!r} out of range; allowed: an integer from 0 to {MAX_SEED} (2^32 - 1)")
    return value


class RandomStreams:
    """One ``torch.Generator`` per image, seeded from (seed, image index): the same image gets the same random draws
    whichever batch it is decoded in and whatever the batch size. The generators run on the CPU and their draws are
    moved to ``device``, so an image's uniforms are the same on every device (the models' arithmetic may still
    differ across devices and dtypes)."""

    def __init__(self, seeds: list[int] | torch.Tensor, device: torch.device | str | None = None):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @classmethod
    def from_seed(cls, seed: int, indices, device: torch.device | str | None = None) -> "RandomStreams":
        check_seed(seed)
        return cls([seed * SEED_STRIDE + int(i) for i in indices], device)

    def to(self, device: torch.device | str) -> "RandomStreams":
        """The same streams (same generators, same positions) delivering their draws on ``device``."""
        out = RandomStreams.__new__(RandomStreams)
        out.seeds, out.generators, out.device = self.seeds, self.generators, torch.device(device)
        return out

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, rows) -> "RandomStreams":
        """The streams of images ``rows`` (indices), sharing their generators: drawing from one draws from both."""
        out = RandomStreams.__new__(RandomStreams)
        rows = [int(r) for r in rows]
        out.seeds, out.generators, out.device = [self.seeds[r] for r in rows], [self.generators[r] for r in rows], self.device
        return out

    def fork(self, salt: int) -> "RandomStreams":
        """Independent per-image streams for another consumer (e.g. a drafter), so its draws never shift the
        target's: the target sees the same uniforms whatever the drafter does. (torch's CPU generator keeps only
        the low 32 bits of a seed, so the derived seeds are hashed into that range, never offset past it.)"""
        return RandomStreams([int.from_bytes(hashlib.sha256(f"{s}/{salt}".encode()).digest()[:4], "little")
                              for s in self.seeds], self.device)

    def uniform(self, *shape: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, *shape] uniforms in [0, 1), row b from stream b. ``rows`` [B] bool: only those streams draw (the
        others return zeros and do not advance), so an image's draws never depend on its batch-mates."""
        if rows is None:
            return torch.stack([torch.rand(shape, generator=g) for g in self.generators]).to(self.device)
        return torch.stack([torch.rand(shape, generator=g) if bool(on) else torch.zeros(shape, device="cpu")
                            for g, on in zip(self.generators, rows.tolist())]).to(self.device)

    def normal(self, *shape: int) -> torch.Tensor:
        """[B, *shape] standard normals, row b from stream b (continuous tokens: diffusion noises, proposals)."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)


def check_continuous(cfg: SamplingConfig) -> None:
    """Continuous tokens use the same guidance and temperature, applied inside the diffusion head (CFG on the
    predicted noise, temperature on every reverse step's std); a filter over a vocabulary has no meaning there."""
    if cfg.top_k or cfg.top_p < 1.0:
        raise MulosdError("top-k / top-p filter a vocabulary and do not apply to continuous tokens; use top-k 0 and top-p 1")
    if cfg.cfg_interval != -1:
        raise MulosdError(f"cfg interval {cfg.cfg_interval} is LlamaGen's option for discrete tokens; continuous "
                          "tokens guide every token: use cfg interval -1")
    if cfg.greedy:
        raise MulosdError("continuous tokens need temperature > 0 (the diffusion head has no greedy mode)")


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first index whose cumulative mass exceeds u * total. probs [..., V], uniforms [...].
    Zero-probability tokens are never returned."""
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)
