"""The method registry: ``mulosd generate --method NAME`` -> a decoder built from a pipeline's models.

Each method is a small object naming its parameters (validated at construction, reported in the stats) and a
``generate(labels, sampling, streams) -> (tokens [B, N], DecodeStats)`` call.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from mulosd.decoding.ar import DecodeStats, generate_ar
from mulosd.decoding.engine import speculative_generate
from mulosd.decoding.proposers import DrafterProposer, JacobiProposer
from mulosd.decoding.rules import codebook_neighbours, verify_exact, verify_grouped, verify_lantern
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.decoding.zipar import generate_zipar
from mulosd.errors import MulosdError

if TYPE_CHECKING:
    from mulosd.models.gpt import GPT
    from mulosd.pipeline import Pipeline


class Method:
    name: str = ""
    exact: bool = True  # does the output follow the target's distribution exactly?
    defaults: dict = {}
    baseline = "ar"  # the plain AR method of the same model family: speed-ups are measured against it

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

    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [N, g, g, ...] as this method produces them -> images [N, C, H, W] in [0, 1]."""
        return self.pipe.decode_images(tokens)


class AR(Method):
    """Plain autoregressive decoding: one forward per token (model=target, or a drafter role to sample it alone)."""

    name = "ar"
    defaults = {"model": "target"}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.model = pipe.model(self._params["model"])

    def generate(self, labels, sampling, streams):
        return generate_ar(self.model, labels, sampling, streams)


def _int_param(params: dict, key: str, low: int) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MulosdError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def check_drafter(pipe: "Pipeline", role: str, grid: int) -> "GPT":
    drafter = pipe.model(role)
    t, d = pipe.target.config, drafter.config
    if d.vocab_size != t.vocab_size:
        raise MulosdError(f"drafter {role!r} has vocabulary {d.vocab_size}; the target's is {t.vocab_size} (they must match)")
    if d.grid_size != grid:
        raise MulosdError(f"drafter {role!r} works on a {d.grid_size}x{d.grid_size} grid; this method needs {grid}x{grid}")
    return drafter


class SD(Method):
    """Exact speculative sampling (Leviathan/Chen) with the small same-resolution drafter, draft length gamma."""

    name = "sd"
    # gamma = 3 measured fastest at batch 1 on fmnist-32 (docs/METHODS.md): with ~40 % of drafts accepted,
    # longer drafts spend more drafter steps than they save
    defaults = {"gamma": 3, "drafter": "small"}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.gamma = _int_param(self._params, "gamma", 1)
        self.proposer = DrafterProposer(check_drafter(pipe, self._params["drafter"], pipe.target.config.grid_size))
        self.rule = verify_exact

    def generate(self, labels, sampling, streams):
        return speculative_generate(self.pipe.target, self.proposer, self.rule, labels, sampling, streams, self.gamma)


class SJD(Method):
    """Speculative Jacobi Decoding: training-free drafts from the previous iteration, window L, exact."""

    name = "sjd"
    defaults = {"window": 16, "init": "random", "coupling": "none"}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.gamma = _int_param(self._params, "window", 1)
        self.proposer = JacobiProposer(pipe.target.config.vocab_size, self._params["init"], self._params["coupling"])
        self.rule = verify_exact

    generate = SD.generate


class MCSJD(SJD):
    """SJD with coupled re-drafting (maximal or shared-Gumbel coupling): drafts persist across iterations, exact."""

    name = "mcsjd"
    defaults = {"window": 16, "init": "random", "coupling": "maximal"}

    def __init__(self, pipe, **params):
        if params.get("coupling") == "none":
            raise MulosdError("mcsjd needs a coupling; allowed: maximal, gumbel (coupling=none is --method sjd)")
        super().__init__(pipe, **params)


