"""``mulosd import llamagen``: LlamaGen's checkpoints -> a model set directory every mulosd command loads.

A set holds the VQ tokenizer, the target GPT and optionally a same-grid drafter (role ``small``, for sd/eagle-style
methods) and a lower-resolution GPT on the same tokenizer (role ``r<ratio>``, e.g. ``r1.5`` for 256 -> 384 px, for
MuLo-SD). Weights are converted to safetensors (default) or linked in place (``link=True``: the component's JSON
names the original file and its size; nothing is copied). LlamaGen's files carry no architecture config, so the
caller names each GPT's size and image size; everything the tensors reveal (width, depth, vocabulary, classes,
caption width, c2i or t2i) is read from them and checked. The set is written to a temporary directory beside
``out`` and renamed into place only when complete, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mulosd.errors import MulosdError
from mulosd.io import save_linked
from mulosd.models.gpt import GPT
from mulosd.models.llamagen import (LLAMAGEN_SIZES, llamagen_condition, llamagen_config, llamagen_size,
                                    load_llamagen_state, read_linked_weights, read_llamagen_gpt_state)
from mulosd.models.llamagen_vq import CODEBOOK_KEY, LlamaGenVQ, LlamaGenVQConfig, load_llamagen_vq
from mulosd.zoo import component_stem, write_manifest


@dataclass
class GPTFile:
    """One LlamaGen GPT checkpoint as the user names it: file, size name (GPT-B ...), image size in pixels."""

    path: Path
    size: str
    image_size: int
    role: str  # how errors name it: "--gpt", "--drafter", "--lowres"


def _size_hint(state: dict[str, torch.Tensor]) -> str:
    """Which named LlamaGen sizes fit a state dict's width and depth (for a wrong --size)."""
    emb = state.get("tok_embeddings.weight")
    layers = len({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    if emb is None:
        return ""
    dim = emb.shape[1]
    fits = [n for n, (L, _, d) in LLAMAGEN_SIZES.items() if d == dim and L == layers]
    return (f"; the file has width {dim} and {layers} layers, which is {' or '.join(fits)}" if fits else
            f"; the file has width {dim} and {layers} layers, which is none of {', '.join(LLAMAGEN_SIZES)}")


def load_gpt_file(spec: GPTFile, vq: LlamaGenVQ) -> GPT:
    """The GPT in ``spec`` on ``vq``'s tokens: its grid is image_size / the tokenizer's factor, its vocabulary the
    codebook's, its classes (c2i) or caption width (t2i) those of the file."""
    factor = vq.config.downsample
    try:
        llamagen_size(spec.size)
    except MulosdError as exc:
        raise MulosdError(f"{spec.role}-size: {exc}") from None
    if spec.image_size < factor or spec.image_size % factor:
        raise MulosdError(f"{spec.role} image size {spec.image_size} is not a positive multiple of {factor} (the "
                          f"tokenizer's down-sampling factor); allowed e.g. 256, 384, 512")
    state = read_llamagen_gpt_state(spec.path)
    kind = llamagen_condition(state)
    extra = {}
    if kind == "caption":
        fc1, uncond = state.get("cls_embedding.cap_proj.fc1.weight"), state.get("cls_embedding.uncond_embedding")
        if fc1 is not None:
            extra["caption_dim"] = fc1.shape[1]
        if uncond is not None:
            extra["cls_token_num"] = uncond.shape[0]
    else:
        table = state.get("cls_embedding.embedding_table.weight")
        if table is not None:
            extra["num_classes"] = table.shape[0] - 1
    config = llamagen_config(spec.size, grid_size=spec.image_size // factor, vocab_size=vq.config.codebook_size,
                             condition=kind, **extra)
    emb = state.get("tok_embeddings.weight")
    if emb is not None and emb.shape[0] != config.vocab_size:
        raise MulosdError(f"{spec.role} {spec.path} predicts {emb.shape[0]} codes but the tokenizer has "
                          f"{config.vocab_size}: they are not on the same tokenizer")
    try:
        return load_llamagen_state(state, config, str(spec.path))
    except MulosdError as exc:
        raise MulosdError(f"{exc} (with {spec.role}-size {spec.size}{_size_hint(state)})") from None


def vq_config_from_state(state: dict[str, torch.Tensor], where: str) -> LlamaGenVQConfig:
    """A LlamaGen VQ's architecture read from its tensors: base width and input channels (conv_in), one channel
    multiplier per resolution (each level's first residual block), residual blocks per level, latent channels
    (conv_out), codebook. GroupNorm's group count leaves no trace in the weights: LlamaGen always uses 32, and a
    width that 32 does not divide (only in small test models) takes its largest divisor below 32."""
    try:
        conv_in = state["encoder.conv_in.weight"]
        levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
        widths = [state[f"encoder.conv_blocks.{i}.res.0.conv2.weight"].shape[0] for i in levels]
        z_channels = state["encoder.conv_out.weight"].shape[0]
        codebook = state[CODEBOOK_KEY].shape
    except KeyError as exc:
        raise MulosdError(f"{where} is not a LlamaGen VQ tokenizer checkpoint: it has no {exc.args[0]}") from None
    channels = conv_in.shape[0]
    if not levels or any(w % channels for w in widths):
        raise MulosdError(f"{where}: its encoder's widths {widths} are not multiples of its base width {channels}")
    groups = next(g for g in range(32, 0, -1) if all(w % g == 0 for w in (channels, *widths)))
    return LlamaGenVQConfig(codebook_size=codebook[0], codebook_dim=codebook[1], in_channels=conv_in.shape[1],
                            channels=channels, channel_mult=tuple(w // channels for w in widths),
                            z_channels=z_channels, num_res_blocks=len(blocks), norm_groups=groups)


def load_vq_file(path: str | Path) -> LlamaGenVQ:
    """A LlamaGen VQ tokenizer of whatever architecture its tensors show (VQ-16, VQ-8, ...)."""
    return load_llamagen_vq(path, vq_config_from_state(read_linked_weights("llamagen-vq", path), str(path)))


def _same_tokenizer(vq: LlamaGenVQ, other: Path | None, role: str) -> None:
    """A GPT's own tokenizer file, when the user names it, must hold the set's codebook."""
    if other is None:
        return
    theirs = load_vq_file(other).quantize.embedding.weight
    if theirs.shape != vq.quantize.embedding.weight.shape or not torch.equal(theirs, vq.quantize.embedding.weight):
        raise MulosdError(f"{role}'s tokenizer {other} differs from the set's (its {CODEBOOK_KEY} is not the same "
                          f"codebook): a drafter must work on the target's tokens")


def _ratio_role(target: GPT, lowres: GPT) -> str:
    H, h = target.config.grid_size, lowres.config.grid_size
    if h >= H:
        raise MulosdError(f"the low-resolution model's grid ({h}x{h}) must be smaller than the target's ({H}x{H})")
    return f"r{H / h:g}"


def import_llamagen(out: str | Path, gpt: GPTFile, vq: str | Path, drafter: GPTFile | None = None,
                    lowres: GPTFile | None = None, drafter_vq: str | Path | None = None,
                    lowres_vq: str | Path | None = None, link: bool = False, name: str | None = None,
                    class_names: list[str] | None = None, force: bool = False) -> Path:
    """Write a model set for LlamaGen's files to ``out`` (see the module doc); returns ``out``."""
    out = Path(out)
    _check_out(out, force, [gpt.path, vq, drafter and drafter.path, lowres and lowres.path, drafter_vq, lowres_vq])
    try:
        return _import(out, gpt, vq, drafter, lowres, drafter_vq, lowres_vq, link, name, class_names)
    except OSError as exc:  # a file that cannot be read or written (permissions, a full disk): one clear message
        raise MulosdError(f"import failed, nothing written to {out}: {exc.strerror or exc}"
                          f"{f' ({exc.filename})' if exc.filename else ''}") from None


def _check_out(out: Path, force: bool, inputs: list) -> None:
    """``out`` must be new or empty, or (``force``) an earlier model set; never a folder holding the inputs."""
    if out.exists() and not out.is_dir():
        raise MulosdError(f"--out {out} is a file; give a directory for the model set")
    root = out.resolve()
    for path in inputs:
        if path is not None and root in Path(path).resolve().parents:
            raise MulosdError(f"{path} lies inside --out {out}; write the model set to a directory that holds none "
                              "of the checkpoints it is made from")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise MulosdError(f"{out} exists and is not empty; choose a new directory for the model set (or --force to "
                          "replace an earlier model set there)")
    if not (out / "manifest.json").is_file():
        raise MulosdError(f"--force replaces an earlier model set, but {out} holds no manifest.json; choose a new "
                          "directory")


def _replace_set(staging: Path, out: Path) -> None:
    """Move the staged set into ``out``: a new directory is renamed into place; an earlier set (``--force``) loses
    its manifest and the components it names, everything else in ``out`` is kept, and the new files move in."""
    if not out.exists():
        staging.rename(out)
        return
    old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    stems = [v for v in old.values() if isinstance(v, str)]
    stems += [v for key in ("drafters", "upsamplers") for v in (old.get(key) or {}).values() if isinstance(v, str)]
    (out / "manifest.json").unlink(missing_ok=True)  # first: a half-replaced set never looks complete
    for stem in stems:
        for suffix in (".json", ".safetensors"):
            (out / stem).with_suffix(suffix).unlink(missing_ok=True)  # as the loader names them
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "manifest.json"):  # the manifest last
        path.replace(out / path.name)
    staging.rmdir()


def _import(out: Path, gpt: GPTFile, vq, drafter, lowres, drafter_vq, lowres_vq, link, name, class_names) -> Path:
    tokenizer = load_vq_file(vq)
    target = load_gpt_file(gpt, tokenizer)
    drafters: dict[str, tuple[GPT, Path]] = {}
    if drafter is not None:
        _same_tokenizer(tokenizer, Path(drafter_vq) if drafter_vq else None, "--drafter")
        d = load_gpt_file(drafter, tokenizer)
        if d.config.grid_size != target.config.grid_size:
            raise MulosdError(f"--drafter works on a {d.config.grid_size}x{d.config.grid_size} grid "
                              f"({drafter.image_size} px); a drafter must work on the target's "
                              f"{target.config.grid_size}x{target.config.grid_size} ({gpt.image_size} px)")
        drafters["small"] = (d, drafter.path)
    if lowres is not None:
        _same_tokenizer(tokenizer, Path(lowres_vq) if lowres_vq else None, "--lowres")
        lo = load_gpt_file(lowres, tokenizer)
        drafters[_ratio_role(target, lo)] = (lo, lowres.path)
    for role, (m, path) in drafters.items():
        if m.config.condition != target.config.condition:
            raise MulosdError(f"{path} is conditioned on a {m.config.condition}; the target {gpt.path} on a "
                              f"{target.config.condition}: both must be c2i or both t2i")
        if (m.config.cls_token_num, m.config.caption_dim, m.config.num_classes) != (
                target.config.cls_token_num, target.config.caption_dim, target.config.num_classes):
            raise MulosdError(f"{path} takes a different condition from the target {gpt.path} (classes or caption "
                              "shape differ)")
    if class_names is not None and target.config.condition == "class" and len(class_names) != target.config.num_classes:
        raise MulosdError(f"{len(class_names)} class names given; the model has {target.config.num_classes} classes")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    done = False
    try:
        _write_set(staging, tokenizer, Path(vq), target, gpt.path, drafters, link, name or out.name, class_names)
        _replace_set(staging, out)
        done = True
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if not done:  # folders made for --out go again
            for folder in created:
                if folder.exists() and not any(folder.iterdir()):
                    folder.rmdir()
    return out


def _write_set(directory: Path, tokenizer: LlamaGenVQ, vq_path: Path, target: GPT, target_path: Path,
               drafters: dict[str, tuple[GPT, Path]], link: bool, name: str, class_names: list[str] | None) -> None:
    def save(model, stem: str, source: Path, fmt: str) -> str:
        if link:
            save_linked(model, directory / stem, model.kind, source, fmt)
        else:
            model.save_pretrained(directory / stem)
        return stem

    spec = {"name": name, "tokenizer": save(tokenizer, "tokenizer", vq_path, "llamagen-vq"),
            "target": save(target, "target", target_path, "llamagen-gpt"), "classifier": None,
            "drafters": {role: save(m, component_stem("drafter", role), path, "llamagen-gpt")
                         for role, (m, path) in drafters.items()},
            "upsamplers": {}}
    if target.config.condition == "class":
        spec["class_names"] = class_names or [f"class_{i}" for i in range(target.config.num_classes)]
    write_manifest(directory, spec)
