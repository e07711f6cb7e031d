"""Per-model training recipes: what to build, what data to read, and which loss to minimise.

Data stays on the CPU; ``loss`` and ``evaluate`` move what they use to the model's device (``model_device``) and
bring results back. Random draws come from the trainer's CPU generator and are moved after drawing, so a seed gives
the same draws on every device.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mulosd.data import FashionMNIST, resize_images
from mulosd.io import weights_fingerprint
from mulosd.models.classifier import Classifier, ClassifierConfig
from mulosd.models.gpt import GPTConfig
from mulosd.models.vq import VQConfig, VQModel
from mulosd.pipeline import load_tokenizer


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on (where a recipe sends its batches)."""
    return next(model.parameters()).device


def moved_to(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A frozen network, moved to ``device`` on first use there (in place; later calls find it there)."""
    if model_device(net) != device:
        net.to(device)
    return net


def bf16_autocast(device: torch.device, enabled: bool):
    """A recipe's own bf16 switch (--bf16): autocast on the model's device type when on, nothing when off (an
    autocast with enabled=False would switch off the trainer's --dtype autocast around it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@dataclass
class TokenizerRecipe:
    """VQ autoencoder on all three scales at once (32, 16, 8 px), so one set of weights serves every grid."""

    vq: VQConfig = field(default_factory=VQConfig)
    scales: tuple[int, ...] = (32, 16, 8)
    data_dir: str | None = None
    dead_code_every: int = 100
    limit: int | None = None  # use only the first N training images (quick experiments, tests)
    name: str = "tokenizer"

    def __post_init__(self):
        data = FashionMNIST.load("train", self.data_dir).head(self.limit)
        self.images = {s: data.at(s) for s in self.scales}
        self._usage = torch.zeros(self.vq.codebook_size)
        self._latents: torch.Tensor | None = None

    def describe(self) -> dict:
        return {"vq": asdict(self.vq), "scales": list(self.scales), "limit": self.limit}

    def build_model(self):
        return VQModel(self.vq)

    def num_examples(self) -> int:
        return len(self.images[self.scales[0]])

    def loss(self, model, index, step, gen):
        device = model_device(model)
        self._usage = self._usage.to(device)
        total, metrics = 0.0, {}
        for s in self.scales:
            x = self.images[s][index].to(device)
            if step == 0 and s == self.scales[0]:  # initialise the codebook from real latents
                with torch.no_grad():
                    z = model.encode_latent(x).permute(0, 2, 3, 1).reshape(-1, self.vq.codebook_dim)
                    pick = torch.randint(len(z), (self.vq.codebook_size,), generator=gen).to(device)
                    model.embedding.weight.copy_(z[pick])
            rec, vq_loss, tokens, z = model(x)
            mse = F.mse_loss(rec, x)
            total = total + mse + vq_loss
            metrics[f"mse{s}"] = mse.item()
            self._usage += torch.bincount(tokens.flatten(), minlength=self.vq.codebook_size).float()
            if s == self.scales[0]:
                self._latents = z.detach().permute(0, 2, 3, 1).reshape(-1, self.vq.codebook_dim)
                self._gen = gen
        return total, metrics

    def after_step(self, model, step):
        """Restart codes unused over the last window at random current latents (keeps the codebook alive)."""
        if (step + 1) % self.dead_code_every:
            return
        dead = (self._usage == 0).nonzero().flatten()
        if len(dead) and self._latents is not None:
            pick = torch.randint(len(self._latents), (len(dead),), generator=self._gen).to(self._latents.device)
            with torch.no_grad():
                # latents are bfloat16 under --dtype bfloat16; the codebook stays float32
                model.embedding.weight[dead] = self._latents[pick].to(model.embedding.weight.dtype)
        self._usage.zero_()

    def evaluate(self, model) -> dict:
        test = FashionMNIST.load("test", self.data_dir).head(self.limit)
        device = model_device(model)
        out = {}
        with torch.no_grad():
            for s in self.scales:
                x = test.at(s)
                tokens = torch.cat([model.encode(x[i : i + 500].to(device)) for i in range(0, len(x), 500)])
                rec = torch.cat([model.decode(tokens[i : i + 500]).cpu() for i in range(0, len(x), 500)])
                tokens = tokens.cpu()
                mse = F.mse_loss(rec, x).item()  # images in [-1, 1]
                mse01 = mse / 4
                out[f"test_{s}px"] = {
                    "mse_pm1": round(mse, 5),
                    "psnr_db": round(10 * math.log10(1.0 / mse01), 2),
                    "codes_used": int(tokens.unique().numel()),
                }
        return out


@dataclass
class ClassifierRecipe:
    cfg: ClassifierConfig = field(default_factory=ClassifierConfig)
    data_dir: str | None = None
    limit: int | None = None
    name: str = "classifier"

    def __post_init__(self):
        data = FashionMNIST.load("train", self.data_dir).head(self.limit)
        self.images, self.labels = data.images, data.labels

    def describe(self) -> dict:
        return {"classifier": asdict(self.cfg), "limit": self.limit}

    def build_model(self):
        return Classifier(self.cfg)

    def num_examples(self) -> int:
        return len(self.labels)

    def loss(self, model, index, step, gen):
        device = model_device(model)
        x, y = self.images[index].to(device), self.labels[index].to(device)
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(device)  # horizontal flips: garments are symmetric
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        logits = model(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean().item()}

    def after_step(self, model, step):
        pass

    def evaluate(self, model) -> dict:
        test = FashionMNIST.load("test", self.data_dir).head(self.limit)
        pred = model.predict(test.images.to(model_device(model))).cpu()
        return {"test_accuracy": round((pred == test.labels).float().mean().item(), 4)}


def encode_dataset(tokenizer: VQModel, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """images [N, 1, H, W] -> flattened raster tokens [N, (H/f)*(W/f)] (int16 to keep the cache small), on the CPU
    whatever device the tokenizer is on."""
    device = model_device(tokenizer)
    out = [tokenizer.encode(images[i : i + batch].to(device)).flatten(1).cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).to(torch.int16)


@dataclass
class ARRecipe:
    """Class-conditional next-token training on tokenised Fashion-MNIST at grid_size x grid_size tokens
    (images down-sampled to grid_size * tokenizer factor pixels), with class dropout for CFG."""

    gpt: GPTConfig
    tokenizer: str
    data_dir: str | None = None
    bf16: bool = False
    limit: int | None = None
    name: str = "ar"

    def __post_init__(self):
        from mulosd.errors import MulosdError

        self.vq = VQModel.from_pretrained(self.tokenizer)
        if self.vq.config.codebook_size != self.gpt.vocab_size:
            raise MulosdError(
                f"tokenizer codebook size {self.vq.config.codebook_size} != model vocab_size {self.gpt.vocab_size}"
            )
        px = self.gpt.grid_size * self.vq.config.downsample
        if px not in (32, 16, 8):
            raise MulosdError(f"grid {self.gpt.grid_size} needs {px} px images; allowed grids: 16, 8, 4")
        data = FashionMNIST.load("train", self.data_dir).head(self.limit)
        self.labels = data.labels
        self.tokens = encode_dataset(self.vq, data.at(px))
        self.px = px

    def describe(self) -> dict:
        return {"gpt": asdict(self.gpt), "tokenizer": str(Path(self.tokenizer).resolve()), "bf16": self.bf16, "limit": self.limit}

    def build_model(self):
        from mulosd.models.gpt import GPT

        return GPT(self.gpt)

    def num_examples(self) -> int:
        return len(self.labels)

    def loss(self, model, index, step, gen):
        device = model_device(model)
        tokens = self.tokens[index].long().to(device)
        labels = self.labels[index].clone()
        drop = torch.rand(len(labels), generator=gen) < self.gpt.class_dropout_prob
        labels[drop] = self.gpt.num_classes
        labels = labels.to(device)
        with bf16_autocast(device, self.bf16):
            logits = model(labels, tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        return loss, {}

    def after_step(self, model, step):
        pass

    def evaluate(self, model) -> dict:
        test = FashionMNIST.load("test", self.data_dir)
        n = min(2000, self.limit or 2000)
        device = model_device(model)
        tokens = encode_dataset(self.vq, test.at(self.px)[:n]).long().to(device)
        labels = test.labels[:n].to(device)
        with torch.no_grad():
            nll = sum(
                F.cross_entropy(model(labels[i : i + 200], tokens[i : i + 200]).reshape(-1, self.gpt.vocab_size),
                                tokens[i : i + 200].reshape(-1), reduction="sum").item()
                for i in range(0, n, 200)
            )
        return {"test_nll_per_token": round(nll / tokens.numel(), 4), "test_images": n}


# Training images kept in memory (uint8) for the pixel loss of stage 2; past this budget a batch's images are read
# from their files again at every step: bounded memory for a large folder, no repeated decoding for a small one.
PIXEL_CACHE_BYTES = 1 << 30


def images_per_chunk(px: int, cells: int, vocab: int) -> int:
    """How many images to encode or evaluate at once: at most 500, ~2 M pixel values and ~64 M logits (``cells``
    high-resolution cells x ``vocab`` codes each) per chunk, so a 256 px image with a 16384-code tokenizer goes 16 at
    a time and a 32 px Fashion-MNIST image 500 at a time."""
    return max(1, min(500, (1 << 21) // (px * px), (1 << 26) // (cells * vocab)))


def model_set_tokenizer(model_set: str) -> tuple[Path, Path, int]:
    """(directory, tokenizer stem, target grid size) of a model set (shipped name or directory). The manifest is
    checked whole; the target's grid comes from its config alone, so a multi-gigabyte target is never loaded."""
    from mulosd.io import read_config
    from mulosd.models.gpt import GPT
    from mulosd.pipeline import _manifest_spec
    from mulosd.zoo import resolve

    directory = resolve(model_set)
    spec = _manifest_spec(directory)
    return directory, spec["tokenizer"], read_config(spec["target"], GPT.kind, GPTConfig).grid_size


def user_set_directory(model_set: str) -> Path | None:
    """The directory of ``model_set`` when it is the user's, None for a set shipped inside mulosd (never written)."""
    from mulosd.zoo import ZOO_DIR, resolve

    directory = resolve(model_set).resolve()
    return None if directory.is_relative_to(ZOO_DIR) else directory


def free_stem(directory: Path, base: str) -> str:
    """``base``, else ``base_2``, ``base_3``, ...: the first component stem with no files in ``directory``."""
    names = itertools.chain([base], (f"{base}_{k}" for k in itertools.count(2)))
    return next(s for s in names if not any((directory / s).with_suffix(x).exists() for x in (".json", ".safetensors")))


def add_upsampler_to_set(model_set: str | Path, upsampler: str | Path) -> Path:
    """Add the trained learned up-sampler at stem ``upsampler`` to the user model set ``model_set`` (a directory)
    for its factor r, replacing the set's entry for that r. It is checked against the set's tokenizer first; its
    files are written under a stem the set does not use yet (``upsampler_r<r>``, else ``upsampler_r<r>_2``, ...),
    then ``manifest.json`` is rewritten atomically to name it, so a reader sees either the old set or the new one.
    The files of a replaced up-sampler stay where they are. Returns the new component's stem."""
    from mulosd.errors import MulosdError
    from mulosd.models.upsample import LatentResampler
    from mulosd.zoo import manifest, write_manifest

    directory = user_set_directory(str(model_set))
    if directory is None:
        raise MulosdError(f"model set {model_set} is shipped with mulosd and is not written; add the up-sampler to a "
                          f"copy: mulosd pack --from {model_set} --out DIR --upsampler {upsampler}")
    _, tokenizer, _ = model_set_tokenizer(str(directory))
    m = LatentResampler.from_pretrained(upsampler)
    r = m.config.r
    m.check(load_tokenizer(tokenizer), r)
    spec = manifest(directory)
    stem = free_stem(directory, f"upsampler_r{r}")
    m.save_pretrained(directory / stem)
    ups = dict(spec.get("upsamplers") or {}, **{str(r): stem})
    spec["upsamplers"] = {k: ups[k] for k in sorted(ups, key=int)}
    write_manifest(directory, spec)
    return directory / stem


@dataclass
class UpsamplerRecipe:
    """The learned latent up-/down-sampler for one factor r (MuLo-SD's U_r and D_r), on pairs of codes of one
    image at P px and P/r px from one tokenizer.

    Tokenizer and data: ``tokenizer`` (a stem) trains on Fashion-MNIST at P = 32. ``model`` (a model set: directory
    or shipped name) uses the set's tokenizer and P = its target's grid x the tokenizer's factor, on Fashion-MNIST
    (a grayscale tokenizer and P = 32) or on ``data``, a folder of images (``mulosd.data.image_folder``: LlamaGen's
    centre crop to P px). The P/r px image is the P px one area-averaged (what the pixel down-sampler does). Codes
    are computed at the first step on the model's device in float32, a chunk of images at a time, and only the codes
    are kept; stage 2 reads its batch's folder images again, keeping up to ``PIXEL_CACHE_BYTES`` of them (uint8).

    Stage 1 (steps < ``ce_steps``): cross-entropy of the up-sampler's logits against the high-res codes, plus
    cross-entropy of the down-sampler against the low-res codes. Stage 2: the up-sampler's most likely codes are
    decoded by the frozen VQ decoder and compared with the P px image (MSE, weight ``pixel_weight``), gradients
    reaching the logits through a straight-through softmax; the cross-entropy terms stay on (up-sampler weight
    ``ce_weight``) so the output remains a calibrated distribution over codes. Stage 2 needs the tokenizer's
    ``decode_latent`` (code vectors [B, D, h, w] -> images, differentiable) beside the ``codebook``.

    Perceptual objective (the paper's pixel MSE + LPIPS-style feature loss): ``perceptual_weight`` > 0 adds, in
    stage 2, that weight times ``Classifier.perceptual_distance`` between the decoded up-sampled codes and the P px
    image, in the frozen feature space of ``features`` (a classifier stem; default: the ``model`` set's
    classifier). The classifier must take the tokenizer's channels at P px. Default 0: pixel MSE alone, the
    objective the shipped up-samplers were trained with.

    Evaluation: the first ``eval_images`` (default 2000) Fashion-MNIST test images, or for a folder the first
    ``eval_images`` (default 200) of ``eval_data``, else of the training folder (then not held out)."""

    tokenizer: str | None = None
    r: int = 2
    dim: int = 64
    n_blocks: int = 4
    ce_steps: int = 2000
    pixel_weight: float = 10.0
    ce_weight: float = 0.5
    data_dir: str | None = None
    limit: int | None = None
    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    eval_images: int | None = None
    perceptual_weight: float = 0.0
    features: str | None = None
    name: str = "upsampler"

    def __post_init__(self):
        from mulosd.data.image_folder import ImageFolder
        from mulosd.errors import MulosdError
        from mulosd.models.upsample import tokenizer_fingerprint

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 2:
            raise MulosdError(f"r must be an integer >= 2 (a learned up-sampler maps an h x w code grid to rh x rw), "
                              f"got {self.r!r}")
        if (self.tokenizer is None) == (self.model is None):
            raise MulosdError("give the tokenizer (--tokenizer STEM) or a model set (--model SET) whose tokenizer to "
                              "use, exactly one")
        if self.data is not None and self.data_dir is not None:
            raise MulosdError("give an image folder (--data) or the Fashion-MNIST directory (--data-dir), not both")
        if self.eval_data is not None and self.data is None:
            raise MulosdError("--eval-data needs --data: Fashion-MNIST runs evaluate on its test split")
        if self.eval_images is not None and self.eval_images < 1:
            raise MulosdError(f"--eval-images must be >= 1, got {self.eval_images}")
        if self.model is not None:
            directory, stem, grid = model_set_tokenizer(self.model)
            self.model = str(directory.resolve())
            self.vq = load_tokenizer(stem).eval()
            px = grid * self.vq.config.downsample
        else:
            stem = self.tokenizer
            self.vq = VQModel.from_pretrained(stem).eval()
            px = None
        self.tokenizer = str(Path(stem).resolve())
        for p in self.vq.parameters():
            p.requires_grad_(False)
        self.fingerprint = tokenizer_fingerprint(self.vq)
        channels, f = self.vq.config.in_channels, self.vq.config.downsample
        if self.data is None:
            if channels != 1:
                raise MulosdError(f"Fashion-MNIST is grayscale and the tokenizer takes {channels} channels: give a "
                                  "folder of images with --data")
            if px not in (None, 32):
                raise MulosdError(f"Fashion-MNIST images are 32 px; the model set's target needs {px} px (its grid x "
                                  f"the tokenizer's factor {f}): give a folder of images with --data")
            px = 32
        elif px is None:
            raise MulosdError("--data needs --model SET: the image size is the set's target grid x the tokenizer's "
                              "factor")
        if px % f:
            raise MulosdError(f"{px} px images do not divide into the tokenizer's {f} x {f} px cells")
        self.px, self.grid = px, px // f
        self.feature_net = self._feature_net(channels) if self.perceptual_weight > 0 else None
        if self.grid % self.r:
            raise MulosdError(f"r={self.r} does not divide the {self.grid} x {self.grid} code grid; allowed r: "
                              f"{', '.join(str(k) for k in range(2, self.grid + 1) if self.grid % k == 0)}")
        if self.data is None:
            self.folder, self.images = None, FashionMNIST.load("train", self.data_dir).head(self.limit).images
        else:
            self.folder, self.images = ImageFolder(self.data, px, channels, self.limit), None
        self.hi: torch.Tensor | None = None  # codes [N, grid, grid] and [N, grid/r, grid/r], from the first step on
        self.lo: torch.Tensor | None = None
        self._pixels: dict[int, torch.Tensor] = {}

    def _feature_net(self, channels: int) -> Classifier:
        """The frozen classifier whose features the perceptual term compares (``features``, else the set's)."""
        from mulosd.errors import MulosdError
        from mulosd.pipeline import _manifest_spec

        if self.perceptual_weight < 0 or not math.isfinite(self.perceptual_weight):
            raise MulosdError(f"--perceptual-weight must be a finite number >= 0, got {self.perceptual_weight}")
        if self.features is None and self.model is not None:
            stem = _manifest_spec(Path(self.model))["classifier"]
            if stem is None:
                raise MulosdError(f"model set {self.model} has no classifier for the perceptual loss: give one with "
                                  "--features STEM, or --perceptual-weight 0")
            self.features = str(stem)
        if self.features is None:
            raise MulosdError("--perceptual-weight needs a feature network: --features STEM (a classifier) or "
                              "--model SET with a classifier")
        net = Classifier.from_pretrained(self.features).eval()
        cfg = net.config
        if cfg.in_channels != channels or cfg.image_size != self.px:
            raise MulosdError(f"classifier {self.features} takes {cfg.in_channels}-channel {cfg.image_size} px "
                              f"images; the up-sampler's images are {channels}-channel {self.px} px")
        self.features = str(Path(self.features).resolve())
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def describe(self) -> dict:
        return {"tokenizer": self.tokenizer, "r": self.r, "dim": self.dim, "n_blocks": self.n_blocks,
                "ce_steps": self.ce_steps, "pixel_weight": self.pixel_weight, "ce_weight": self.ce_weight,
                "perceptual_weight": self.perceptual_weight, "features": self.features,
                "limit": self.limit, "model": self.model, "data": self.data and str(Path(self.data).resolve()),
                "eval_data": self.eval_data and str(Path(self.eval_data).resolve()), "eval_images": self.eval_images}

    def build_model(self):
        from mulosd.models.upsample import LatentResampler, LatentResamplerConfig

        return LatentResampler(LatentResamplerConfig(r=self.r, vocab_size=self.vq.config.codebook_size, dim=self.dim,
                                                     n_blocks=self.n_blocks, tokenizer_id=self.fingerprint))

    def num_examples(self) -> int:
        return len(self.folder) if self.folder is not None else len(self.images)

    def _chunk(self) -> int:
        return images_per_chunk(self.px, self.grid * self.grid, self.vq.config.codebook_size)

    def _chunks(self, folder, images: torch.Tensor | None):
        """Float image chunks in [-1, 1] on the CPU: of an image folder, or slices of an in-memory tensor."""
        if folder is not None:
            return folder.chunks(self._chunk())
        return (images[i : i + self._chunk()] for i in range(0, len(images), self._chunk()))

    def _encode_pair(self, vq, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P px images -> (their codes, the codes of their area-averaged P/r px copies), on the tokenizer's device."""
        x = x.to(model_device(vq))
        return vq.encode(x), vq.encode(resize_images(x, self.px // self.r))

    def _codes(self, device: torch.device) -> None:
        """Encode the training images once, on ``device`` in float32 (outside the trainer's autocast, so the codes
        do not depend on --dtype), kept on the CPU in the smallest integer type that holds the codebook."""
        vq = self._frozen_tokenizer(device)
        small = self.vq.config.codebook_size <= torch.iinfo(torch.int16).max + 1
        his, los = [], []
        with torch.autocast(device.type, enabled=False), torch.no_grad():
            for x in self._chunks(self.folder, self.images):
                hi, lo = self._encode_pair(vq, x)
                his.append(hi.cpu().to(torch.int16 if small else torch.int32))
                los.append(lo.cpu().to(torch.int16 if small else torch.int32))
        self.hi, self.lo = torch.cat(his), torch.cat(los)

    def _grids(self, index, device):
        if self.hi is None:
            self._codes(device)
        return self.hi[index].long().to(device), self.lo[index].long().to(device)

    def _target_images(self, index: torch.Tensor) -> torch.Tensor:
        """The P px images of a batch (stage 2): from memory (Fashion-MNIST), or read from the folder and kept
        while the cache's budget lasts."""
        if self.folder is None:
            return self.images[index]
        from mulosd.data.image_folder import to_signed

        out = []
        for i in index.tolist():
            pixels = self._pixels.get(i)
            if pixels is None:
                pixels = self.folder.read(i)
                if (len(self._pixels) + 1) * pixels.numel() <= PIXEL_CACHE_BYTES:
                    self._pixels[i] = pixels
            out.append(pixels)
        return to_signed(torch.stack(out))

    def _frozen_tokenizer(self, device: torch.device) -> VQModel:
        """The frozen tokenizer, moved to ``device`` (the model's) on first use there."""
        return moved_to(self.vq, device)

    def loss(self, model, index, step, gen):
        device = model_device(model)
        hi, lo = self._grids(index, device)
        logits = model.up_logits(lo)
        ce_up = F.cross_entropy(logits, hi)
        ce_down = F.cross_entropy(model.down_logits(hi), lo)
        metrics = {"ce_up": ce_up.item(), "ce_down": ce_down.item(), "acc_up": (logits.argmax(1) == hi).float().mean().item()}
        if step < self.ce_steps:
            return ce_up + ce_down, metrics
        soft = logits.softmax(1)
        hard = F.one_hot(soft.argmax(1), soft.shape[1]).permute(0, 3, 1, 2).to(soft.dtype)
        weights = hard + soft - soft.detach()  # forward: the argmax code; backward: through the softmax
        vq = self._frozen_tokenizer(device)
        codes = torch.einsum("bvhw,vd->bdhw", weights, vq.codebook)
        decoded, images = vq.decode_latent(codes), self._target_images(index).to(device)
        mse = F.mse_loss(decoded, images)
        metrics["mse"] = mse.item()
        loss = self.pixel_weight * mse + self.ce_weight * ce_up + ce_down
        if self.feature_net is not None:
            net = moved_to(self.feature_net, device)
            perceptual = net.perceptual_distance(decoded, images).mean()
            metrics["perceptual"] = perceptual.item()
            loss = loss + self.perceptual_weight * perceptual
        return loss, metrics

    def after_step(self, model, step):
        pass

    def evaluate(self, model) -> dict:
        """On the evaluation images (see the class docstring), a chunk at a time: exact-code accuracy of U_r and
        D_r, how often the true code is among the up-sampler's 5 most likely, PSNR of the decoded up-sampled codes,
        and the same for the pixel resampler; with a perceptual feature net, also the mean perceptual distance of
        the decoded codes (learned, pixel, and the tokenizer's own) to the images."""
        from mulosd.data.image_folder import ImageFolder
        from mulosd.models.upsample import PixelResampler

        n = self.eval_images or (2000 if self.folder is None else 200)
        if self.limit and self.eval_data is None:
            n = min(n, self.limit)
        if self.folder is None:
            folder, images = None, FashionMNIST.load("test", self.data_dir).head(n).images
        else:
            folder, images = ImageFolder(self.eval_data or self.data, self.px, self.folder.channels, n), None
        device = model_device(model)
        vq = self._frozen_tokenizer(device)
        pix = PixelResampler(vq, self.r)
        counts = dict.fromkeys(("images", "pixels", "up", "top5", "down", "pix_up", "pix_down"), 0)
        sse = dict.fromkeys(("learned", "pixel", "tokenizer"), 0.0)
        lp = dict.fromkeys(sse, 0.0)
        net = moved_to(self.feature_net, device) if self.feature_net is not None else None
        with torch.no_grad():
            for x in self._chunks(folder, images):
                x = x.to(device)
                hi, lo = self._encode_pair(vq, x)
                logits = model.up_logits(lo)
                up, pix_up = logits.argmax(1), pix.up(lo)
                counts["images"] += len(x)
                counts["pixels"] += x.numel()
                counts["up"] += (up == hi).sum().item()
                counts["top5"] += (logits.topk(5, dim=1).indices == hi[:, None]).any(1).sum().item()
                counts["down"] += (model.down_logits(hi).argmax(1) == lo).sum().item()
                counts["pix_up"] += (pix_up == hi).sum().item()
                counts["pix_down"] += (pix.down(hi) == lo).sum().item()
                for key, tokens in (("learned", up), ("pixel", pix_up), ("tokenizer", hi)):
                    decoded = vq.decode(tokens)
                    sse[key] += (decoded - x).pow(2).sum().item()
                    if net is not None:
                        lp[key] += net.perceptual_distance(decoded, x).sum().item()
        hi_cells = counts["images"] * self.grid * self.grid
        lo_cells = hi_cells // (self.r * self.r)

        def psnr(key):  # images in [-1, 1]: peak-to-peak 2
            return round(10 * math.log10(4.0 / (sse[key] / counts["pixels"])), 2)

        def share(key, cells):
            return round(counts[key] / cells, 4)

        out = {
            "test_images": counts["images"],
            "learned": {"up_token_acc": share("up", hi_cells), "up_top5_acc": share("top5", hi_cells),
                        "up_psnr_db": psnr("learned"), "down_token_acc": share("down", lo_cells)},
            "pixel": {"up_token_acc": share("pix_up", hi_cells), "up_psnr_db": psnr("pixel"),
                      "down_token_acc": share("pix_down", lo_cells)},
            "tokenizer_psnr_db": psnr("tokenizer"),
        }
        if net is not None:
            out["learned"]["up_perceptual"] = round(lp["learned"] / counts["images"], 5)
            out["pixel"]["up_perceptual"] = round(lp["pixel"] / counts["images"], 5)
            out["tokenizer_perceptual"] = round(lp["tokenizer"] / counts["images"], 5)
        if folder is not None:
            out["eval_data"] = {"folder": str(folder.root.resolve()), "held_out": self.eval_data is not None}
        return out


@dataclass
class KLTokenizerRecipe:
    """The continuous tokenizer: KL autoencoder on 32 px Fashion-MNIST, MSE + kl_weight * KL (posterior samples).
    At the end the per-channel latent statistics over the training set are stored in the model (tokens are
    standardised with them)."""

    kl: "KLConfig" = None
    data_dir: str | None = None
    limit: int | None = None
    name: str = "kl_tokenizer"

    def __post_init__(self):
        from mulosd.models.kl import KLConfig

        self.kl = self.kl or KLConfig()
        self.images = FashionMNIST.load("train", self.data_dir).head(self.limit).at(32)

    def describe(self) -> dict:
        return {"kl": asdict(self.kl), "limit": self.limit}

    def build_model(self):
        from mulosd.models.kl import KLAutoencoder

        return KLAutoencoder(self.kl)

    def num_examples(self) -> int:
        return len(self.images)

    def loss(self, model, index, step, gen):
        x = self.images[index].to(model_device(model))
        rec, kl, _ = model(x, gen)
        mse = F.mse_loss(rec, x)
        return mse + self.kl.kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}

    def after_step(self, model, step):
        pass

    def evaluate(self, model) -> dict:
        """Stores the latent statistics, then: test-split reconstruction MSE/PSNR from the tokens (posterior means)."""
        device = model_device(model)
        model.set_latent_statistics(self.images.to(device))
        test = FashionMNIST.load("test", self.data_dir).head(self.limit).at(32)
        with torch.no_grad():
            tokens = torch.cat([model.encode(test[i : i + 500].to(device)) for i in range(0, len(test), 500)])
            rec = torch.cat([model.decode(tokens[i : i + 500]).cpu() for i in range(0, len(tokens), 500)])
            tokens = tokens.cpu()
        mse = F.mse_loss(rec, test).item()
        return {"test_mse_pm1": round(mse, 6), "test_psnr_db": round(10 * math.log10(4.0 / mse), 2),
                "token_std": [round(v, 3) for v in tokens.reshape(-1, self.kl.token_dim).std(0).tolist()],
                "latent_std": [round(v, 4) for v in model.latent_std.tolist()]}


@dataclass
class ContinuousARRecipe:
    """Class-conditional continuous-token AR (transformer + diffusion head) on Fashion-MNIST tokenised by a KL
    tokenizer at 32 px (16x16 or 8x8 tokens), class dropout for CFG, the diffusion loss per token."""

    gpt: "ContinuousGPTConfig"
    tokenizer: str
    data_dir: str | None = None
    bf16: bool = False
    limit: int | None = None
    name: str = "car"

    def __post_init__(self):
        from mulosd.errors import MulosdError
        from mulosd.models.kl import KLAutoencoder

        self.kl = KLAutoencoder.from_pretrained(self.tokenizer)
        if self.kl.config.token_dim != self.gpt.token_dim:
            raise MulosdError(f"tokenizer tokens have {self.kl.config.token_dim} channels, the model expects {self.gpt.token_dim}")
        if self.gpt.grid_size * self.kl.config.downsample != 32:
            raise MulosdError(f"grid {self.gpt.grid_size} does not match 32 px images with factor {self.kl.config.downsample}")
        self.gpt.tokenizer_id = self.kl.fingerprint()
        data = FashionMNIST.load("train", self.data_dir).head(self.limit)
        self.labels = data.labels
        images = data.at(32)
        self.tokens = torch.cat([self.kl.encode(images[i : i + 500]) for i in range(0, len(images), 500)])

    def describe(self) -> dict:
        return {"gpt": asdict(self.gpt), "tokenizer": str(Path(self.tokenizer).resolve()), "bf16": self.bf16, "limit": self.limit}

    def build_model(self):
        from mulosd.models.cgpt import ContinuousGPT

        return ContinuousGPT(self.gpt)

    def num_examples(self) -> int:
        return len(self.labels)

    def loss(self, model, index, step, gen):
        device = model_device(model)
        tokens = self.tokens[index].to(device)
        labels = self.labels[index].clone()
        drop = torch.rand(len(labels), generator=gen) < self.gpt.class_dropout_prob
        labels[drop] = self.gpt.num_classes
        labels = labels.to(device)
        with bf16_autocast(device, self.bf16):
            z = model(labels, tokens)
        return model.head_loss(tokens, z.float())

    def after_step(self, model, step):
        pass

    def evaluate(self, model) -> dict:
        """Diffusion loss (noise MSE) on 1000 test images at random timesteps, seeded."""
        test = FashionMNIST.load("test", self.data_dir)
        n = min(1000, self.limit or 1000)
        images = test.at(32)[:n]
        device = model_device(model)
        tokens = torch.cat([self.kl.encode(images[i : i + 500]) for i in range(0, n, 500)]).to(device)
        labels = test.labels[:n].to(device)
        torch.manual_seed(0)
        with torch.no_grad():
            mses = [model.head_loss(tokens[i : i + 100], model(labels[i : i + 100], tokens[i : i + 100]))[1]["mse"]
                    for i in range(0, n, 100)]
        return {"test_noise_mse": round(sum(mses) / len(mses), 5), "test_images": n}


def target_samples(pipe, model: str, folder: Path, num_samples: int, cfg, data_seed: int, chunk: int,
                   desc: str = "target samples", continuous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` images sampled by the target of ``pipe`` alone (plain AR with the sampling settings ``cfg``;
    image i has class i mod C and random stream (``data_seed``, i)) as (tokens [n, N] codes, or [n, N, d] with
    ``continuous``: the set's continuous target, ``car``; labels [n]). They are written to ``folder`` in chunks of
    ``chunk`` images, each atomically, so a killed run keeps what it sampled and a resumed one reads them back; a
    folder holding samples made with other settings is refused."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from mulosd.decoding.methods import get_method
    from mulosd.decoding.sampling import RandomStreams
    from mulosd.errors import MulosdError
    from mulosd.io import atomic_write, atomic_write_json, read_json, read_safetensors
    from mulosd.models.eagle import target_fingerprint

    folder.mkdir(parents=True, exist_ok=True)
    if continuous:
        from mulosd.decoding.continuous import generate_car

        target = pipe.continuous_models().target
        generate = functools.partial(generate_car, target)
        fingerprint = weights_fingerprint(target.tok_embeddings.weight, target.head.out.weight)
    else:
        target = pipe.target
        generate = get_method("ar")(pipe).generate
        fingerprint = target_fingerprint(target)
    meta = {"model": str(model), "target": fingerprint, "cfg_scale": cfg.cfg_scale,
            "temperature": cfg.temperature, "data_seed": data_seed, "chunk": chunk}
    meta_path = folder / "samples.json"
    if meta_path.exists() and read_json(meta_path) != meta:
        raise MulosdError(f"{folder} holds samples made with other settings ({read_json(meta_path)}); use another --out")
    atomic_write_json(meta_path, meta)
    C = target.config.num_classes
    tokens, labels = [], []
    for start in tqdm(range(0, num_samples, chunk), desc=desc, leave=False):
        path = folder / f"chunk_{start:06d}.safetensors"
        data = read_safetensors(path) if path.exists() else None
        if data is not None and len(data["tokens"]) < min(chunk, num_samples - start):
            data = None  # the short last chunk of a run that asked for fewer samples: sample it again, whole
        if data is None:
            idx = list(range(start, min(start + chunk, num_samples)))
            lab = torch.tensor([i % C for i in idx])
            with torch.inference_mode():
                tok, _ = generate(lab, cfg, RandomStreams.from_seed(data_seed, idx))
            data = {"tokens": tok.cpu().contiguous(), "labels": lab}
            atomic_write(path, lambda tmp, d=data: save_file(d, tmp))
        n = min(chunk, num_samples - start)
        tokens.append(data["tokens"][:n])
        labels.append(data["labels"][:n])
    tokens = torch.cat(tokens)
    return (tokens.float() if continuous else tokens.long()), torch.cat(labels).long()


def held_out_count(num_samples: int, held_out: int | None, cap: int) -> int:
    """How many of ``num_samples`` target samples are held out for a recipe's evaluation: ``held_out``, by default
    a tenth of them, at least 1 and at most ``cap``; at least one sample must be left to train on."""
    from mulosd.errors import MulosdError

    held_out = max(1, min(cap, num_samples // 10)) if held_out is None else held_out
    if held_out < 1 or num_samples <= held_out:
        raise MulosdError(f"--samples must exceed the {held_out} held-out samples, got {num_samples}")
    return held_out


@dataclass
class TargetSampledRecipe:
    """The settings shared by the recipes that train on a model set's target's own samples (:class:`EagleRecipe`,
    :class:`DistillRecipe`, :class:`ContinuousDistillRecipe`): the set, where the samples are kept
    (:func:`target_samples`), how many and how many of them are held out, the decode-time sampling settings they
    are drawn with, their random streams' seed and the sampling batch. Each recipe sets its own default count."""

    model: str = "fmnist-32"
    samples_dir: str = ""
    num_samples: int = 2000
    held_out: int | None = None  # default: a tenth of the samples, capped by the recipe (held_out_count)
    cfg_scale: float = 3.0
    temperature: float = 1.0
    data_seed: int = 1
    sample_batch: int = 50

    def num_examples(self) -> int:
        """Training examples: the samples before the held-out ones."""
        return self.num_samples - self.held_out


@dataclass
class EagleRecipe(TargetSampledRecipe):
    """EAGLE's draft head for a model set's target, trained on the target's own samples.

    Data (documented in docs/METHODS.md): ``num_samples`` images sampled by the target alone (plain AR, the bench's
    sampling settings: CFG ``cfg_scale``, temperature ``temperature``; image i has class i mod C and random stream
    (``data_seed``, i)), so the head learns the distribution it will be asked to predict at decode time rather than
    the data set's. They are written to ``samples_dir`` in chunks (each atomically), so a killed run keeps what it
    sampled. The target's hidden states over each sample are computed once, for the conditional and the
    null-condition halves (kept in float16). The last ``held_out`` samples (default: a tenth, at most 100) are the
    evaluation set.

    Loss per position (EAGLE): smooth-L1 between the predicted and the target's next hidden state, plus ``ce_weight``
    x the cross-entropy of the head's token distribution (the target's frozen head on the predicted state) against
    the target's, for each half and for the guidance-mixed distributions the sampler uses. The input features get
    uniform noise of ``noise`` x their RMS (EAGLE's robustness to its own errors when it drafts several steps)."""

    ce_weight: float = 0.1
    noise: float = 0.1
    name: str = "eagle"

    def __post_init__(self):
        from mulosd.decoding.sampling import SamplingConfig
        from mulosd.errors import MulosdError
        from mulosd.pipeline import Pipeline

        self.held_out = held_out_count(self.num_samples, self.held_out, cap=100)
        self.pipe = Pipeline.from_pretrained(self.model)
        target = self.pipe.target
        if target.config.condition != "class":
            raise MulosdError("mulosd train eagle supports class-conditional (c2i) targets")
        for p in target.parameters():
            p.requires_grad_(False)
        self.target = target.eval()
        self.cfg = SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature)
        self.tokens, self.labels = self._samples()
        self.features = self._features()  # [S, 2, N, dim] float16: hidden state at cells -1 .. N-2, per half
        self.rms = float(self.features[:64].float().pow(2).mean().sqrt())

    def describe(self) -> dict:
        return {"model": str(self.model), "num_samples": self.num_samples, "held_out": self.held_out,
                "cfg_scale": self.cfg_scale, "temperature": self.temperature, "data_seed": self.data_seed,
                "ce_weight": self.ce_weight, "noise": self.noise}

    def _samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        return target_samples(self.pipe, self.model, Path(self.samples_dir), self.num_samples, self.cfg,
                              self.data_seed, self.sample_batch, desc="eagle: target samples")

    @torch.no_grad()
    def _features(self) -> torch.Tensor:
        t, out = self.target, []
        for i in range(0, len(self.tokens), 100):
            tok, lab = self.tokens[i : i + 100], self.labels[i : i + 100]
            halves = []
            for cond in (lab, torch.full_like(lab, t.null_class)):
                _, h = t(cond, tok, hidden=True)
                halves.append(h.to(torch.float16))
            out.append(torch.stack(halves, dim=1))
        return torch.cat(out)

    def build_model(self):
        from mulosd.models.eagle import EagleHead

        return EagleHead.for_target(self.target)

    def _losses(self, model, index, gen=None):
        from mulosd.decoding.sampling import process_logits
        from mulosd.models.eagle import head_logits

        device = model_device(model)
        feats = self.features[index].float().to(device)  # [b, 2, N, d]
        b, _, N, d = feats.shape
        tokens = self.tokens[index].to(device)
        x = feats.reshape(2 * b, N, d)
        if gen is not None and self.noise > 0:
            x = x + (torch.rand(x.shape, generator=gen) * 2 - 1).to(device) * self.noise * self.rms
        pred = model(x, torch.cat([tokens, tokens]))[:, :-1]  # predicted states at cells 0 .. N-2
        want = feats.reshape(2 * b, N, d)[:, 1:]
        reg = F.smooth_l1_loss(pred, want)
        t = self.target
        lp, lq = head_logits(t, want), head_logits(t, pred)
        ce = -(lp.softmax(-1) * lq.log_softmax(-1)).sum(-1).mean()
        predicts = torch.arange(1, N, device=device)
        p_mix = process_logits(lp, self.cfg, predicts=predicts)
        q_mix = process_logits(lq, self.cfg, predicts=predicts)
        mix = -(p_mix * q_mix.clamp_min(1e-12).log()).sum(-1).mean()
        return reg, ce, mix, p_mix, q_mix

    def loss(self, model, index, step, gen):
        reg, ce, mix, _, _ = self._losses(model, index, gen)
        return reg + self.ce_weight * (ce + mix), {"reg": round(reg.item(), 4), "ce_mix": round(mix.item(), 4)}

    def after_step(self, model, step):
        pass

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """On the held-out samples, one step ahead from the target's true features: the expected acceptance of a
        draft sampled from the head's (guided) distribution, sum_x min(p, q), and how often the two agree on the
        most likely token."""
        accept, agree, n = 0.0, 0.0, 0
        for i in range(self.num_examples(), self.num_samples, 25):
            index = torch.arange(i, min(i + 25, self.num_samples))
            reg, _, _, p, q = self._losses(model, index)
            accept += torch.minimum(p, q).sum(-1).sum().item()
            agree += (p.argmax(-1) == q.argmax(-1)).float().sum().item()
            n += p.shape[0] * p.shape[1]
        return {"held_out_samples": self.held_out, "expected_acceptance": round(accept / n, 4),
                "top1_agreement": round(agree / n, 4)}


def add_eagle_to_set(model_set: str | Path, head: str | Path) -> Path:
    """Add the trained EAGLE head at stem ``head`` to the user model set ``model_set`` (a directory), replacing its
    earlier head: checked against the set's target first, written under a stem the set does not use yet
    (``eagle_head``, ``eagle_head_2``, ...), then ``manifest.json`` rewritten atomically. Returns the new stem."""
    from mulosd.errors import MulosdError
    from mulosd.models.eagle import EagleHead
    from mulosd.models.gpt import GPT
    from mulosd.pipeline import _manifest_spec
    from mulosd.zoo import manifest, write_manifest

    directory = user_set_directory(str(model_set))
    if directory is None:
        raise MulosdError(f"model set {model_set} is shipped with mulosd and is not written; add the head to a copy: "
                          f"mulosd pack --from {model_set} --out DIR --eagle {head}")
    m = EagleHead.from_pretrained(head)
    m.check(GPT.from_pretrained(_manifest_spec(directory)["target"]))
    spec = manifest(directory)
    stem = free_stem(directory, "eagle_head")
    m.save_pretrained(directory / stem)
    spec["eagle"] = stem
    write_manifest(directory, spec)
    return directory / stem


DIVERGENCES = ("fkl", "tvd")


@dataclass
class DrafterDistillation(TargetSampledRecipe):
    """What the two distillation recipes (:class:`DistillRecipe`, :class:`ContinuousDistillRecipe`) share: the
    drafter role they start from (``self.start``, set by each recipe), the weight of the per-half terms, the student
    (a trainable float32 copy of the start) and the evaluation of student and start on the held-out samples
    (each recipe's ``_held_out``)."""

    drafter: str = "small"
    half_weight: float = 0.1

    def build_model(self):
        """A float32 copy of the starting drafter (its class, config and weights), trainable."""
        model = type(self.start)(self.start.config)
        model.load_state_dict(self.start.state_dict())
        return model.train()

    def evaluate(self, model) -> dict:
        """The recipe's held-out measures for the distilled drafter and for the one it started from."""
        was = model.training
        model.eval()
        out = {"held_out_samples": self.held_out, "distilled": self._held_out(model),
               "start": self._held_out(moved_to(self.start, model_device(model)))}
        model.train(was)
        return out


@dataclass
class DistillRecipe(DrafterDistillation):
    """A same-grid drafter of a model set distilled from the set's target (discrete tokens; ``sd``'s drafter).

    Data: ``num_samples`` images sampled by the target alone with the decode-time sampling settings (CFG
    ``cfg_scale``, temperature ``temperature``; :func:`target_samples`, kept on disk in chunks), the last
    ``held_out`` of them for the evaluation. Why the target's samples and not the drafter's own or the data set's:
    exact speculative sampling commits target-distributed tokens, so every prefix the drafter proposes from at
    decode time is a target sample (followed by at most gamma - 1 of the drafter's own tokens); the data set's
    images are not what the target draws at CFG 3, and the drafter's own samples are prefixes it never sees.

    Loss per position, teacher-forced on a sample: the divergence between the target's and the drafter's guided
    distributions, ``process_logits`` of each model's [cond; null] logits (CFG and temperature: the p and q that
    ``sd``'s acceptance compares, sum_x min(p, q)). ``divergence``: ``fkl`` (default), KL(p || q) = sum p log(p / q),
    smooth and mode-covering (a draft q that covers p's support is what min(p, q) rewards), or ``tvd``, the total
    variation 1 - sum min(p, q), which is exactly one minus the expected acceptance (sparse gradients; a
    fine-tuning objective). Plus ``half_weight`` x KL(p_half || q_half) for the conditional and the null-condition
    halves, so each half stays a usable model (the guided mix alone does not pin them down). The target's
    distributions are computed at every step by a frozen forward (caching them would take 2 x 256 x V numbers
    per sample).

    The student starts from the set's ``drafter`` role (same grid and vocabulary as the target) in float32.
    Evaluation, on the held-out samples, for the trained drafter and for the one it started from: mean KL(p || q)
    per token of the guided distributions, the expected acceptance sum_x min(p, q), and top-1 agreement."""

    num_samples: int = 4000  # held out (held_out None): a tenth, at most 200
    divergence: str = "fkl"
    name: str = "distill"

    def __post_init__(self):
        from mulosd.decoding.sampling import SamplingConfig
        from mulosd.errors import MulosdError
        from mulosd.pipeline import Pipeline

        if self.divergence not in DIVERGENCES:
            raise MulosdError(f"--divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        self.held_out = held_out_count(self.num_samples, self.held_out, cap=200)
        self.pipe = Pipeline.from_pretrained(self.model)
        target = self.pipe.target
        if target.config.condition != "class":
            raise MulosdError("mulosd train distill supports class-conditional (c2i) targets")
        if self.drafter not in self.pipe.drafters:
            raise MulosdError(f"model set {self.model} has no drafter {self.drafter!r}; allowed: "
                              f"{', '.join(sorted(self.pipe.drafters)) or '(none)'}")
        start = self.pipe.drafters[self.drafter]
        tc, dc = target.config, start.config
        if (dc.grid_size, dc.vocab_size, dc.num_classes) != (tc.grid_size, tc.vocab_size, tc.num_classes):
            raise MulosdError(f"drafter {self.drafter!r} has grid {dc.grid_size}, {dc.vocab_size} codes and "
                              f"{dc.num_classes} classes; distillation needs the target's ({tc.grid_size}, "
                              f"{tc.vocab_size}, {tc.num_classes}): a low-resolution drafter is not token-aligned")
        for p in target.parameters():
            p.requires_grad_(False)
        self.target = target.float().eval()
        self.start = start.float().eval()
        self.cfg = SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature)
        self.tokens, self.labels = target_samples(self.pipe, self.model, Path(self.samples_dir), self.num_samples,
                                                  self.cfg, self.data_seed, self.sample_batch,
                                                  desc="distill: target samples")

    def describe(self) -> dict:
        """The run's settings, the starting drafter's fingerprint included: a resumed run whose set's drafter was
        replaced meanwhile (e.g. by --add-to-set) is refused instead of reporting the wrong start."""
        return {"model": str(self.model), "drafter": self.drafter, "num_samples": self.num_samples,
                "held_out": self.held_out, "cfg_scale": self.cfg_scale, "temperature": self.temperature,
                "data_seed": self.data_seed, "divergence": self.divergence, "half_weight": self.half_weight,
                "start": weights_fingerprint(*self.start.state_dict().values())}

    def _log_probs(self, logits: torch.Tensor, predicts: torch.Tensor) -> torch.Tensor:
        """Log of ``process_logits``' probabilities (CFG mix, then temperature; this recipe sets no top-k / top-p),
        computed in log space so that a vanishing q keeps its gradient."""
        from mulosd.decoding.sampling import cfg_mix, guidance_scale

        logits = logits.float()
        if self.cfg.uses_cfg:
            logits = cfg_mix(logits, guidance_scale(self.cfg, predicts))
        return (logits / self.temperature).log_softmax(-1)

    def _distributions(self, model, index) -> dict:
        """Log-probabilities [b, N, V] of the guided distributions (``lp``, ``lq``: what sd samples from) and of
        each model's conditional and null-condition halves (``hp``, ``hq``, [2b, N, V]; the conditional half
        alone without CFG) on samples ``index``, teacher-forced."""
        device = model_device(model)
        tokens, labels = self.tokens[index].to(device), self.labels[index].to(device)
        cond = self.target.with_null(labels) if self.cfg.uses_cfg else labels
        rows = torch.cat([tokens, tokens]) if self.cfg.uses_cfg else tokens
        target = moved_to(self.target, device)
        with torch.no_grad():
            tp = target(cond, rows).float()
        tq = model(cond, rows).float()
        predicts = torch.arange(tokens.shape[1], device=device)
        return {"lp": self._log_probs(tp, predicts), "lq": self._log_probs(tq, predicts),
                "hp": (tp / self.temperature).log_softmax(-1), "hq": (tq / self.temperature).log_softmax(-1)}

    @staticmethod
    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Per-position KL(p || q) from log-probabilities [..., V] (terms where p = 0 count 0)."""
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)

    def loss(self, model, index, step, gen):
        d = self._distributions(model, index)
        mix = self.kl(d["lp"], d["lq"]).mean()
        tv = 1 - torch.minimum(d["lp"].exp(), d["lq"].exp()).sum(-1).mean()
        main = mix if self.divergence == "fkl" else tv
        loss = (main + self.half_weight * self.kl(d["hp"], d["hq"]).mean()) if self.half_weight > 0 else main
        return loss, {"kl_mix": round(mix.item(), 4), "accept": round(1 - tv.item(), 4)}

    def after_step(self, model, step):
        pass

    @torch.no_grad()
    def _held_out(self, model) -> dict:
        kl, accept, agree, n = 0.0, 0.0, 0.0, 0
        for i in range(self.num_examples(), self.num_samples, 25):
            d = self._distributions(model, torch.arange(i, min(i + 25, self.num_samples)))
            p, q = d["lp"].exp(), d["lq"].exp()
            kl += self.kl(d["lp"], d["lq"]).sum().item()
            accept += torch.minimum(p, q).sum(-1).sum().item()
            agree += (p.argmax(-1) == q.argmax(-1)).float().sum().item()
            n += p.shape[0] * p.shape[1]
        return {"kl_per_token": round(kl / n, 4), "expected_acceptance": round(accept / n, 4),
                "top1_agreement": round(agree / n, 4)}



CHAINS = ("teacher", "aligned")


@dataclass
class ContinuousDistillRecipe(DrafterDistillation):
    """A continuous-token drafter (transformer + diffusion head, CSpD's) distilled from the set's continuous target.

    Data: ``num_samples`` images sampled by the target alone (``car`` with the decode-time sampling settings,
    :func:`target_samples`), the last ``held_out`` for the evaluation; the same reason as :class:`DistillRecipe`:
    CSpD commits target-distributed tokens, so the contexts the drafter drafts from are the target's samples.

    Loss: for ``positions`` random cells per image (teacher-forced contexts), both transformers give the cell's
    condition z; the target's guided reverse chain is run from fresh noise and, at every x_k it visits, the KL
    between the target's and the drafter's reverse Gaussians is summed over the steps
    (:func:`mulosd.models.diffusion.trajectory_kl`: the KL between the two chains' path distributions, i.e. the
    drafter's noise prediction matched to the target's along the target's own denoising trajectories, each step
    a mean error weighted by 1 / (2 sigma_k^2)); plus ``half_weight`` x the same, averaged over the conditional and
    the null-condition chains unguided (as the discrete recipe averages its halves), so each half stays usable at
    other guidance scales. ``chain="aligned"`` instead lets the drafter
    follow its own chain from the same noises, as CSpD's trajectory alignment does (gradients through the unrolled
    chain): the last term is then minus the expected log of CSpD's aligned ratio, drift included.

    Evaluation on the held-out samples, for the distilled drafter and the one it started from, at every cell: the
    path KL per token (teacher-forced, whatever ``chain`` trained); with trajectory alignment (the drafter's chain, and the target's re-run with the drafter's
    noises, as ``cspd`` runs them; one step ahead of a target-sampled context), the median gap between the two
    chains' last-step means in units of the target's last std (the L2 norm over the token's dimensions, at every
    cell of target-sampled contexts: 40 for fmnist-32-c16's pair, 64 for fmnist-32's `small`; docs/CSPD.md's
    per-dimension figures are over the drafts cspd verified) and the expected acceptance of CSpD's exact surrogate ratio, mean min(1, r~)."""

    # held out (held_out None): a tenth of the samples, at most 100
    positions: int = 32
    chain: str = "teacher"  # "teacher": along the target's chain (teacher-forced); "aligned": each head its own chain
    name: str = "distill_continuous"

    def __post_init__(self):
        from mulosd.decoding.continuous import check_pair
        from mulosd.decoding.sampling import SamplingConfig
        from mulosd.errors import MulosdError
        from mulosd.pipeline import Pipeline

        self.held_out = held_out_count(self.num_samples, self.held_out, cap=100)
        if self.positions < 1:
            raise MulosdError(f"--positions must be >= 1, got {self.positions}")
        if self.chain not in CHAINS:
            raise MulosdError(f"--chain must be one of {', '.join(CHAINS)}, got {self.chain!r}")
        self.pipe = Pipeline.from_pretrained(self.model)
        if self.pipe.continuous is None:
            raise MulosdError(f"model set {self.model} has no continuous family (continuous target and drafters)")
        family = self.pipe.continuous_models()
        drafters = family.drafters
        if self.drafter not in drafters:
            raise MulosdError(f"model set {self.model} has no continuous drafter {self.drafter!r}; allowed: "
                              f"{', '.join(sorted(drafters)) or '(none)'}")
        check_pair(family.target, drafters[self.drafter])
        ts, ds = family.target.head, drafters[self.drafter].head
        if not torch.equal(ts.sampling.timesteps, ds.sampling.timesteps) or ts.config.train_steps != ds.config.train_steps:
            raise MulosdError("the drafter's diffusion schedule (training and sampling timesteps) differs from the "
                              "target's: the two chains cannot be compared step by step")
        for p in family.target.parameters():
            p.requires_grad_(False)
        self.target = family.target.float().eval()
        self.start = drafters[self.drafter].float().eval()
        self.cfg = SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature)
        self.tokens, self.labels = target_samples(self.pipe, self.model, Path(self.samples_dir), self.num_samples,
                                                  self.cfg, self.data_seed, self.sample_batch,
                                                  desc="distill: car samples", continuous=True)

    def describe(self) -> dict:
        return {"model": str(self.model), "drafter": self.drafter, "num_samples": self.num_samples,
                "held_out": self.held_out, "cfg_scale": self.cfg_scale, "temperature": self.temperature,
                "data_seed": self.data_seed, "positions": self.positions, "half_weight": self.half_weight,
                "chain": self.chain, "continuous": True, "start": weights_fingerprint(*self.start.state_dict().values())}

    def _rows(self, model, index, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditions z of the target and the drafter for cells [b, M] of samples ``index`` in the head's layout:
        [cond ; null] rows (each image-major) under CFG, the conditional rows alone without."""
        device = model_device(model)
        tokens, labels = self.tokens[index].to(device), self.labels[index].to(device)
        guided = self.cfg.uses_cfg
        cond = self.target.with_null(labels) if guided else labels
        feed = torch.cat([tokens, tokens]) if guided else tokens
        pick = (torch.cat([cells, cells]) if guided else cells).to(device)
        target = moved_to(self.target, device)
        with torch.no_grad():
            zt = target(cond, feed)
        zs = model(cond, feed)
        rows = torch.arange(len(feed), device=device)[:, None]
        return zt[rows, pick].reshape(-1, zt.shape[-1]).float(), zs[rows, pick].reshape(-1, zs.shape[-1]).float()

    def _path(self, model, zt, zs, noise, aligned: bool, guided: bool = True) -> dict:
        """trajectory_kl of the drafter's head against the target's: the guided chains (CFG as decoded) or, with
        ``guided=False``, unguided chains of the rows given (one half)."""
        from mulosd.models.diffusion import trajectory_kl

        target = moved_to(self.target, zt.device)
        scale = self.cfg.cfg_scale if guided and self.cfg.uses_cfg else None
        return trajectory_kl(target.head, model.head, zt, zs, noise, scale, self.temperature, aligned)

    def loss(self, model, index, step, gen):
        N, d = self.tokens.shape[1], self.tokens.shape[2]
        cells = torch.stack([torch.randperm(N, generator=gen)[: self.positions] for _ in range(len(index))])
        zt, zs = self._rows(model, index, cells)
        n = len(zt) // 2 if self.cfg.uses_cfg else len(zt)
        S = len(self.target.head.sampling)
        noise = torch.randn(S + 1, n, d, generator=gen).to(zt.device)
        aligned = self.chain == "aligned"
        guided = self._path(model, zt, zs, noise, aligned)
        loss = guided["kl"].mean()
        metrics = {"path_kl": round(loss.item(), 3), "last_gap": round(guided["last_gap"].median().item(), 3)}
        if self.half_weight > 0 and self.cfg.uses_cfg:
            halves = sum(self._path(model, zt[h], zs[h], noise, aligned, guided=False)["kl"].mean()
                         for h in (slice(0, n), slice(n, 2 * n))) / 2
            loss = loss + self.half_weight * halves
        return loss, metrics

    def after_step(self, model, step):
        pass

    @torch.no_grad()
    def _held_out(self, model) -> dict:
        from mulosd.decoding.continuous import head_sample
        from mulosd.decoding.cspd_rules import surrogate_log_ratio

        device = model_device(model)
        N, d = self.tokens.shape[1], self.tokens.shape[2]
        S = len(self.target.head.sampling)
        gen = torch.Generator().manual_seed(0)  # the same noises for every model evaluated
        target = moved_to(self.target, device)
        kl, gaps, accept, n = 0.0, [], 0.0, 0
        for i in range(self.num_examples(), self.num_samples, 10):
            index = torch.arange(i, min(i + 10, self.num_samples))
            cells = torch.arange(N).expand(len(index), N)
            zt, zs = self._rows(model, index, cells)
            rows = len(zt) // 2 if self.cfg.uses_cfg else len(zt)
            noise = torch.randn(S + 1, rows, d, generator=gen).to(device)
            path = self._path(model, zt, zs, noise, aligned=False)  # the same measure whatever the run's --chain
            kl += path["kl"].sum().item()
            draft = head_sample(model, zs, self.cfg, noise)  # the drafter draws; the target re-runs its noises
            aligned = head_sample(target, zt, self.cfg, draft["noise"])
            gaps.append(((draft["last_mean"] - aligned["last_mean"]) / aligned["last_std"]).pow(2).sum(-1).sqrt().cpu())
            log_r = surrogate_log_ratio(draft["x"], draft, aligned)
            accept += log_r.clamp(max=0).exp().sum().item()
            n += rows
        return {"path_kl_per_token": round(kl / n, 3), "median_aligned_gap_sigmas": round(torch.cat(gaps).median().item(), 3),
                "expected_acceptance": round(accept / n, 4)}



def add_drafter_to_set(model_set: str | Path, drafter: str | Path, role: str, continuous: bool = False) -> Path:
    """Add the drafter at stem ``drafter`` to the user model set ``model_set`` (a directory) under ``role`` (of the
    continuous family with ``continuous``), replacing the role's earlier drafter: checked against the set's target
    first, written under a stem the set does not use yet (``drafter_<role>`` or ``continuous_drafter_<role>``, then
    ``_2``, ...), then ``manifest.json`` rewritten atomically. Returns the new stem."""
    from mulosd.decoding.continuous import check_pair
    from mulosd.errors import MulosdError
    from mulosd.models.cgpt import ContinuousGPT
    from mulosd.models.gpt import GPT
    from mulosd.pipeline import _manifest_spec
    from mulosd.zoo import component_stem, manifest, write_manifest

    directory = user_set_directory(str(model_set))
    if directory is None:
        flag = "--continuous-drafter" if continuous else "--drafter"
        raise MulosdError(f"model set {model_set} is shipped with mulosd and is not written; add the drafter to a "
                          f"copy: mulosd pack --from {model_set} --out DIR {flag} {role}={drafter}")
    spec_now = _manifest_spec(directory)
    spec = manifest(directory)
    if continuous:
        if spec_now["continuous"] is None:
            raise MulosdError(f"model set {model_set} has no continuous family to add a continuous drafter to")
        m = ContinuousGPT.from_pretrained(drafter)
        check_pair(ContinuousGPT.from_pretrained(spec_now["continuous"]["target"]), m)
        stem = free_stem(directory, component_stem("continuous_drafter", role))
        m.save_pretrained(directory / stem)
        spec["continuous"].setdefault("drafters", {})[role] = stem
    else:
        m = GPT.from_pretrained(drafter)
        t = GPT.from_pretrained(spec_now["target"]).config
        mc = m.config
        if (mc.grid_size, mc.vocab_size, mc.num_classes, mc.condition) != (t.grid_size, t.vocab_size, t.num_classes,
                                                                            t.condition):
            raise MulosdError(f"drafter {drafter} has grid {mc.grid_size}, {mc.vocab_size} codes and {mc.num_classes} "
                              f"{mc.condition} conditions; the set's target has {t.grid_size}, {t.vocab_size} and "
                              f"{t.num_classes} {t.condition}")
        stem = free_stem(directory, component_stem("drafter", role))
        m.save_pretrained(directory / stem)
        spec.setdefault("drafters", {})[role] = stem
    write_manifest(directory, spec)
    return directory / stem