def _float_param(params: dict, key: str, low: float, high: float, low_open: bool = False) -> float:
    value = params[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise MulosdError(f"{key} must be a number in {'(' if low_open else '['}{low}, {high}], got {params[key]!r}")
    return value


class Lantern(SD):
    """LANTERN relaxed acceptance: target mass of the k nearest codes pooled onto the draft (budget delta, or
    LANTERN++'s lam * p(x) when lam is set), small drafter. Lossy."""

    name = "lantern"
    exact = False
    defaults = {"gamma": 8, "drafter": "small", "k": 20, "delta": 0.1, "lam": None}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        V = pipe.target.config.vocab_size
        k = _int_param(self._params, "k", 0)
        if k > V - 1:
            raise MulosdError(f"k must be at most {V - 1} (the codebook has {V} entries), got {k}")
        delta = _float_param(self._params, "delta", 0.0, 1.0)
        lam = None if self._params["lam"] is None else _float_param(self._params, "lam", 1.0, 1e6)
        neighbours = codebook_neighbours(pipe.tokenizer.codebook.detach(), k)
        self.rule = functools.partial(verify_lantern, neighbours=neighbours, delta=delta, lam=lam)


class GSD(SJD):
    """Grouped Speculative Decoding on SJD drafts: accept by the target/draft mass of a group of close,
    similarly ranked codes. Lossy; group=1 is SJD."""

    name = "gsd"
    exact = False
    defaults = {"window": 16, "init": "random", "coupling": "none", "group": 10, "prob_tol": 0.15, "embed_tol": 0.5}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        group = _int_param(self._params, "group", 1)
        prob_tol = _float_param(self._params, "prob_tol", 0.0, 1.0, low_open=True)
        embed_tol = _float_param(self._params, "embed_tol", 0.0, 2.0, low_open=True)
        self.rule = functools.partial(verify_grouped, codebook=pipe.tokenizer.codebook.detach(), group=group,
                                      prob_tol=prob_tol, embed_tol=embed_tol)


class ZipAR(Method):
    """ZipAR spatially parallel decoding: a row starts once the row above has `window` tokens; one token per
    active row per forward, no verification. Lossy; window >= grid size is AR."""

    name = "zipar"
    exact = False
    defaults = {"window": 8}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.window = _int_param(self._params, "window", 1)

    def generate(self, labels, sampling, streams):
        return generate_zipar(self.pipe.target, labels, sampling, streams, self.window)


def _choice(params: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = params[key]
    if value not in allowed:
        raise MulosdError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _radius(value) -> int | None:
    """l >= 0, or inf / "inf" / None for infinity."""
    if value is None or value == float("inf") or (isinstance(value, str) and value.strip().lower() in ("inf", "infinity")):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MulosdError(f"radius must be an integer >= 0 or inf, got {value!r}")
    return value


class Mulo(Method):
    """MuLo-SD: the same-size low-resolution drafter drafts whole rows, an up-sampler turns them into high-res
    candidates, one target forward verifies them (pooled threshold, or exact speculative sampling), rejected
    cells and their neighbourhoods are regenerated locally (serial, or islands in parallel). Lossy unless
    acceptance=exact."""

    name = "mulo"
    exact = False
    traces_cycles = True  # generate(..., trace=list) records every cycle (acceptance maps)
    # defaults from the measured sweep in docs/MULOSD.md: the whole low-res image drafted ZipAR-style in one cycle
    defaults = {"r": 2, "drafter": None, "rows": None, "drafting": "parallel", "draft_window": 2, "upsampler": "learned",
                "downsampler": "auto", "candidates": "argmax", "resize": "bicubic", "acceptance": "threshold", "tau": 0.1, "k": 32,
                "rejection": "local", "radius": 1, "resampling": "parallel", "island_window": 2}

    def __init__(self, pipe, **params):
        from mulosd.decoding.mulo import MuloDecoder, MuloSettings

        super().__init__(pipe, **params)
        p = self._params
        r = p["r"]
        if isinstance(r, bool) or r not in (2, 4) and not (isinstance(r, int) and r >= 2):
            raise MulosdError(f"r must be an integer >= 2 (2 or 4 for fmnist-32), got {r!r}")
        H = pipe.target.config.grid_size
        if H % r:
            raise MulosdError(f"r={r} does not divide the target's {H}x{H} grid")
        role = p["drafter"] or f"r{r}"
        p["drafter"] = role
        drafter = check_drafter(pipe, role, H // r)
        rows = drafter.config.grid_size if p["rows"] is None else _int_param(p, "rows", 1)
        drafting = _choice(p, "drafting", ("serial", "parallel"))
        draft_window = _int_param(p, "draft_window", 1)
        up_kind = _choice(p, "upsampler", ("learned", "pixel"))
        # re-synchronisation down-samples the committed top rows of an unfinished image; only the row-causal learned
        # down-sampler maps them as it would the full image (docs/MULOSD.md), so it is the default
        # (auto: learned when the model set ships one for this r, else pixel)
        down_kind = _choice(p, "downsampler", ("auto", "learned", "pixel"))
        if down_kind == "auto":
            down_kind = p["downsampler"] = "learned" if r in pipe.upsamplers else "pixel"
        candidates = _choice(p, "candidates", ("argmax", "sample"))
        resize = _choice(p, "resize", ("bicubic", "bilinear", "lanczos"))
        acceptance = _choice(p, "acceptance", ("threshold", "exact"))
        if acceptance == "exact":
            self.exact = True
        tau = p["tau"]
        if isinstance(tau, str) and tau.strip().lower() in ("inf", "infinity"):
            tau = float("inf")
        if tau != float("inf"):
            tau = _float_param({"tau": tau}, "tau", 0.0, 1.0, low_open=True)
        p["tau"] = tau
        V = pipe.target.config.vocab_size
        k = _int_param(p, "k", 1)
        if k > V:
            raise MulosdError(f"k must be at most {V} (the codebook has {V} entries), got {k}")
        rejection = _choice(p, "rejection", ("raster", "naive_local", "local"))
        radius = {"raster": None, "naive_local": 0, "local": _radius(p["radius"])}[rejection]
        resampling = _choice(p, "resampling", ("serial", "parallel"))
        island_window = _int_param(p, "island_window", 1)
        up = pipe.resampler(up_kind, r, resize)
        down = up if down_kind == up_kind else pipe.resampler(down_kind, r, resize)
        resampler = _Resampler(up, down)
        settings = MuloSettings(r=r, rows=rows, drafting=drafting, draft_window=draft_window, acceptance=acceptance,
                                tau=tau, k=k, radius=radius, resampling=resampling, island_window=island_window,
                                candidates=candidates)
        neighbours = codebook_neighbours(pipe.tokenizer.codebook.detach(), k, include_self=True)
        self.decoder = MuloDecoder(pipe.target, drafter, resampler, neighbours, settings, learned=up_kind == "learned")

    def generate(self, labels, sampling, streams, trace: list | None = None):
        return self.decoder.generate(labels, sampling, streams, trace=trace)


class _Resampler:
    """An up-sampler and a down-sampler that may be of different kinds."""

    def __init__(self, up, down):
        self._up, self._down = up, down

    def up(self, tokens):
        return self._up.up(tokens)

    def up_logits(self, tokens):
        return self._up.up_logits(tokens)

    def down(self, tokens):
        return self._down.down(tokens)


class _Continuous(Method):
    """Methods on the model set's continuous-token models (KL tokenizer, transformer + diffusion head)."""

    baseline = "car"

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.cont = pipe.continuous_models()
        self.model = self.cont.target

    def decode_images(self, tokens):
        return (self.cont.tokenizer.decode(tokens) + 1) / 2


class CAR(_Continuous):
    """Continuous-token AR baseline: one transformer forward and one diffusion-head chain per token."""

    name = "car"
    defaults = {"model": "target"}

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.model = self.cont.model(self._params["model"])

    def generate(self, labels, sampling, streams):
        from mulosd.decoding.continuous import generate_car

        return generate_car(self.model, labels, sampling, streams)


class CSpD(_Continuous):
    """Continuous speculative decoding (Wang et al.): the small continuous drafter proposes gamma tokens recording
    its diffusion noises; the target scores them in one forward and replays its head along the aligned
    trajectories; surrogate acceptance ratio; rejected tokens replaced by acceptance-rejection residual samples.
    Approximately lossless (the ratio is a biased surrogate, measured in docs/CSPD.md)."""

    name = "cspd"
    exact = False
    defaults = {"gamma": 4, "drafter": "small", "prefill": 0.05, "align": True, "relax": 1.0, "independent": False,
                "max_tries": 100}

    def __init__(self, pipe, **params):
        from mulosd.decoding.continuous import check_pair

        super().__init__(pipe, **params)
        p = self._params
        self.gamma = _int_param(p, "gamma", 1)
        p["prefill"] = _float_param(p, "prefill", 0.0, 1.0)
        for flag in ("align", "independent"):
            if not isinstance(p[flag], bool):
                raise MulosdError(f"{flag} must be true or false, got {p[flag]!r}")
        p["relax"] = _float_param(p, "relax", 1.0, 1e6)
        _int_param(p, "max_tries", 1)
        self.drafter = self.cont.model(p["drafter"])  # "target" drafts for itself: every draft is accepted (a test)
        check_pair(self.model, self.drafter)

    def generate(self, labels, sampling, streams):
        from mulosd.decoding.continuous import generate_cspd

        p = self._params
        return generate_cspd(self.model, self.drafter, labels, sampling, streams, self.gamma, prefill=p["prefill"],
                             align=p["align"], relax=p["relax"], max_tries=p["max_tries"],
                             independent=p["independent"])


REGISTRY: dict[str, type[Method]] = {m.name: m for m in (AR, SD, SJD, MCSJD, Lantern, GSD, ZipAR, Mulo, CAR, CSpD)}


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise MulosdError(f"unknown method {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
