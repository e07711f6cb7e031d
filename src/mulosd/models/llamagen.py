"""Load LlamaGen GPT checkpoints, class- (c2i) and text-conditional (t2i) (FoundationVision/LlamaGen ``gpt.py``
layout).

LlamaGen files carry no architecture config: ``n_head`` and the grid size (``block_size``) cannot be recovered
from tensor shapes, and a wrong grid size would load silently and scramble the 2-D rotary positions. So the
caller must give a config (a :class:`GPTConfig`, a dict of its fields, or a named size from
:data:`LLAMAGEN_SIZES` plus ``grid_size``/``vocab_size``/``num_classes``); everything the shapes do reveal
is checked against it, and missing, unknown or mis-shaped keys are errors. Files are read with
``torch.load(weights_only=True)`` (never unpickling arbitrary objects) or with safetensors.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from mulosd.errors import MulosdError
from mulosd.io import load_state_strict, read_safetensors
from mulosd.models.gpt import GPT, GPTConfig

# LlamaGen's named sizes (n_layer, n_head, dim); FFN hidden rounds 8*dim/3 up to a multiple of 256.
LLAMAGEN_SIZES = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}

_DROP = re.compile(r"(^|\.)freqs_cis$|\.kv_cache\.|(^|\.)causal_mask$")


def llamagen_size(name: str) -> tuple[int, int, int]:
    """(n_layer, n_head, dim) of a named LlamaGen size, or of ``"LAYERS,HEADS,DIM"`` (a custom-size model)."""
    if name in LLAMAGEN_SIZES:
        return LLAMAGEN_SIZES[name]
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", str(name))
    if m and all(int(g) > 0 for g in m.groups()):
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    raise MulosdError(f"unknown LlamaGen size {name!r}; allowed: {', '.join(LLAMAGEN_SIZES)}, or LAYERS,HEADS,DIM "
                      "for a custom size (e.g. 12,12,768 is GPT-B)")


# LlamaGen's t2i condition: 120 T5 token positions of flan-t5-xl's 2048 channels (sample_t2i.py's defaults).
T2I_TOKENS, T2I_CAPTION_DIM = 120, 2048


def llamagen_config(name: str, grid_size: int, vocab_size: int = 16384, num_classes: int = 1000,
                    condition: str = "class", caption_dim: int = T2I_CAPTION_DIM,
                    cls_token_num: int | None = None) -> GPTConfig:
    """GPTConfig for a named LlamaGen size (e.g. ``"GPT-B"`` at 256 px with VQ-16 -> grid_size 16): c2i with one
    class token, or t2i (``condition="caption"``) with 120 caption positions of ``caption_dim`` channels."""
    n_layer, n_head, dim = llamagen_size(name)
    caption = condition == "caption"
    return GPTConfig(vocab_size=vocab_size, grid_size=grid_size, dim=dim, n_layer=n_layer, n_head=n_head,
                     multiple_of=256, num_classes=0 if caption else num_classes, condition=condition,
                     caption_dim=caption_dim,
                     cls_token_num=cls_token_num or (T2I_TOKENS if caption else 1))


# Classes a LlamaGen checkpoint may hold beyond plain data (torch.load weights_only allow-list): its training
# scripts store their argparse arguments under "args". Nothing else is unpickled.
LLAMAGEN_SAFE_GLOBALS = [argparse.Namespace]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict: safetensors, or a torch file (bare dict or under model/module/state_dict)."""
    path = Path(path)
    if not path.exists():
        raise MulosdError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        # LlamaGen's training script saves {"model", "optimizer", "steps", "args"} with args an argparse.Namespace:
        # the one class allowed beyond what weights_only reads anyway (tensors, numbers, strings, containers).
        with torch.serialization.safe_globals(LLAMAGEN_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends: refuse anything but tensors and containers
        raise MulosdError(f"{path} cannot be read safely (weights_only=True): {str(exc).splitlines()[0]}; allowed in "
                          f"a checkpoint: tensors, numbers, strings, lists, tuples, dicts and "
                          f"{', '.join(f'{c.__module__}.{c.__name__}' for c in LLAMAGEN_SAFE_GLOBALS)}") from None
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MulosdError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def llamagen_condition(state: dict[str, torch.Tensor]) -> str:
    """``"caption"`` for a t2i state dict (LlamaGen's CaptionEmbedder keys), else ``"class"``."""
    caption = any(k.startswith("cls_embedding.cap_proj.") or k == "cls_embedding.uncond_embedding" for k in state)
    return "caption" if caption else "class"


def read_llamagen_gpt_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LlamaGen GPT checkpoint's state dict without its inference-only buffers (rotary table, KV caches)."""
    return {k: v for k, v in read_state_dict(path).items() if not _DROP.search(k)}


def load_llamagen_gpt(path: str | os.PathLike, config: GPTConfig | dict | str, **size_kwargs) -> GPT:
    """Build a :class:`GPT` from ``config`` and load a LlamaGen-layout checkpoint into it, strictly. With a size
    name, the condition (c2i or t2i) is read from the file's keys; an explicit config must agree with them."""
    state = read_llamagen_gpt_state(path)
    kind = llamagen_condition(state)
    if isinstance(config, str):
        if kind == "caption":
            fc1 = state.get("cls_embedding.cap_proj.fc1.weight")
            size_kwargs.setdefault("caption_dim", fc1.shape[1] if fc1 is not None else T2I_CAPTION_DIM)
        config = llamagen_config(config, condition=kind, **size_kwargs)
    elif isinstance(config, dict):
        config = GPTConfig(**config)
    if kind != config.condition:
        names = {"class": "class-conditional (c2i)", "caption": "text-to-image (t2i)"}
        raise MulosdError(f"{path} is a {names[kind]} checkpoint; the config describes a {names[config.condition]} "
                          "model")
    return load_llamagen_state(state, config, str(path))


def load_llamagen_state(state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> GPT:
    """A :class:`GPT` with ``config`` holding LlamaGen-layout ``state`` (see :func:`read_llamagen_gpt_state`);
    shapes that reveal the architecture are checked against the config first, with what they mean."""
    path = where
    checks = {
        "tok_embeddings.weight": ((config.vocab_size, config.dim), "vocab_size x dim"),
        "layers.0.feed_forward.w1.weight": ((config.ffn_hidden, config.dim), "ffn_hidden x dim"),
    }
    if config.condition == "caption":
        checks["cls_embedding.cap_proj.fc1.weight"] = ((config.dim, config.caption_dim), "dim x caption_dim")
        checks["cls_embedding.uncond_embedding"] = ((config.cls_token_num, config.caption_dim),
                                                    "cls_token_num x caption_dim")
    else:
        checks["cls_embedding.embedding_table.weight"] = ((config.num_classes + 1, config.dim),
                                                          "(num_classes + 1 null class) x dim")
    for key, (shape, meaning) in checks.items():
        if key in state and tuple(state[key].shape) != shape:
            raise MulosdError(f"{path}: {key} has shape {tuple(state[key].shape)} but the config gives {shape} ({meaning})")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if layers and len(layers) != config.n_layer:
        raise MulosdError(f"{path} has {len(layers)} transformer layers but the config says n_layer={config.n_layer}")
    model = GPT(config)
    return load_state_strict(model, state, str(path)).eval()


def read_linked_weights(fmt: str, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a LlamaGen file a model set links in place (``mulosd import llamagen --link``), in the
    component's own layout: a GPT's without its inference buffers, a VQ's without its training-only buffers."""
    if fmt == "llamagen-gpt":
        return read_llamagen_gpt_state(path)
    if fmt == "llamagen-vq":
        from mulosd.models.llamagen_vq import TRAINING_ONLY_KEYS

        return {k: v for k, v in read_state_dict(path).items() if k not in TRAINING_ONLY_KEYS}
    raise MulosdError(f"linked weights format {fmt!r} unknown; allowed: llamagen-gpt, llamagen-vq")
