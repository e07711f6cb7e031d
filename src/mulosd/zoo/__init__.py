"""Shipped model sets. ``resolve("fmnist-32")`` -> the packaged directory; a filesystem path also works.

A model-set directory holds one ``<stem>.json`` + ``<stem>.safetensors`` pair per component and ``manifest.json``
naming them (``manifest`` reads it, ``write_manifest`` writes it); ``assemble`` builds a set from trained
components, which ``Pipeline.save_pretrained`` then writes (``mulosd pack``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mulosd.errors import MulosdError

if TYPE_CHECKING:
    from mulosd.pipeline import Pipeline

ZOO_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "manifest.json").exists())


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if (path / "manifest.json").exists():
        return path
    if (ZOO_DIR / name_or_path / "manifest.json").exists():
        return ZOO_DIR / name_or_path
    raise MulosdError(
        f"no model set {name_or_path!r}: not a shipped name (available: {available()}) nor a directory with a manifest.json"
    )


def manifest(directory: Path) -> dict:
    """The JSON object in ``directory/manifest.json``; a file that cannot be read, is not JSON or is not an object
    is a MulosdError naming it (``Pipeline.from_pretrained`` checks the keys)."""
    path = Path(directory) / "manifest.json"
    from mulosd.io import read_json

    spec = read_json(path)
    if not isinstance(spec, dict):
        raise MulosdError(f"{path} must hold a JSON object naming the components (tokenizer, target, ...), "
                          f"got a JSON {_json_type(spec)}")
    return spec


def _json_type(value) -> str:
    """The JSON name of a parsed value's type: object, array, string, number, true/false, null."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def component_stem(kind: str, role: str) -> str:
    """A component's file stem for a role: ``drafter_r1_5`` for role ``r1.5`` (a dot would read as the start of a
    file suffix: ``drafter_r1.5.json`` would be written as ``drafter_r1.json``, where ``r1.25`` would collide)."""
    return f"{kind}_{role}".replace(".", "_")


def write_manifest(directory: str | Path, spec: dict) -> Path:
    """Write ``directory/manifest.json`` atomically: what ``manifest`` reads and ``Pipeline.from_pretrained`` loads."""
    from mulosd.io import atomic_write_json

    return atomic_write_json(Path(directory) / "manifest.json", spec)


def assemble(base: str | None = None, *, name: str | None = None, tokenizer: str | None = None,
             target: str | None = None, classifier: str | None = None, drafters: dict[str, str] | None = None,
             upsamplers: tuple[str, ...] = (), continuous_tokenizer: str | None = None,
             continuous_target: str | None = None, continuous_drafters: dict[str, str] | None = None,
             eagle: str | None = None) -> "Pipeline":
    """A model set from trained components, given as file stems (path without .json/.safetensors), starting from
    the model set ``base`` (name or directory) when given: its components are kept unless replaced. Drafters (by
    role) and learned up-samplers (by their configured r) are added to or replace the base's; a new tokenizer drops
    the base's up-samplers, a new target drops its EAGLE head (``eagle`` gives one, checked against the target), and
    a new continuous tokenizer or target drops its continuous drafters. Without ``base``,
    ``tokenizer`` and ``target`` are required. Everything is loaded and checked together (the returned Pipeline)
    before anything could be written."""
    from mulosd.models.cgpt import ContinuousGPT
    from mulosd.models.classifier import Classifier
    from mulosd.models.gpt import GPT
    from mulosd.models.kl import KLAutoencoder
    from mulosd.models.upsample import LatentResampler
    from mulosd.pipeline import ContinuousModels, Pipeline, load_tokenizer

    start = Pipeline.from_pretrained(base) if base else None
    if start is None and not (tokenizer and target):
        raise MulosdError("a tokenizer and a target are required unless a model set to start from is given")
    tok = load_tokenizer(Path(tokenizer)) if tokenizer else start.tokenizer
    tgt = GPT.from_pretrained(target) if target else start.target
    clf = Classifier.from_pretrained(classifier) if classifier else (start.classifier if start else None)
    roles = dict(start.drafters) if start else {}
    roles.update({role: GPT.from_pretrained(stem) for role, stem in (drafters or {}).items()})
    ups = dict(start.upsamplers) if start and not tokenizer else {}  # a new tokenizer invalidates the old up-samplers
    for stem in upsamplers:
        m = LatentResampler.from_pretrained(stem)
        ups[m.config.r] = m
    cont = start.continuous if start else None
    if continuous_tokenizer or continuous_target or continuous_drafters:
        ctok = KLAutoencoder.from_pretrained(continuous_tokenizer) if continuous_tokenizer else (cont.tokenizer if cont else None)
        ctgt = ContinuousGPT.from_pretrained(continuous_target) if continuous_target else (cont.target if cont else None)
        if ctok is None or ctgt is None:
            raise MulosdError("the continuous family needs a continuous tokenizer and a continuous target")
        cd = dict(cont.drafters) if cont and not (continuous_tokenizer or continuous_target) else {}
        cd.update({role: ContinuousGPT.from_pretrained(stem) for role, stem in (continuous_drafters or {}).items()})
        cont = ContinuousModels(ctok, ctgt, cd)
    kw = {"class_names": start.class_names} if start else {}
    from mulosd.models.eagle import EagleHead

    head = EagleHead.from_pretrained(eagle) if eagle else (start.eagle if start and not target else None)
    pipe = Pipeline(tok, tgt, clf, roles, upsamplers=ups, continuous=cont, name=name or (start.name if start else "custom"),
                    eagle=head, **kw)
    for r, m in pipe.upsamplers.items():
        m.check(tok, r)
    return pipe
