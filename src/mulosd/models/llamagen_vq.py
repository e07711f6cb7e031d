"""LlamaGen's VQ image tokenizer (VQ-16: 256 px -> 16x16 tokens, 16384 codes of dimension 8), rebuilt for mulosd.

The modules are laid out so that the state-dict keys are exactly those of LlamaGen's ``vq_model.py``
(``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight``): its
released files (``vq_ds16_c2i.pt``, ``vq_ds16_t2i.pt``, ``{"model": state_dict}``) load strictly with
:func:`load_llamagen_vq`. The public interface is that of :class:`mulosd.models.vq.VQModel` (``codebook``,
``embedding``, ``encode_latent``, ``quantize``, ``lookup``, ``encode``, ``decode_latent``, ``decode``), so the
pipeline, the up-samplers and the decoding methods can use either tokenizer.

The arithmetic follows LlamaGen's operation by operation (swish as ``x * sigmoid(x)``, attention as two batched
matrix products with the scale applied to the scores rather than ``scaled_dot_product_attention``, the
squared-distance formula for quantisation), so that with the same kernels tokens and pixels are bit-identical to
LlamaGen's, not merely close (checked on the CPU in float32 at VQ-16's real size, 256 and 384 px). The one
deliberate difference: quantisation distances are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mulosd.errors import MulosdError
from mulosd.io import Pretrained, config_from_dict, load_state_strict
from mulosd.models.llamagen import read_state_dict
from mulosd.models.vq import VQTokenizer

# Keys LlamaGen's checkpoints carry that inference does not use: the quantiser's ring buffer of recently used
# codes (training statistics, 65536 floats). They are accepted and dropped; any other extra key is an error.
TRAINING_ONLY_KEYS = ("quantize.codebook_used",)

CODEBOOK_KEY = "quantize.embedding.weight"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class LlamaGenVQConfig:
    """The architecture of a LlamaGen VQ tokenizer; the defaults are VQ-16.

    Names map to LlamaGen's ``ModelArgs`` and ``Encoder``/``Decoder`` arguments: ``codebook_dim`` is
    ``codebook_embed_dim``, ``channels`` is ``ch``, ``channel_mult`` is ``encoder_ch_mult`` (= ``decoder_ch_mult``:
    every released LlamaGen tokenizer uses the same multipliers on both sides), ``dropout`` is ``dropout_p``,
    ``commit_beta`` is ``commit_loss_beta``. ``norm_groups`` is LlamaGen's fixed GroupNorm group count (32); it is a
    field so that tests can build narrow models. VQ-8 is ``channel_mult=(1, 2, 2, 4)``.
    """

    codebook_size: int = 16384
    codebook_dim: int = 8
    in_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    dropout: float = 0.0
    norm_groups: int = 32
    commit_beta: float = 0.25

    def __post_init__(self):
        if isinstance(self.channel_mult, list):
            self.channel_mult = tuple(self.channel_mult)
        for name in ("codebook_size", "codebook_dim", "in_channels", "channels", "z_channels", "num_res_blocks",
                     "norm_groups"):
            if not _positive_int(getattr(self, name)):
                raise MulosdError(f"LlamaGenVQConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        mult = self.channel_mult
        if not isinstance(mult, tuple) or not mult or not all(_positive_int(m) for m in mult):
            raise MulosdError(f"LlamaGenVQConfig.channel_mult must be a non-empty list of positive integers (one per "
                              f"resolution; VQ-16 is (1, 1, 2, 2, 4)), got {mult!r}")
        widths = sorted({self.channels * m for m in (1, *mult)})
        if any(w % self.norm_groups for w in widths):
            raise MulosdError(f"LlamaGenVQConfig: every block width must be divisible by norm_groups="
                              f"{self.norm_groups} (GroupNorm); channels={self.channels} x channel_mult {mult} "
                              f"gives {widths}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise MulosdError(f"LlamaGenVQConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.commit_beta, bool) or not isinstance(self.commit_beta, (int, float)) or self.commit_beta < 0:
            raise MulosdError(f"LlamaGenVQConfig.commit_beta must be a number >= 0, got {self.commit_beta!r}")

    @property
    def downsample(self) -> int:
        """Pixels per token along each side: one halving between consecutive resolutions (16 for VQ-16)."""
        return 2 ** (len(self.channel_mult) - 1)


def _swish(x: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.silu: the fused kernel can differ in the last bit, and tokens must match LlamaGen's.
    return x * torch.sigmoid(x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``nin_shortcut`` projects the input when the width changes."""

    def __init__(self, cin: int, cout: int, cfg: LlamaGenVQConfig):
        super().__init__()
        self.norm1 = _norm(cin, cfg.norm_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, cfg.norm_groups)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of the coarsest resolution (1x1 convolutions as q, k, v)."""

    def __init__(self, channels: int, cfg: LlamaGenVQConfig):
        super().__init__()
        self.norm = _norm(channels, cfg.norm_groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, height * width)
        k = self.k(h).reshape(b, c, height * width)
        v = self.v(h).reshape(b, c, height * width)
        # Scores [b, query, key], scaled after the product (LlamaGen's order); 576 positions at 384 px, so cheap.
        weights = F.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row and column at the bottom/right, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour repeat, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[ResnetBlock], attns: list[AttnBlock], resample: tuple[str, nn.Module] | None) -> nn.Module:
    """One resolution: ``res.i`` blocks, ``attn.i`` after each of them (coarsest level only), then the resampler
    under its name (``downsample`` / ``upsample``; the last level of each side has none)."""
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        level.add_module(*resample)
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _middle(channels: int, cfg: LlamaGenVQConfig) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, cfg), AttnBlock(channels, cfg),
                          ResnetBlock(channels, channels, cfg)])


class Encoder(nn.Module):
    """images [B, in_channels, H, W] -> latents [B, z_channels, H/f, W/f]; levels go from fine to coarse."""

    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        levels, cin = [], cfg.channels
        for i, width in enumerate(widths):
            blocks = [ResnetBlock(cin if j == 0 else width, width, cfg) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(width, cfg) for _ in range(cfg.num_res_blocks)] if i == last else []
            levels.append(_level(blocks, attns, ("downsample", Downsample(width)) if i < last else None))
            cin = width
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _middle(cin, cfg)
        self.norm_out = _norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """latents [B, z_channels, h, w] -> images [B, in_channels, h*f, w*f]; ``conv_blocks.0`` is the coarsest level."""

    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        coarsest = len(widths) - 1
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _middle(cin, cfg)
        levels = []
        for i in reversed(range(len(widths))):
            width = widths[i]
            blocks = [ResnetBlock(cin if j == 0 else width, width, cfg) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(width, cfg) for _ in range(cfg.num_res_blocks + 1)] if i == coarsest else []
            levels.append(_level(blocks, attns, ("upsample", Upsample(width)) if i > 0 else None))
            cin = width
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(cin, cfg.norm_groups)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Quantizer(nn.Module):
    """The codebook (``embedding``, raw; used L2-normalised) and nearest-code search. Called as
    ``model.quantize(z)``: the submodule name is LlamaGen's (``quantize.embedding.weight``) and doubles as
    :class:`~mulosd.models.vq.VQModel`'s ``quantize`` method."""

    def __init__(self, cfg: LlamaGenVQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        # LlamaGen's initialisation: uniform in +-1/V, then rows L2-normalised.
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        with torch.no_grad():
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    @property
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code for each latent of z [B, D, h, w] (L2-normalised, as ``encode_latent`` returns them) ->
        tokens [B, h, w] int64.

        Distance is LlamaGen's ``|z|^2 + |e|^2 - 2 z.e`` over normalised vectors, computed in float32 whatever the
        model dtype (half precision would create ties); ``argmin`` keeps the lowest index among ties, as LlamaGen's
        does. For normalised z this is the code of highest cosine similarity, up to rounding.
        """
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        codes = self.codebook.float()
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * torch.mm(flat, codes.t())
        return dist.argmin(dim=1).reshape(b, h, w)


class LlamaGenVQ(VQTokenizer, Pretrained, nn.Module):
    """LlamaGen's VQ autoencoder: encoder -> 1x1 ``quant_conv`` -> L2-normalised codebook -> 1x1
    ``post_quant_conv`` -> decoder. Images are [B, 3, H, W] in [-1, 1] with H and W multiples of
    ``config.downsample`` (16 for VQ-16: 256 px -> 16x16 tokens, 384 px -> 24x24)."""

    config_class = LlamaGenVQConfig
    kind = "llamagen-vq"

    def __init__(self, config: LlamaGenVQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Quantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)

    @property
    def embedding(self) -> nn.Embedding:
        """The raw codebook parameter (what :func:`mulosd.models.upsample.tokenizer_fingerprint` hashes)."""
        return self.quantize.embedding

    def _check_images(self, images: torch.Tensor) -> None:
        f, c = self.config.downsample, self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c:
            raise MulosdError(f"LlamaGen VQ encodes images [B, {c}, H, W]; got a tensor of shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height < f or width < f or height % f or width % f:
            raise MulosdError(f"LlamaGen VQ with down-sampling factor {f} needs image height and width that are "
                              f"positive multiples of {f} (e.g. {16 * f} or {24 * f}); got {height}x{width}")

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> L2-normalised latents [B, D, H/f, W/f] (before quantisation)."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images))
        # Normalised channels-last, as LlamaGen's quantiser does, so the values match it bit for bit.
        return F.normalize(z.permute(0, 2, 3, 1).contiguous(), dim=-1).permute(0, 3, 1, 2).contiguous()

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] -> normalised code vectors [B, D, h, w] (contiguous, so the decoder runs in NCHW)."""
        return self.codebook[tokens].permute(0, 3, 1, 2).contiguous()

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Integer token grids [B, h, w] only (no range check: that would sync the device inside decoding loops).
        Training (``forward``) uses LlamaGen's codebook and commitment losses; its entropy loss, weight 0 by
        default, is not included."""
        if tokens.dim() != 3 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise MulosdError(f"LlamaGen VQ decodes integer token grids [B, h, w]; got {tokens.dtype} of shape "
                              f"{tuple(tokens.shape)}")


def load_llamagen_vq(path: str | os.PathLike, config: LlamaGenVQConfig | dict | None = None) -> LlamaGenVQ:
    """Build a :class:`LlamaGenVQ` and load a LlamaGen tokenizer checkpoint into it strictly (eval mode).

    ``path``: LlamaGen's torch file (``vq_ds16_c2i.pt``: ``{"model": state_dict, ...}``, read with
    ``weights_only=True``) or a safetensors file with the same keys. The training-only ``quantize.codebook_used``
    buffer is dropped; any other missing, unknown or mis-shaped key is a MulosdError naming the file and key.

    ``config``: a :class:`LlamaGenVQConfig`, or a dict of its fields, or None (= ``{}``). LlamaGen's files carry no
    config. Fields a dict leaves out take VQ-16's values, except ``codebook_size`` and ``codebook_dim``, which are
    read from the file's ``quantize.embedding.weight`` (the codebook is what varies between LlamaGen's VQ-16
    tokenizers). So None loads any VQ-16 file; VQ-8 is ``{"channel_mult": [1, 2, 2, 4]}``. A codebook the config
    does give is checked against the file's, naming both shapes.
    """
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if k not in TRAINING_ONLY_KEYS}
    if CODEBOOK_KEY not in state:
        raise MulosdError(f"{path} has no {CODEBOOK_KEY}: not a LlamaGen VQ tokenizer checkpoint "
                          f"(first keys: {sorted(state)[:5]})")
    shape = tuple(state[CODEBOOK_KEY].shape)
    if len(shape) != 2:
        raise MulosdError(f"{path}: {CODEBOOK_KEY} must be a codebook_size x codebook_dim matrix, got shape {shape}")
    if config is None or isinstance(config, dict):
        fields = {"codebook_size": shape[0], "codebook_dim": shape[1], **(config or {})}
        config = config_from_dict(LlamaGenVQConfig, fields, f"the config given for {path}")
    elif not isinstance(config, LlamaGenVQConfig):
        raise MulosdError(f"config for {path} must be a LlamaGenVQConfig, a dict of its fields or None; "
                          f"got {type(config).__name__}")
    if shape != (config.codebook_size, config.codebook_dim):
        raise MulosdError(f"{path}: the codebook {CODEBOOK_KEY} is {shape[0]} x {shape[1]} but the config gives "
                          f"codebook_size x codebook_dim = {config.codebook_size} x {config.codebook_dim}")
    model = LlamaGenVQ(config)
    try:
        load_state_strict(model, state, str(path))
    except MulosdError as exc:
        raise MulosdError(f"{exc} (config: channels={config.channels}, channel_mult={config.channel_mult}, "
                          f"num_res_blocks={config.num_res_blocks}, z_channels={config.z_channels}; pass the "
                          f"checkpoint's architecture as config)") from None
    return model.eval()
