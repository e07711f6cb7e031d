"""Per-model training recipes: what to build, what data to read, and which loss to minimise.

Data stays on the CPU; ``loss`` and ``evaluate`` move what they use to the model's device (``model_device``) and
bring results back. Random draws come from the trainer's CPU generator and are moved after drawing, so a seed gives
the same draws on every device.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mulosd.data import FashionMNIST
from mulosd.models.classifier import Classifier, ClassifierConfig
from mulosd.models.gpt import GPTConfig
from mulosd.models.vq import VQConfig, VQModel


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on (where a recipe sends its batches)."""
    return next(model.parameters()).device


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


@dataclass
class UpsamplerRecipe:
    """The learned latent up-/down-sampler for one factor r (MuLo-SD's U_r and D_r), on pairs of Fashion-MNIST
    codes at 32 px and 32/r px from one tokenizer.

    Stage 1 (steps < ``ce_steps``): cross-entropy of the up-sampler's logits against the high-res codes, plus
    cross-entropy of the down-sampler against the low-res codes. Stage 2: the up-sampler's most likely codes are
    decoded by the frozen VQ decoder and compared with the 32 px image (MSE, weight ``pixel_weight``), gradients
    reaching the logits through a straight-through softmax; the cross-entropy terms stay on (up-sampler weight
    ``ce_weight``) so the output remains a calibrated distribution over codes."""

    tokenizer: str
    r: int = 2
    dim: int = 64
    n_blocks: int = 4
    ce_steps: int = 2000
    pixel_weight: float = 10.0
    ce_weight: float = 0.5
    data_dir: str | None = None
    limit: int | None = None
    name: str = "upsampler"

    def __post_init__(self):
        from mulosd.errors import MulosdError
        from mulosd.models.upsample import tokenizer_fingerprint

        if self.r not in (2, 4):
            raise MulosdError(f"r must be 2 or 4 for 32 px Fashion-MNIST (16x16 target grid), got {self.r}")
        self.vq = VQModel.from_pretrained(self.tokenizer).eval()
        for p in self.vq.parameters():
            p.requires_grad_(False)
        self.fingerprint = tokenizer_fingerprint(self.vq)
        data = FashionMNIST.load("train", self.data_dir).head(self.limit)
        self.images = data.at(32)
        with torch.no_grad():
            self.hi = encode_dataset(self.vq, self.images)
            self.lo = encode_dataset(self.vq, data.at(32 // self.r))

    def describe(self) -> dict:
        return {"tokenizer": str(Path(self.tokenizer).resolve()), "r": self.r, "dim": self.dim, "n_blocks": self.n_blocks,
                "ce_steps": self.ce_steps, "pixel_weight": self.pixel_weight, "ce_weight": self.ce_weight,
                "limit": self.limit}

    def build_model(self):
        from mulosd.models.upsample import LatentResampler, LatentResamplerConfig

        return LatentResampler(LatentResamplerConfig(r=self.r, vocab_size=self.vq.config.codebook_size, dim=self.dim,
                                                     n_blocks=self.n_blocks, tokenizer_id=self.fingerprint))

    def num_examples(self) -> int:
        return len(self.images)

    def _grids(self, index, device):
        g = 32 // self.vq.config.downsample
        hi = self.hi[index].long().view(-1, g, g).to(device)
        lo = self.lo[index].long().view(-1, g // self.r, g // self.r).to(device)
        return hi, lo

    def _frozen_tokenizer(self, device: torch.device) -> VQModel:
        """The frozen tokenizer, moved to ``device`` (the model's) on first use there."""
        if model_device(self.vq) != device:
            self.vq.to(device)
        return self.vq

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
        mse = F.mse_loss(vq.decode_latent(codes), self.images[index].to(device))
        metrics["mse"] = mse.item()
        return self.pixel_weight * mse + self.ce_weight * ce_up + ce_down, metrics

    def after_step(self, model, step):
        pass

    def evaluate(self, model) -> dict:
        """On the first 2000 test images: exact-code accuracy of U_r and D_r, how often the true code is among the
        up-sampler's 5 most likely, PSNR of the decoded up-sampled codes, and the same for the pixel resampler."""
        from mulosd.models.upsample import PixelResampler

        test = FashionMNIST.load("test", self.data_dir).head(min(2000, self.limit or 2000))
        g = 32 // self.vq.config.downsample
        images = test.at(32)
        device = model_device(model)
        vq = self._frozen_tokenizer(device)
        with torch.no_grad():
            hi = encode_dataset(vq, images).long().view(-1, g, g)
            lo = encode_dataset(vq, test.at(32 // self.r)).long().view(-1, g // self.r, g // self.r)

            def chunks(fn, tokens):  # fn over 250 tokens at a time on the device, the result on the CPU
                return torch.cat([fn(tokens[i : i + 250].to(device)).cpu() for i in range(0, len(tokens), 250)])

            logits = chunks(model.up_logits, lo)
            up = logits.argmax(1)
            top5 = (logits.topk(5, dim=1).indices == hi[:, None]).any(1)
            down = chunks(lambda t: model.down_logits(t).argmax(1), hi)
            pix = PixelResampler(vq, self.r)
            pix_up = chunks(pix.up, lo)
            pix_down = chunks(pix.down, hi)

            def psnr(tokens):
                rec = chunks(vq.decode, tokens)
                return round(10 * math.log10(4.0 / F.mse_loss(rec, images).item()), 2)

        return {
            "test_images": len(images),
            "learned": {"up_token_acc": round((up == hi).float().mean().item(), 4),
                        "up_top5_acc": round(top5.float().mean().item(), 4),
                        "up_psnr_db": psnr(up), "down_token_acc": round((down == lo).float().mean().item(), 4)},
            "pixel": {"up_token_acc": round((pix_up == hi).float().mean().item(), 4), "up_psnr_db": psnr(pix_up),
                      "down_token_acc": round((pix_down == lo).float().mean().item(), 4)},
            "tokenizer_psnr_db": psnr(hi),
        }


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
    tokenizer at 32 px (16x16 tokens), class dropout for CFG, the diffusion loss per token."""

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
