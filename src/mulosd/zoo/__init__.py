"""Shipped model sets. ``resolve("fmnist-32")`` -> the packaged directory; a filesystem path also works."""

from __future__ import annotations

import json
from pathlib import Path

from mulosd.errors import MulosdError

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
    return json.loads((directory / "manifest.json").read_text())
