"""``Pipeline.from_pretrained("fmnist-32")``: load a model set, then generate images with a decoding method.

    pipe = Pipeline.from_pretrained("fmnist-32")
    out = pipe(classes=["sneaker", 3], num_per_class=4, method="ar", seed=0, cfg_scale=3.0)
    out.images      # [N, 1, 32, 32] in [0, 1]
    out.stats       # method, wall time, forwards, step compression, class accuracy, ...

    sd = get_method("sd")(pipe, gamma=3)   # build a method once, decode many times with it
    out = pipe.generate(sd, torch.tensor([7, 7, 1]), SamplingConfig(cfg_scale=3.0), seed=0, batch_size=2)
    out.predictions # the classifier's class ids (classified once, also behind stats["class_accuracy"])

Image i (in class-major order) always uses the random stream (seed, i), so the same seed gives the same images
whatever the batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mulosd.data.fashion_mnist import CLASS_NAMES
from mulosd.decoding.methods import get_method
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, check_seed
from mulosd.decoding.state import add_counts
from mulosd.errors import MulosdError
from mulosd.models.cgpt import ContinuousGPT
from mulosd.models.eagle import EagleHead
from mulosd.models.classifier import Classifier
from mulosd.models.gpt import GPT
from mulosd.models.kl import KLAutoencoder, check_tokenizer
from mulosd.io import linked_weights, read_json
from mulosd.models.condition import Captions, read_caption_features
from mulosd.models.llamagen_vq import LlamaGenVQ
from mulosd.models.vq import VQModel
from mulosd.models.upsample import LatentResampler, PixelResampler
from mulosd.resources import check_batch_memory, synchronize
from mulosd.zoo import component_stem, manifest, resolve, write_manifest


@dataclass
class ContinuousModels:
    """A model set's continuous-token family: the KL tokenizer, the target (transformer + diffusion head) and its
    drafters by role. Every model must work on the tokenizer's tokens (dimension and fingerprint checked)."""

    tokenizer: KLAutoencoder
    target: ContinuousGPT
    drafters: dict

    def __post_init__(self):
        for role, m in [("continuous target", self.target), *((f"continuous drafter {r!r}", m) for r, m in self.drafters.items())]:
            check_tokenizer(self.tokenizer, m.config.token_dim, m.config.tokenizer_id, role)
            if m.config.grid_size != self.target.config.grid_size:
                raise MulosdError(f"{role} works on a {m.config.grid_size}x{m.config.grid_size} grid; the target's is "
                                  f"{self.target.config.grid_size}x{self.target.config.grid_size}")

    def model(self, role: str) -> ContinuousGPT:
        if role == "target":
            return self.target
        if role not in self.drafters:
            raise MulosdError(f"no continuous model {role!r}; allowed: target, {', '.join(sorted(self.drafters)) or '(no drafters)'}")
        return self.drafters[role]


@dataclass
class GenerationOutput:
    images: torch.Tensor  # [N, C, H, W] in [0, 1]
    tokens: torch.Tensor  # [N, grid, grid]
    labels: torch.Tensor  # [N]
    stats: dict
    traces: list | None = None  # per image, per cycle: {"block", "accept", "region"} (``trace=True``, MuLo-SD)
    predictions: torch.Tensor | None = None  # [N] the classifier's class ids (None without one, or classify=False)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise MulosdError(f"batch_size must be >= 1, got {batch_size}")


def _decode_batch(decoder, labels: torch.Tensor, sampling: SamplingConfig, streams: RandomStreams,
                  traces: list | None, slots: int | None = None):
    """One batch through ``decoder.generate``; with ``traces`` (a list) every image's cycles are appended to it.
    ``slots``: a continuously batched method's images in flight."""
    if slots is not None:
        return decoder.generate(labels, sampling, streams, slots=slots)
    if traces is None:
        return decoder.generate(labels, sampling, streams)
    cycles: list[dict] = []
    tokens, stats = decoder.generate(labels, sampling, streams, trace=cycles)
    traces.extend([{"block": c["block"], "accept": c["accept"][b].cpu(), "region": c["region"][b].cpu()} for c in cycles]
                  for b in range(len(labels)))
    return tokens, stats


