"""The method registry: ``mulosd generate --method NAME`` -> a decoder built from a pipeline's models.

Each method is a small object naming its parameters (validated at construction, reported in the stats) and a
``generate(labels, sampling, streams) -> (tokens [B, N], DecodeStats)`` call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mulosd.decoding.ar import DecodeStats, generate_ar
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.errors import MulosdError

if TYPE_CHECKING:
    from mulosd.pipeline import Pipeline


class Method:
    name: str = ""
    exact: bool = True  # does the output follow the target's distribution exactly?
    defaults: dict = {}

    def __init__(self, pipe: "Pipeline", **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise MulosdError(f"method {self.name!r} has no parameters {unknown}; allowed: {sorted(self.defaults) or 'none'}")
        self.pipe = pipe
        self._params = {**self.defaults, **params}

    def params(self) -> dict:
        return dict(self._params)

    @property
    def output_grid(self) -> int:
        """Tokens per side of the images this method produces (the target's grid for every speculative method)."""
        return getattr(self, "model", self.pipe.target).config.grid_size

    def generate(self, labels: torch.Tensor, sampling: SamplingConfig, streams: RandomStreams) -> tuple[torch.Tensor, DecodeStats]:
        raise NotImplementedError


class AR(Method):
    """Plain autoregressive decoding: one forward per token (model=target, or a drafter role to sample it alone)."""

    name = "ar"
    defaults = {"model": "target"}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.model = pipe.model(self._params["model"])

    def generate(self, labels, sampling, streams):
        return generate_ar(self.model, labels, sampling, streams)


REGISTRY: dict[str, type[Method]] = {m.name: m for m in (AR,)}


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise MulosdError(f"unknown method {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
