"""Atomic file writes and the config-beside-weights format every mulosd model uses.

A model directory (or file stem) holds ``<stem>.json`` (``{"kind": ..., "config": {...}}``) and
``<stem>.safetensors``. Loading never unpickles: safetensors holds only tensors, and training checkpoints are
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
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


def _expected_type(value: Any, tp: Any) -> str | None:
    """None when the JSON ``value`` fits the config field type ``tp``, else what the field expects (in words).
    Covers the types config fields use (int, float, str, bool, tuple[int, ...], ``X | None``); others pass."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        wants = [_expected_type(value, a) for a in args if a is not type(None)]
        if any(w is None for w in wants):
            return None
        return " or ".join(wants) + (" or null" if type(None) in args else "")
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)) or any(_expected_type(v, args[0]) for v in value):
            return f"a list of {'integers' if args[0] is int else 'values'}"
    return None


def config_from_dict(cls, data: dict, source: str):
    """Build a config dataclass from JSON, rejecting unknown fields and values of the wrong type (missing fields
    take their defaults). Every problem, including the dataclass's own validation, becomes a MulosdError naming
    ``source`` (the file)."""
    if not isinstance(data, dict):
        raise MulosdError(f"{source}: the config must be a JSON object of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MulosdError(f"{source}: unknown {cls.__name__} fields {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        wants = _expected_type(value, hints.get(name))
        if wants:
            raise MulosdError(f"{source}: {cls.__name__}.{name} must be {wants}, got {value!r}")
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, AssertionError, ZeroDivisionError) as exc:  # MulosdError is a ValueError
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


def save_linked(model: torch.nn.Module, stem: str | os.PathLike, kind: str, weights: str | os.PathLike,
                fmt: str) -> Path:
    """Write ``stem.json`` for ``model`` linking its weights in place (a file in one of LINKED_FORMATS) instead of
    copying them into ``stem.safetensors``; loading checks that the file is still there with the same size."""
    stem, weights = Path(stem), Path(weights).resolve()
    link = {"path": str(weights), "format": fmt, "bytes": weights.stat().st_size,
            "fingerprint": file_fingerprint(weights)}
    atomic_write_json(stem.with_suffix(".json"), {"kind": kind, "config": dataclasses.asdict(model.config),
                                                  "weights": link})
    return stem


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a file that cannot be read or is not JSON is one MulosdError naming it (and
    the line and column of a syntax error)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise MulosdError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MulosdError(f"{path} is not valid JSON: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise MulosdError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def read_config(stem: str | os.PathLike, kind: str, config_cls):
    """The config in ``stem.json`` (``{"kind": kind, "config": {...}}``), checked field by field."""
    stem = Path(stem)
    cfg_path = stem.with_suffix(".json")
    if not cfg_path.is_file():
        raise MulosdError(f"model config {cfg_path} not found")
    meta = read_json(cfg_path)
    if not isinstance(meta, dict):
        raise MulosdError(f"{cfg_path} must hold a JSON object {{\"kind\": ..., \"config\": {{...}}}}, "
                          f"got {type(meta).__name__}")
    if meta.get("kind") != kind:
        raise MulosdError(f"{cfg_path} describes a {meta.get('kind')!r} model; expected {kind!r}")
    if "config" not in meta:
        raise MulosdError(f"{cfg_path} has no \"config\" (the {config_cls.__name__} fields)")
    return config_from_dict(config_cls, meta["config"], str(cfg_path))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with one clear error for a missing, truncated, empty or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise MulosdError(f"weights {path} not found")
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        size = path.stat().st_size
        raise MulosdError(f"{path} ({size} bytes) is not a readable safetensors file (truncated or corrupt?): "
                          f"{exc}") from None
    except OSError as exc:
        raise MulosdError(f"cannot read {path}: {exc.strerror or exc}") from None


def torch_load_checked(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear error for a missing, truncated, corrupt
    or unsafe (non-tensor pickle) file. For training checkpoints and other torch files."""
    path = Path(path)
    if not path.is_file():
        raise MulosdError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise MulosdError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...: all mean a bad file
        raise MulosdError(f"{path} is not a readable torch checkpoint (truncated, corrupt, or not tensors only): "
                          f"{_torch_load_reason(exc)}") from None


def _torch_load_reason(exc: Exception) -> str:
    """The informative part of torch.load's error, in one line: after "WeightsUnpickler error:" when present (the
    rest is advice to drop weights_only), else its first sentence."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return text.split(". ", 1)[0].rstrip(".") or type(exc).__name__


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


# Formats of weights a component may link to in place of a .safetensors beside its .json (``mulosd import
# llamagen --link``): the component's JSON then holds "weights": {"path", "format", "bytes", "fingerprint"}.
LINKED_FORMATS = ("llamagen-gpt", "llamagen-vq")
FINGERPRINT_BYTES = 2**20  # a linked file's fingerprint hashes its first and last MiB


def weights_fingerprint(*tensors: torch.Tensor) -> str:
    """A short hash of some weights, rounded to fp16 (an fp32 run and an fp16 copy of the same model agree): what a
    component records of the model it was made for (a tokenizer, a target)."""
    h = hashlib.sha256()
    for w in tensors:
        h.update(w.detach().to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a file's size, first and last MiB: cheap on multi-GB checkpoints, and it tells apart two
    checkpoints of one architecture (same size: e.g. LlamaGen's 256 px and 384 px GPT-L), which a size cannot."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()[:16]


def linked_weights(stem: str | os.PathLike) -> dict | None:
    """The checked ``"weights"`` link in ``stem.json`` ({"path": absolute path, "format": one of LINKED_FORMATS,
    "bytes": the file's size when linked}), or None for a component whose weights sit beside it."""
    cfg_path = Path(stem).with_suffix(".json")
    meta = read_json(cfg_path)
    ref = meta.get("weights") if isinstance(meta, dict) else None
    if ref is None:
        return None
    if (not isinstance(ref, dict) or set(ref) != {"path", "format", "bytes", "fingerprint"}
            or not isinstance(ref["path"], str) or ref["format"] not in LINKED_FORMATS or not isinstance(ref["bytes"], int)):
        raise MulosdError(f"{cfg_path}: \"weights\" must be an object {{\"path\": a file, \"format\": one of "
                          f"{', '.join(LINKED_FORMATS)}, \"bytes\": its size, \"fingerprint\": its "
                          f"file_fingerprint}}, got {ref!r}")
    path = Path(ref["path"])
    if not path.is_file():
        raise MulosdError(f"{cfg_path} links its weights to {path}, which does not exist (moved or deleted? import "
                          "the set again)")
    if path.stat().st_size != ref["bytes"] or file_fingerprint(path) != ref["fingerprint"]:
        raise MulosdError(f"{cfg_path} links its weights to {path}, which has changed since the set was imported "
                          f"({path.stat().st_size} bytes, {ref['bytes']} then; its first and last MiB are checked); "
                          "import the set again")
    return {**ref, "path": path}


def load_pretrained(model_cls, stem: str | os.PathLike, kind: str):
    """Build ``model_cls`` from ``stem.json`` and load ``stem.safetensors`` (or the file the JSON links, see
    :func:`linked_weights`) strictly. Any bad file (config, weights, or the two disagreeing) is a MulosdError
    naming it."""
    stem = Path(stem)
    cfg_path = stem.with_suffix(".json")
    config = read_config(stem, kind, model_cls.config_class)
    link = linked_weights(stem)
    weights = link["path"] if link else stem.with_suffix(".safetensors")
    if not weights.is_file():
        raise MulosdError(f"weights {weights} not found beside {cfg_path}")
    try:
        model = model_cls(config)
    except (ValueError, TypeError, RuntimeError, AssertionError, ZeroDivisionError) as exc:
        raise MulosdError(f"{cfg_path}: cannot build a {model_cls.__name__} from this config: {exc}") from None
    if link:
        from mulosd.models.llamagen import read_linked_weights

        state = read_linked_weights(link["format"], weights)
    else:
        state = read_safetensors(weights)
    load_state_strict(model, state, str(weights))
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
