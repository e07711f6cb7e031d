"""Atomic file writes and the config-beside-weights format every mulosd model uses.

A model directory (or file stem) holds ``<stem>.json`` (``{"kind": ..., "config": {...}}``) and
``<stem>.safetensors``. Loading never unpickles: safetensors holds only tensors, and training checkpoints are
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mulosd.errors import MulosdError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def replace_marked_block(path: str | os.PathLike, name: str, text: str) -> Path:
    """Replace what stands between the lines ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` of a Markdown file
    with ``text`` (atomically): how the report scripts keep measured blocks of the docs up to date."""
    doc = Path(path).read_text()
    new, k = re.subn(rf"(<!-- {re.escape(name)}:start -->\n).*?(<!-- {re.escape(name)}:end -->)",
                     lambda m: m.group(1) + text + m.group(2), doc, flags=re.S)
    if not k:
        raise MulosdError(f"{path} has no <!-- {name}:start --> / <!-- {name}:end --> markers")
    return atomic_write_text(path, new)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``path`` cannot be created."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise MulosdError(f"output path {path} is a directory; give a file name")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise MulosdError(f"cannot create the directory {parent} for {path}: {existing} is a file")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MulosdError(f"cannot create the directory {parent} for {path}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise MulosdError(f"cannot write {path}: directory {parent} is not writable")
    return path


def cache_dir() -> Path:
    """Where derived, recomputable data (reference statistics) is cached: $MULOSD_CACHE, else ~/.cache/mulosd."""
    root = os.environ.get("MULOSD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "mulosd")
    return Path(root)


def config_from_dict(cls, data: dict, source: str):
    """Build a config dataclass from JSON, rejecting unknown or missing fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MulosdError(f"{source}: unknown {cls.__name__} fields {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MulosdError(f"{source}: invalid {cls.__name__}: {exc}") from None


def save_pretrained(model: torch.nn.Module, stem: str | os.PathLike, kind: str, dtype: torch.dtype | None = None) -> Path:
    """Write ``stem.json`` and ``stem.safetensors`` atomically. ``dtype`` casts floating weights (e.g. fp16)."""
    stem = Path(stem)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, tmp, metadata={"kind": kind}))
    atomic_write_json(stem.with_suffix(".json"), {"kind": kind, "config": dataclasses.asdict(model.config)})
    return stem


def read_config(stem: str | os.PathLike, kind: str, config_cls):
    stem = Path(stem)
    cfg_path = stem.with_suffix(".json")
    if not cfg_path.exists():
        raise MulosdError(f"model config {cfg_path} not found")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise MulosdError(f"{cfg_path} is not valid JSON: {exc}") from None
    if meta.get("kind") != kind:
        raise MulosdError(f"{cfg_path} describes a {meta.get('kind')!r} model; expected {kind!r}")
    return config_from_dict(config_cls, meta.get("config", {}), str(cfg_path))


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Load ``state`` into ``model`` demanding identical keys and shapes; cast dtypes to the model's."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise MulosdError(
            f"{source}: weights do not match the config: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unknown[:8]}{'...' if len(unknown) > 8 else ''}"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise MulosdError(
                f"{source}: tensor {key} has shape {tuple(state[key].shape)} but the config implies {tuple(ref.shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model


def load_pretrained(model_cls, stem: str | os.PathLike, kind: str):
    """Build ``model_cls`` from ``stem.json`` and load ``stem.safetensors`` strictly."""
    stem = Path(stem)
    config = read_config(stem, kind, model_cls.config_class)
    weights = stem.with_suffix(".safetensors")
    if not weights.exists():
        raise MulosdError(f"weights {weights} not found beside {stem.with_suffix('.json')}")
    model = model_cls(config)
    load_state_strict(model, load_file(str(weights)), str(weights))
    return model.eval()


class Pretrained:
    """Mixin for models that carry a config dataclass: ``save_pretrained(stem, dtype)`` writes
    ``stem.json`` + ``stem.safetensors``; ``from_pretrained(stem)`` rebuilds and loads them strictly."""

    config_class: type
    kind: str

    def save_pretrained(self, stem, dtype: torch.dtype | None = None) -> Path:
        return save_pretrained(self, stem, self.kind, dtype)

    @classmethod
    def from_pretrained(cls, stem):
        return load_pretrained(cls, stem, cls.kind)