def _add_stats(totals: dict, stats) -> None:
    """Add one batch's DecodeStats to ``totals``: counts add up, the per-phase time dicts add up per phase, and
    lists (the accepted-length histogram) add up element by element."""
    for key, value in vars(stats).items():
        if isinstance(value, list):
            totals[key] = add_counts(totals.get(key, []), value)
        elif isinstance(value, dict):
            phases = totals.setdefault(key, {})
            for name, v in value.items():
                phases[name] = phases.get(name, 0.0) + v
        else:
            totals[key] = totals.get(key, 0) + value


def _generation_stats(decoder, n: int, g: int, sampling: SamplingConfig, seed: int, batch_size: int, totals: dict,
                      wall: float) -> dict:
    """The stats of one ``Pipeline.generate`` call: n images of g x g tokens, DecodeStats ``totals``, ``wall`` s."""
    return {
        "method": decoder.name,
        "params": decoder.params(),
        "device": str(decoder.device),
        "dtype": str(decoder.dtype).removeprefix("torch."),
        "num_images": n,
        "batch_size": batch_size,
        "seed": seed,
        "sampling": vars(sampling),
        "wall_time_s": round(wall, 4),
        "latency_s_per_image": round(wall / n, 5),
        "tokens_per_image": g * g,
        "target_forwards": totals.get("target_forwards", 0),
        "drafter_forwards": totals.get("drafter_forwards", 0),
        "target_forwards_per_image": round(totals.get("active_forwards", 0) / n, 3),
        # tokens committed per target forward an image took part in (1.0 for AR, which needs one forward per
        # token): tokens per image / forwards per image
        "step_compression": round(g * g * n / max(1, totals.get("active_forwards", 0)), 4),
        "acceptance_rate": round(totals["accepted"] / totals["drafted"], 4) if totals.get("drafted") else None,
        "resampled_per_image": round(totals.get("resampled", 0) / n, 3),
        "refreshed_per_image": round(totals.get("refreshed", 0) / n, 3),
        "reverified_per_image": round(totals.get("reverified", 0) / n, 3),
        "rerejected_per_image": round(totals.get("rerejected", 0) / n, 3),
        "time_breakdown_s": {k: round(v, 4) for k, v in totals.get("time_s", {}).items()},
        # accepted_length_histogram[n]: verifications (per image) that accepted exactly n drafted tokens
        "accepted_length_histogram": totals.get("accept_hist", []),
        "counts": {k: totals.get(k, 0) for k in ("active_forwards", "tokens", "accepted", "drafted", "resampled", "refreshed",
                                                 "reverified", "rerejected", "residual_tries", "fallbacks")},
    }


# What manifest.json may hold, key -> what its value must be; the first two are required. Unknown keys are
# rejected, as unknown config fields are, so that a misspelt key is an error, not a silently missing component.
# A component stem is a file name without .json/.safetensors, relative to the model-set directory.
MANIFEST_KEYS = {
    "tokenizer": "the VQ tokenizer's component stem",
    "target": "the target GPT's component stem",
    "name": "a string",
    "classifier": "the classifier's component stem, or null",
    "drafters": "an object mapping drafter roles to component stems",
    "upsamplers": 'an object mapping up-sampling factors ("2", "4", ...) to component stems',
    "eagle": "the EAGLE draft head's component stem (trained for this target), or null",
    "continuous": 'null, or an object with "tokenizer" and "target" stems and optional "drafters" (role -> stem)',
    "class_names": "a list of distinct, non-empty class names",
}
CONTINUOUS_KEYS = {
    "tokenizer": "the KL tokenizer's component stem",
    "target": "the continuous target's component stem",
    "drafters": "an object mapping drafter roles to component stems",
}


def _check_keys(where: Path, section: str, obj: dict, keys: dict) -> None:
    """Unknown or missing keys of ``obj`` (the manifest or its ``section``): the first two of ``keys`` are required."""
    required = list(keys)[:2]
    allowed = f"{', '.join(required)} (required), {', '.join(list(keys)[2:])}"
    prefix = f"{section}." if section else ""
    unknown = sorted(set(obj) - set(keys))
    missing = [k for k in required if k not in obj]
    for problem, names in (("unknown", unknown), ("missing required", missing)):
        if names:
            raise MulosdError(f"{where}: {problem} key{'s' if len(names) > 1 else ''} "
                              f"{', '.join(repr(prefix + k) for k in names)}; allowed: {allowed}")


