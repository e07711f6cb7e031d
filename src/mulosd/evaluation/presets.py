"""Presets of ``mulosd bench``: each fixes the options it names unless they are given explicitly.

``methods: None`` stands for every method of the registry (``decoding.methods.REGISTRY``, in its order), looked up
only when options are resolved, so that reading the preset names does not import the decoders.
"""

from __future__ import annotations

from mulosd.errors import MulosdError

BENCH_DEFAULTS = {"methods": None, "num_images": 100, "batch_size": 1, "inception": False}
BENCH_PRESETS = {
    # a smoke run of every method: minutes on 2 cores, classifier metrics only
    "quick": {"methods": None, "num_images": 20, "batch_size": 1, "inception": False},
    # the docs/RESULTS.md run: 1000 images per method, Inception FID against the 10 000 test images
    "full": {"methods": None, "num_images": 1000, "batch_size": 1, "inception": True},
}


def every_method() -> str:
    """Every registered method, comma-separated in registry order (ar ... cspd)."""
    from mulosd.decoding.methods import REGISTRY

    return ",".join(REGISTRY)


def bench_options(preset: str | None = None, **given) -> dict:
    """The bench options ``methods``, ``num_images``, ``batch_size`` and ``inception``: those given (not None)
    win, then the preset's, then BENCH_DEFAULTS; ``methods`` None becomes every registered method."""
    if preset is not None and preset not in BENCH_PRESETS:
        raise MulosdError(f"unknown bench preset {preset!r}; allowed: {', '.join(BENCH_PRESETS)}")
    unknown = sorted(set(given) - set(BENCH_DEFAULTS))
    if unknown:
        raise TypeError(f"bench_options() got unknown options {unknown}; allowed: {', '.join(BENCH_DEFAULTS)}")
    base = BENCH_PRESETS[preset] if preset else BENCH_DEFAULTS
    chosen = {key: given[key] if given.get(key) is not None else base[key] for key in BENCH_DEFAULTS}
    if chosen["methods"] is None:
        chosen["methods"] = every_method()
    return chosen