def _component(where: Path, key: str, value) -> Path:
    """The stem ``value`` of manifest entry ``key``, checked to be a name whose .json and .safetensors exist."""
    if not isinstance(value, str) or not value.strip():
        raise MulosdError(f"{where}: {key} must be a component stem (a file name without .json/.safetensors), "
                          f"got {value!r}")
    stem = where.parent / value
    if not stem.with_suffix(".json").is_file():
        raise MulosdError(f"{where}: {key} names {value!r}, but {stem.with_suffix('.json')} does not exist")
    if not stem.with_suffix(".safetensors").is_file() and linked_weights(stem) is None:
        raise MulosdError(f"{where}: {key} names {value!r}, but {stem.with_suffix('.safetensors')} does not exist")
    return stem


# Tokenizer classes by the "kind" their JSON records: mulosd's own VQ, LlamaGen's VQ-16.
TOKENIZERS = {"vq": VQModel, "llamagen-vq": LlamaGenVQ}


def load_tokenizer(stem: str | Path):
    """The VQ tokenizer at ``stem``, of the class its JSON's kind names (see TOKENIZERS)."""
    stem = Path(stem)
    if not stem.with_suffix(".json").is_file():
        raise MulosdError(f"model config {stem.with_suffix('.json')} not found")
    meta = read_json(stem.with_suffix(".json"))
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in TOKENIZERS:
        raise MulosdError(f"{stem.with_suffix('.json')} describes a {kind!r} model; a tokenizer must be one of "
                          f"{', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind].from_pretrained(stem)


def _components(where: Path, key: str, value, what: str) -> dict[str, Path]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MulosdError(f"{where}: {key} must be {what}, got {value!r}")
    return {name: _component(where, f"{key}.{name}", stem) for name, stem in value.items()}


def _manifest_spec(directory: Path) -> dict:
    """``directory/manifest.json`` checked whole (keys, types, and that every named component's files exist) and
    normalised: stems become paths, every optional key is present, up-sampler factors are ints."""
    where = Path(directory) / "manifest.json"
    raw = manifest(directory)
    _check_keys(where, "", raw, MANIFEST_KEYS)
    spec = {"tokenizer": _component(where, "tokenizer", raw["tokenizer"]),
            "target": _component(where, "target", raw["target"]),
            "name": raw.get("name", Path(directory).name)}
    if not isinstance(spec["name"], str):
        raise MulosdError(f"{where}: name must be {MANIFEST_KEYS['name']}, got {spec['name']!r}")
    clf = raw.get("classifier")
    spec["classifier"] = _component(where, "classifier", clf) if clf is not None else None
    spec["drafters"] = _components(where, "drafters", raw.get("drafters"), MANIFEST_KEYS["drafters"])
    spec["upsamplers"] = {}
    for r, stem in _components(where, "upsamplers", raw.get("upsamplers"), MANIFEST_KEYS["upsamplers"]).items():
        if not (r.isdigit() and int(r) >= 2):
            raise MulosdError(f"{where}: upsamplers key {r!r} must be an up-sampling factor r, an integer >= 2")
        spec["upsamplers"][int(r)] = stem
    eagle = raw.get("eagle")
    spec["eagle"] = _component(where, "eagle", eagle) if eagle is not None else None
    cont = raw.get("continuous")
    if cont is not None:
        if not isinstance(cont, dict):
            raise MulosdError(f"{where}: continuous must be {MANIFEST_KEYS['continuous']}, got {cont!r}")
        _check_keys(where, "continuous", cont, CONTINUOUS_KEYS)
        cont = {"tokenizer": _component(where, "continuous.tokenizer", cont["tokenizer"]),
                "target": _component(where, "continuous.target", cont["target"]),
                "drafters": _components(where, "continuous.drafters", cont.get("drafters"), CONTINUOUS_KEYS["drafters"])}
    spec["continuous"] = cont
    names = raw.get("class_names", list(CLASS_NAMES))
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names)
            or len(set(names)) != len(names)):
        raise MulosdError(f"{where}: class_names must be {MANIFEST_KEYS['class_names']}, got {names!r}")
    spec["class_names"] = tuple(names)
    return spec


class Pipeline:
    def __init__(self, tokenizer: VQModel, target: GPT, classifier: Classifier | None = None,
                 drafters: dict[str, GPT] | None = None, class_names: tuple[str, ...] = CLASS_NAMES, name: str = "custom",
                 upsamplers: dict[int, LatentResampler] | None = None, continuous: ContinuousModels | None = None,
                 eagle: "EagleHead | None" = None):
        self.tokenizer, self.target, self.classifier = tokenizer, target, classifier
        self.eagle = eagle
        self.continuous = continuous
        self.drafters = dict(drafters or {})
        self.upsamplers = {int(r): m for r, m in (upsamplers or {}).items()}
        # a text-to-image set has no classes: its condition is a caption
        self.class_names = () if target.config.condition == "caption" else tuple(class_names)
        self.name = name
        self._check()

    # ---- device and precision ---------------------------------------------------------------------------
    def transformers(self) -> list:
        """The autoregressive transformers (target, drafters, the continuous family's): what ``dtype`` casts."""
        out = [self.target, *self.drafters.values()]
        if self.continuous is not None:
            out += [self.continuous.target, *self.continuous.drafters.values()]
        return out

    def modules(self) -> list:
        """Every model of the set: the transformers, the tokenizers, the learned up-samplers, the classifier."""
        out = self.transformers() + [self.tokenizer, *self.upsamplers.values()]
        if self.eagle is not None:
            out.append(self.eagle)
        if self.classifier is not None:
            out.append(self.classifier)
        if self.continuous is not None:
            out.append(self.continuous.tokenizer)
        return out

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "Pipeline":
        """Move every model to ``device`` (cpu, cuda, cuda:N, auto) and cast the transformers to ``dtype``
        (float32, bfloat16, float16); the tokenizers, up-samplers, diffusion heads and the classifier stay float32 (small, and a
        codebook search or FID features in half precision would change results for no speed), as LlamaGen keeps
        its VQ model in float32 beside a bfloat16 GPT. Logits become float32 before any probability is formed."""
        from mulosd.resources import resolve_device, resolve_dtype

        device = resolve_device(device) if device is not None else self.device
        dtype = resolve_dtype(dtype, device) if dtype is not None else self.dtype
        for m in self.modules():
            m.to(device)
        for m in self.transformers():
            m.float()  # from float32 weights, never from a rounded earlier cast
            for name, child in m.named_children():
                # the diffusion head samples in float32 (its last steps' sigma is ~0.005); the rotary table is a
                # buffer of the root module and stays float32 too, as in LlamaGen
                if name != "head":
                    child.to(dtype)
        if self.eagle is not None:  # the draft head runs on the target's features, in the target's dtype
            for child in self.eagle.children():
                child.float().to(dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformers' dtype (the rest of the set is float32)."""
        return next(self.target.parameters()).dtype

    def _check(self) -> None:
        vocab = self.tokenizer.config.codebook_size
        for role, model in [("target", self.target), *self.drafters.items()]:
            if model.config.vocab_size != vocab:
                raise MulosdError(
                    f"{role} model vocab_size {model.config.vocab_size} does not match the tokenizer's codebook size {vocab}"
                )
            if model.config.condition != self.target.config.condition:
                raise MulosdError(f"{role} model is conditioned on a {model.config.condition}; the target on a "
                                  f"{self.target.config.condition} (they must take the same condition)")
            if model.config.condition == "caption":
                if (model.config.cls_token_num, model.config.caption_dim) != self.caption_shape:
                    raise MulosdError(f"{role} model takes captions of [{model.config.cls_token_num}, "
                                      f"{model.config.caption_dim}]; the target {list(self.caption_shape)}")
            elif model.config.num_classes != len(self.class_names):
                raise MulosdError(f"{role} model has {model.config.num_classes} classes; the model set names {len(self.class_names)}")
        if self.eagle is not None:  # after the checks above, which name more basic mismatches
            self.eagle.check(self.target)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "fmnist-32", device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> "Pipeline":
        """Load a model set (shipped name or directory) onto ``device`` with its transformers in ``dtype`` (see
        ``to``; default: the CPU in float32). ``manifest.json`` is checked whole before any model is loaded (see
        ``MANIFEST_KEYS``), then every component's config and weights; a bad file is a MulosdError naming it."""
        if device is not None or dtype is not None:  # a bad device or dtype is refused before anything is read
            from mulosd.resources import resolve_device, resolve_dtype

            device = resolve_device(device if device is not None else "cpu")
            dtype = resolve_dtype(dtype if dtype is not None else "float32", device)
            return cls.from_pretrained(name_or_path).to(device, dtype)
        directory = resolve(name_or_path)
        where = directory / "manifest.json"
        spec = _manifest_spec(directory)
        tokenizer, target = load_tokenizer(spec["tokenizer"]), GPT.from_pretrained(spec["target"])
        drafters = {role: GPT.from_pretrained(stem) for role, stem in spec["drafters"].items()}
        classifier = Classifier.from_pretrained(spec["classifier"]) if spec["classifier"] else None
        upsamplers = {}
        for r, stem in spec["upsamplers"].items():
            m = LatentResampler.from_pretrained(stem)
            if m.config.r != r:
                raise MulosdError(f"{where}: upsamplers.{r} names {stem.name!r}, a learned up-sampler for r={m.config.r}; "
                                  f"the key must be its factor r")
            upsamplers[r] = m
        eagle = EagleHead.from_pretrained(spec["eagle"]) if spec["eagle"] else None
        c = spec["continuous"]
        if c:
            c = (KLAutoencoder.from_pretrained(c["tokenizer"]), ContinuousGPT.from_pretrained(c["target"]),
                 {role: ContinuousGPT.from_pretrained(stem) for role, stem in c["drafters"].items()})
        try:  # every file read; what is left to fail is the components not fitting each other
            continuous = ContinuousModels(*c) if c else None
            return cls(tokenizer=tokenizer, target=target, classifier=classifier, drafters=drafters,
                       class_names=spec["class_names"], name=spec["name"], upsamplers=upsamplers, continuous=continuous,
                       eagle=eagle)
        except MulosdError as exc:
            raise MulosdError(f"model set {directory}: {exc}") from None

    def model(self, role: str) -> GPT:
        """The target (``"target"``) or a drafter by role (``"r2"``, ``"r4"``, ``"small"``)."""
        if role == "target":
            return self.target
        if role not in self.drafters:
            raise MulosdError(f"no model {role!r} in model set {self.name}; allowed: target, {', '.join(sorted(self.drafters))}")
        return self.drafters[role]

    def continuous_models(self) -> ContinuousModels:
        """The continuous-token family (methods car and cspd), with a clear error when this set has none."""
        if self.continuous is None:
            raise MulosdError(f"model set {self.name} has no continuous-token models (car / cspd need a KL tokenizer and a "
                              "continuous target; train them with `mulosd train kl-tokenizer` and `mulosd train car`)")
        return self.continuous

    def resampler(self, kind: str, r: float, mode: str = "bicubic"):
        """MuLo-SD's up/down-sampler for factor r: ``pixel`` (training-free, any tokenizer, any r > 1) or
        ``learned`` (the shipped latent resampler for this r, an integer, checked against this pipeline's
        tokenizer)."""
        if kind == "pixel":
            return PixelResampler(self.tokenizer, r, mode)
        if kind != "learned":
            raise MulosdError(f"up-sampler {kind!r} unknown; allowed: pixel, learned")
        if r not in self.upsamplers:
            have = ", ".join(f"r={k}" for k in sorted(self.upsamplers)) or "none"
            fix = (f"train one with `mulosd train upsampler --r {r:g}`" if float(r).is_integer() else
                   "learned resamplers exist for integer r only")
            raise MulosdError(f"model set {self.name} has no learned up-sampler for r={r:g} (it has: {have}); "
                              f"{fix} or use upsampler=pixel")
        model = self.upsamplers[r]
        model.check(self.tokenizer, r)
        return model

    def codebook_neighbours(self, k: int, include_self: bool = False) -> torch.Tensor:
        """The tokenizer's k nearest codes per code (``rules.codebook_neighbours``), computed once per (k,
        include_self) and kept: every LANTERN and MuLo-SD setting of a run shares them."""
        from mulosd.decoding.rules import codebook_neighbours

        key = (k, include_self)
        cache = self.__dict__.setdefault("_neighbours", {})
        if key not in cache:
            cache[key] = codebook_neighbours(self.tokenizer.codebook.detach(), k, include_self)
        return cache[key]

    def supported_methods(self) -> dict[str, str | None]:
        """Every method -> None when it can be built on this set with its default parameters (mulo: with any
        low-resolution drafter the set has), else the reason it cannot (the error building it gives)."""
        from mulosd.decoding.methods import REGISTRY, get_method

        out = {}
        for name in sorted(REGISTRY):
            cls = get_method(name)
            tries = [{}]
            if hasattr(cls, "role_ratio"):  # mulo: one try per low-resolution drafter the set has
                tries = [{"r": ratio} for role in sorted(self.drafters) if (ratio := cls.role_ratio(role))] or tries
            reason = None
            for params in tries:
                try:
                    cls(self, **params)
                    reason = None
                    break
                except MulosdError as exc:
                    reason = str(exc)
            out[name] = reason
        return out

    # ---- inputs -------------------------------------------------------------------------------------------
    @property
    def condition(self) -> str:
        """What the set's models are conditioned on: ``"class"`` (c2i) or ``"caption"`` (t2i)."""
        return self.target.config.condition

    @property
    def caption_shape(self) -> tuple[int, int]:
        """(condition tokens, channels) of one caption: LlamaGen's t2i models take (120, 2048)."""
        return self.target.config.cls_token_num, self.target.config.caption_dim

    def check_condition_kind(self, kind: str, given=None) -> None:
        """Refuse a condition of the other kind: classes for a t2i set, prompts or captions for a c2i set."""
        if kind == self.condition:
            return
        if self.condition == "class":
            raise MulosdError(f"model set {self.name} is class-conditional (c2i): it takes classes, not prompts or "
                              f"caption features; allowed classes: 0..{len(self.class_names) - 1} or their names")
        raise MulosdError(f"model set {self.name} is text-to-image (t2i): it takes a caption (--prompt with "
                          f"--t5-path, or --caption-features), not classes{f' (got {given!r})' if given else ''}")

    def captions(self, prompts: list[str] | None = None, features: list | None = None,
                 t5_path: str | Path | None = None) -> Captions:
        """One caption per prompt (encoded with the T5 encoder at ``t5_path``) or per feature file (see
        :func:`mulosd.models.condition.read_caption_features`), for a text-to-image set."""
        self.check_condition_kind("caption")
        if bool(prompts) == bool(features):
            raise MulosdError(f"model set {self.name} is text-to-image (t2i): give prompts (with a T5 encoder path) "
                              "or caption feature files, one of the two")
        length, dim = self.caption_shape
        if features:
            return Captions.cat([read_caption_features(f, length, dim) for f in features])
        if t5_path is None:
            raise MulosdError("prompts need a T5 encoder on disk: pass --t5-path DIR (LlamaGen uses flan-t5-xl; "
                              "nothing is downloaded), or precomputed --caption-features")
        from mulosd.models.t5 import T5Captioner

        return T5Captioner(t5_path, self.device).encode(list(prompts), length, dim)

    def check_top_k(self, top_k: int, name: str = "top-k") -> None:
        """A top-k above the vocabulary would silently keep every code: refuse it (``name``: how the caller calls
        the setting, e.g. the ``--top-k`` flag)."""
        V = self.target.config.vocab_size
        if top_k > V:
            raise MulosdError(f"{name} {top_k} exceeds the vocabulary of model set {self.name} ({V} codes); "
                              f"allowed: 0 (off) to {V}")

    def class_ids(self, classes) -> list[int]:
        """Class names or ids (ints or strings like "3", "sneaker") -> ids, with a clear error for bad ones."""
        if isinstance(classes, (str, int)):
            classes = [c for c in str(classes).split(",") if c.strip()] if isinstance(classes, str) else [classes]
        self.check_condition_kind("class", classes)
        if classes is None:
            raise MulosdError("no classes given; pass at least one class id or name")
        ids = []
        for c in classes:
            key = str(c).strip().lower()
            if key.lstrip("-").isdigit():
                i = int(key)
                if not 0 <= i < len(self.class_names):
                    raise MulosdError(f"class id {i} out of range; allowed: 0..{len(self.class_names) - 1}")
                ids.append(i)
            elif key in self.class_names:
                ids.append(self.class_names.index(key))
            else:
                allowed = ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names))
                raise MulosdError(f"unknown class {c!r}; allowed ids or names: {allowed}")
        if not ids:
            raise MulosdError("no classes given; pass at least one class id or name")
        return ids

    # ---- generation ---------------------------------------------------------------------------------------
    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, g, g] -> images [N, C, H, W] in [0, 1]."""
        return (self.tokenizer.decode(tokens) + 1) / 2

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class ids for images in [0, 1] (smaller images are bilinearly resized to the classifier's size),
        computed on the classifier's device whatever the images' device."""
        size = self.classifier.config.image_size
        x = images.to(next(self.classifier.parameters()).device) * 2 - 1
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return self.classifier.predict(x)

    @torch.inference_mode()
    def __call__(self, classes=None, num_per_class: int = 1, method: str = "ar", seed: int = 0, batch_size: int = 8,
                 cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 progress: bool = False, trace: bool = False, first_index: int = 0, captions: Captions | None = None,
                 cfg_convention: str = "mulosd", cfg_interval: int = -1, **method_params) -> GenerationOutput:
        """Decode ``num_per_class`` images of every class in ``classes`` (class-major), or of every caption in
        ``captions`` (a t2i set: see :meth:`captions`), with ``method`` built from ``method_params``;
        ``generate`` does the decoding (and says which random stream each image uses)."""
        if num_per_class < 1:
            raise MulosdError(f"num_per_class must be >= 1, got {num_per_class}")
        _check_batch_size(batch_size)
        sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                  cfg_convention=cfg_convention, cfg_interval=cfg_interval)
        decoder = get_method(method)(self, **method_params)
        if self.condition == "caption":
            if classes is not None or captions is None:
                self.check_condition_kind("class", classes)
            conditions = captions.repeat(num_per_class)
        else:
            if captions is not None:
                self.check_condition_kind("caption")
            conditions = torch.tensor([c for c in self.class_ids(classes) for _ in range(num_per_class)])
        out = self.generate(decoder, conditions, sampling, seed=seed, batch_size=batch_size, first_index=first_index,
                            progress=progress, trace=trace)
        if isinstance(conditions, Captions):  # images are labelled with their caption's index
            out.labels = torch.arange(len(captions)).repeat_interleave(num_per_class)
        return out

    @torch.inference_mode()
    def generate(self, decoder, labels: torch.Tensor, sampling: SamplingConfig, seed: int = 0, batch_size: int = 8,
                 first_index: int = 0, progress: bool = False, trace: bool = False,
                 classify: bool = True) -> GenerationOutput:
        """Decode one image per entry of ``labels`` (class ids) with ``decoder``, a method already built on this
        pipeline (``get_method(name)(pipe, **params)``), so that many calls can share one. Image i (counting from
        ``first_index``) draws from random stream (seed, i), so an image does not depend on the batch it was decoded
        in. With ``classify`` (and a classifier) the images are classified once: ``predictions`` and the stats'
        ``class_accuracy``. ``trace=True`` records every cycle of a method that can (mulo) in ``traces``."""
        _check_batch_size(batch_size)
        if trace and not getattr(decoder, "traces_cycles", False):
            raise MulosdError(f"acceptance maps need a method that records its cycles (mulo); {decoder.name!r} does not")
        captions = isinstance(labels, Captions)
        labels = labels.cpu() if captions else torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
        if not len(labels):
            raise MulosdError("no labels given; pass at least one class id or caption")
        self.target.check_condition(labels)
        check_seed(seed)
        decoder.check_sampling(sampling)
        batch_size = min(batch_size, len(labels))  # what is used (and recorded): never more than the images
        check_batch_memory(decoder.models(), batch_size, 2 if sampling.uses_cfg else 1, decoder.device)
        traces = [] if trace else None
        all_tokens, totals = [], {}
        synchronize(decoder.device)  # a CUDA clock is read only with the device's queue empty, here and below
        t0 = time.perf_counter()
        # a continuously batched method takes every image at once, batch_size of them in flight (acceptance maps
        # record static batches)
        continuous = getattr(decoder, "continuous", False) and not trace
        step = len(labels) if continuous else batch_size
        for start in tqdm(range(0, len(labels), step), desc=f"generate {decoder.name}", disable=not progress):
            stop = min(start + step, len(labels))
            streams = RandomStreams.from_seed(seed, range(first_index + start, first_index + stop), decoder.device)
            tokens, stats = _decode_batch(decoder, labels[start:stop].to(decoder.device), sampling, streams, traces,
                                          batch_size if continuous else None)
            all_tokens.append(tokens)
            _add_stats(totals, stats)
        synchronize(decoder.device)
        wall = time.perf_counter() - t0
        g = decoder.output_grid
        tokens = torch.cat(all_tokens)
        tokens = tokens.view(-1, g, g, *tokens.shape[2:])  # continuous tokens keep their channel axis
        images = decoder.decode_images(tokens)
        stats = _generation_stats(decoder, len(labels), g, sampling, seed, batch_size, totals, wall)
        classify = classify and self.classifier is not None and not captions
        predictions = self.classify(images).cpu() if classify else None
        tokens, images = tokens.cpu(), images.cpu()  # outputs on the CPU whatever device decoded them
        if captions:  # a caption batch has no class ids: images are labelled -1 (__call__ numbers the captions)
            labels = torch.full((len(labels),), -1, dtype=torch.long)
        if predictions is not None:
            stats["class_accuracy"] = round((predictions == labels).float().mean().item(), 4)
        return GenerationOutput(images=images, tokens=tokens, labels=labels, stats=stats, traces=traces,
                                predictions=predictions)

    # ---- files --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """Write this model set to ``directory`` as ``from_pretrained`` reads it: ``<component>.json`` +
        ``.safetensors`` per model, then ``manifest.json`` last (name, components, class names). ``dtype`` casts
        the floating weights (``torch.float16`` or ``"fp16"``; None or ``"fp32"`` keeps them). Every learned
        up-sampler is checked against the tokenizer before anything is written; each file is written atomically.
        Everything is in memory already, so ``directory`` may be the one this set was loaded from."""
        if isinstance(dtype, str):
            if dtype not in ("fp16", "fp32"):
                raise MulosdError(f"dtype {dtype!r} unknown; allowed: fp16, fp32")
            dtype = torch.float16 if dtype == "fp16" else None
        for r, m in self.upsamplers.items():
            m.check(self.tokenizer, r)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out / "tokenizer", dtype)
        self.target.save_pretrained(out / "target", dtype)
        for role, m in self.drafters.items():
            m.save_pretrained(out / component_stem("drafter", role), dtype)
        if self.classifier is not None:
            self.classifier.save_pretrained(out / "classifier", dtype)
        for r, m in self.upsamplers.items():
            m.save_pretrained(out / f"upsampler_r{r}", dtype)
        if self.eagle is not None:
            self.eagle.save_pretrained(out / "eagle_head", dtype)
        spec = {
            "name": self.name, "tokenizer": "tokenizer", "target": "target",
            "classifier": "classifier" if self.classifier is not None else None,
            "drafters": {role: component_stem("drafter", role) for role in self.drafters},
            "upsamplers": {str(r): f"upsampler_r{r}" for r in sorted(self.upsamplers)},
        }
        if self.eagle is not None:
            spec["eagle"] = "eagle_head"
        if self.continuous is not None:
            cont = self.continuous
            cont.tokenizer.save_pretrained(out / "continuous_tokenizer", dtype)
            cont.target.save_pretrained(out / "continuous_target", dtype)
            for role, m in cont.drafters.items():
                m.save_pretrained(out / f"continuous_drafter_{role}", dtype)
            spec["continuous"] = {"tokenizer": "continuous_tokenizer", "target": "continuous_target",
                                  "drafters": {role: f"continuous_drafter_{role}" for role in cont.drafters}}
        if self.condition == "class":  # a t2i set has no classes
            spec["class_names"] = list(self.class_names)
        write_manifest(out, spec)
        return out
