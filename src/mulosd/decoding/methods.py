"""The method registry: ``mulosd generate --method NAME`` -> a decoder built from a pipeline's models.

Each method is a small object with a ``generate(labels, sampling, streams) -> (tokens [B, N], DecodeStats)`` call.
Its parameters are declared once, in its ``Params`` class (``decoding/params.py``: names, types, defaults, ranges,
help); building a method parses them (``self.p``), then checks what needs the model set (vocabulary size, grids,
drafter roles). ``REGISTRY`` is the one list of methods.
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

import torch

from mulosd.decoding.engine import Parts, decode
from mulosd.decoding.params import (ARParams, CARParams, CSpDParams, EagleParams, GSDParams, LanternParams, MCSJDParams,
                                    MuloParams, Params, PJDParams, SDParams, SJDParams, ZipARParams)
from mulosd.decoding.proposers import DrafterProposer, JacobiProposer, LowResPrior
from mulosd.decoding.rules import verify_exact, verify_grouped, verify_lantern
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, check_continuous
from mulosd.decoding.schedule import generate_zipar
from mulosd.decoding.state import DecodeStats
from mulosd.decoding.window import ar_parts, window_parts
from mulosd.errors import MulosdError

if TYPE_CHECKING:
    from mulosd.models.gpt import GPT
    from mulosd.pipeline import Pipeline


class _Defaults:
    """``Method.defaults``: the defaults of the method's ``Params``, as a read-only mapping (class or instance)."""

    def __get__(self, obj, owner) -> Mapping[str, Any]:
        return MappingProxyType(owner.Params.defaults())


class Method:
    name: str = ""
    Params: type[Params] = Params  # the method's parameters (decoding/params.py)
    exact: bool = True  # does the output follow the target's distribution exactly (with these parameters)?
    exact_note: str = ""  # when parameters change that, in words (``mulosd methods``)
    defaults = _Defaults()
    baseline = "ar"  # the plain AR method of the same model family: speed-ups are measured against it

    def __init__(self, pipe: "Pipeline", **params):
        self.pipe = pipe
        self.p = self.Params.parse(params)

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return cls.Params.names()

    @classmethod
    def is_exact(cls, params: Mapping[str, Any] | None = None) -> bool:
        """Whether the method with these parameters (validated; missing ones default) samples the target's
        distribution exactly."""
        return bool(getattr(cls.Params.parse(params), "exact", cls.exact))

    @classmethod
    def exactness(cls) -> str:
        """Exact or lossy in a word (with the default parameters), and how the parameters change that, if they do."""
        word = "exact" if cls.exact else "lossy"
        return f"{word} ({cls.exact_note})" if cls.exact_note else word

    def params(self) -> dict:
        """The parameters this method runs with (what the stats record)."""
        return self.p.to_dict()

    @property
    def output_grid(self) -> int:
        """Tokens per side of the images this method produces (the target's grid for every speculative method)."""
        return getattr(self, "model", self.pipe.target).config.grid_size

    @property
    def device(self) -> torch.device:
        """Where the method's models live: a decode's labels and random draws go there."""
        return next(getattr(self, "model", self.pipe.target).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the transformer it decodes with (probabilities are float32 whatever it is)."""
        return next(getattr(self, "model", self.pipe.target).parameters()).dtype

    def models(self) -> list:
        """The transformers this method decodes with (its sampling model or the target, and its drafter if it has
        one): what a batch's memory estimate counts."""
        out = [getattr(self, "model", self.pipe.target)]
        drafter = getattr(self, "drafter", None)
        return out + ([drafter] if drafter is not None and drafter is not out[0] else [])

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """Refuse sampling settings this method's models cannot honour: a top-k above the vocabulary (a filter
        that would silently keep everything), or top-k / top-p for continuous tokens (no vocabulary to filter)."""
        self.pipe.check_top_k(sampling.top_k)

    def parts(self) -> Parts:
        """Fresh parts (scorer, proposer, verifier, repairer) for one decode call: the method's composition."""
        raise NotImplementedError

    def generate(self, labels: torch.Tensor, sampling: SamplingConfig, streams: RandomStreams,
                 trace: list | None = None) -> tuple[torch.Tensor, DecodeStats]:
        """Decode one batch: ``labels`` [B] with one random stream per image. Returns (tokens [B, N, ...], stats)."""
        return decode(self.parts(), labels, sampling, streams, trace=trace)

    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [N, g, g, ...] as this method produces them -> images [N, C, H, W] in [0, 1]."""
        return self.pipe.decode_images(tokens)


class AR(Method):
    """Plain autoregressive decoding: one forward per token (model=target, or a drafter role to sample it alone)."""

    name = "ar"
    Params = ARParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.model = pipe.model(self.p.model)

    def parts(self):
        return ar_parts(self.model)


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
    Params = SDParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.gamma = self.p.gamma
        self.drafter = check_drafter(pipe, self.p.drafter, pipe.target.config.grid_size)

    def rule(self):
        """The verification rule: exact speculative sampling."""
        return verify_exact

    def parts(self):
        return window_parts(self.pipe.target, DrafterProposer(self.drafter, self.gamma), self.rule(), self.gamma)


class SJD(Method):
    """Speculative Jacobi Decoding: training-free drafts from the previous iteration, window L, exact."""

    name = "sjd"
    Params = SJDParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.gamma = self.p.window
        self.rule = verify_exact
        self.prior_parts = None
        if self.p.init == "lowres":
            self.prior_parts = lowres_prior_parts(pipe, self.p.init_r, self.p.init_upsampler)
            drafter, res = self.prior_parts
            self.drafter = drafter
            self.init_r = res.hi // res.lo if res.hi % res.lo == 0 else res.hi / res.lo
            self.init_upsampler = "learned" if res.learned_up else "pixel"

    def prior(self) -> LowResPrior | None:
        """init=lowres: a fresh multi-scale prior for one decode (None for the other initialisations)."""
        if self.prior_parts is None:
            return None
        drafter, resamplers = self.prior_parts
        return LowResPrior(drafter, resamplers, LOWRES_DRAFT_WINDOW, self.pipe.target.config.vocab_size)

    def params(self) -> dict:
        out = super().params()
        if self.prior_parts is not None:  # the resolved ratio and up-sampler kind
            out.update(init_r=self.init_r, init_upsampler=self.init_upsampler)
        return out

    def parts(self):
        proposer = JacobiProposer(self.pipe.target.config.vocab_size, self.gamma, self.p.init, self.p.coupling,
                                  self.prior())
        return window_parts(self.pipe.target, proposer, self.rule, self.gamma)


LOWRES_DRAFT_WINDOW = 2  # ZipAR window of the low-res image drafted for init=lowres (MuLo-SD's draft_window)


def lowres_prior_parts(pipe: "Pipeline", r: float | None, upsampler: str):
    """The low-res drafter and resamplers of init=lowres: the set's drafter for ratio r (default: its largest ratio,
    the cheapest image to draft) and the learned up-sampler for r when the set ships one (auto), else pixel."""
    from mulosd.decoding.mulo import Resamplers

    H = pipe.target.config.grid_size
    ratios = sorted(H / m.config.grid_size for role, m in pipe.drafters.items()
                    if Mulo.role_ratio(role) and m.config.grid_size < H)
    if not ratios:
        raise MulosdError(f"init=lowres needs a low-resolution drafter (a role r<ratio>); model set {pipe.name} has "
                          f"none: use init=random or init=spatial")
    given = ratios[-1] if r is None else r
    h = Mulo.low_grid(H, given)
    role = Mulo.low_role(pipe, h) if h else None
    if role is None:
        raise MulosdError(f"init_r={given:g}: model set {pipe.name} has no low-resolution drafter for it; allowed "
                          f"init_r: {', '.join(f'{x:g}' for x in ratios)}")
    ratio = H // h if H % h == 0 else H / h
    kind = Mulo.resampler_kind(pipe, ratio, upsampler)
    if kind == "learned" and not isinstance(ratio, int):
        raise MulosdError(f"init_upsampler=learned needs an integer ratio, got init_r={ratio:g}; allowed: pixel, auto")
    up = pipe.resampler(kind, ratio)
    return check_drafter(pipe, role, h), Resamplers(up=up, down=up, lo=h, hi=H)


class MCSJD(SJD):
    """SJD with coupled re-drafting (maximal or shared-Gumbel coupling): drafts persist across iterations, exact."""

    name = "mcsjd"
    Params = MCSJDParams  # refuses coupling=none


class PJD(SJD):
    """2-D parallel Jacobi decoding (PJD), lossless form: SJD's exact frontier window plus staircase rows below it
    whose drafts are refined under a row-causal mask and enter the window when it reaches them (decoding/pjd.py)."""

    name = "pjd"
    Params = PJDParams

    def parts(self):
        from mulosd.decoding.pjd import PJDProposer, pjd_parts

        t = self.pipe.target.config
        proposer = PJDProposer(t.vocab_size, t.grid_size, self.gamma, self.p.rows, self.p.start, self.p.init,
                               self.p.coupling, self.prior())
        return pjd_parts(self.pipe.target, proposer, self.rule)


class Eagle2(Method):
    """EAGLE-2: dynamic draft trees from the set's EAGLE head (one layer on the target's features), verified in one
    target forward with tree attention and exact multi-draft rejection sampling (decoding/eagle.py)."""

    name = "eagle2"
    Params = EagleParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        if pipe.eagle is None:
            raise MulosdError(f"model set {pipe.name} has no EAGLE head; train one for its target: mulosd train eagle "
                              f"--model SET --out DIR (it is added to a set directory)")
        self.head = pipe.eagle

    def models(self) -> list:
        return [self.pipe.target]  # the head's one-layer cache is small beside the target's (memory estimate)

    def parts(self):
        from mulosd.decoding.eagle import eagle_parts

        return eagle_parts(self.pipe.target, self.head, self.p.depth, self.p.topk, self.p.tokens)


class Lantern(SD):
    """LANTERN relaxed acceptance: target mass of the k nearest codes pooled onto the draft (budget delta, or
    LANTERN++'s lam * p(x) when lam is set), small drafter. Lossy."""

    name = "lantern"
    exact = False
    Params = LanternParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        V, k = pipe.target.config.vocab_size, self.p.k
        if k > V - 1:
            raise MulosdError(f"k must be at most {V - 1} (the codebook has {V} entries), got {k}")

    def rule(self):
        """LANTERN's rule over the k nearest codes, looked up when the method first decodes (a 16384-code book
        takes seconds; building the method, e.g. for `mulosd info`, should not)."""
        return functools.partial(verify_lantern, neighbours=self.pipe.codebook_neighbours(self.p.k),
                                 delta=self.p.delta, lam=self.p.lam)


class GSD(SJD):
    """Grouped Speculative Decoding on SJD drafts: accept by the target/draft mass of a group of close,
    similarly ranked codes. Lossy; group=1 is SJD."""

    name = "gsd"
    exact = False
    Params = GSDParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.rule = functools.partial(verify_grouped, codebook=pipe.tokenizer.codebook.detach(), group=self.p.group,
                                      prob_tol=self.p.prob_tol, embed_tol=self.p.embed_tol)


class ZipAR(Method):
    """ZipAR spatially parallel decoding: a row starts once the row above has `window` tokens; one token per
    active row per forward, no verification. Lossy; window >= grid size is AR."""

    name = "zipar"
    exact = False
    Params = ZipARParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.window = self.p.window

    def parts(self):
        raise MulosdError("zipar is not speculative and has no loop parts: it runs ZipAR's schedule on the target "
                          "(decoding/schedule.py); call generate()")

    def generate(self, labels, sampling, streams, trace=None):
        return generate_zipar(self.pipe.target, labels, sampling, streams, self.window)


class Mulo(Method):
    """MuLo-SD: the same-size low-resolution drafter drafts whole rows, an up-sampler turns them into high-res
    candidates, one target forward verifies them (pooled threshold, or exact speculative sampling), rejected
    cells and their neighbourhoods are regenerated locally (serial, or islands in parallel). Lossy unless
    acceptance=exact. The ratio r = H / h between the grids may be any r > 1 that leaves h whole (1.5: a 16x16
    drafter under a 24x24 target) with the pixel resamplers; the learned ones need an integer r."""

    name = "mulo"
    Params = MuloParams
    exact = False  # the default, threshold acceptance; an instance answers for its own parameters
    exact_note = "exact with acceptance=exact"
    traces_cycles = True  # generate(..., trace=list) records every cycle (acceptance maps)

    def __init__(self, pipe, **params):
        from mulosd.decoding.mulo import MuloSettings, Resamplers
        super().__init__(pipe, **params)
        p = self.p
        self.exact = p.exact
        H, V = pipe.target.config.grid_size, pipe.target.config.vocab_size
        given = p.r if p.r is not None else self.default_ratio(pipe)
        h = self.low_grid(H, given)  # the drafter's grid
        if not h:
            raise MulosdError(f"r={given:g} does not divide the target's {H}x{H} grid into a whole low-res grid ({H} / "
                              f"{given:g} = {H / given:.4g}); allowed: r = {H} / h for a whole h from 1 to {H - 1}")
        r = H // h if H % h == 0 else H / h  # exact: a printed ratio (1.333 for 32 / 24) names the grid it rounds
        if r != p.r:  # resolved (and checked, as an explicit r would be); params() records it
            self.p = p = p.replace(r=r)
        if p.k > V:
            raise MulosdError(f"k must be at most {V} (the codebook has {V} entries), got {p.k}")
        self.drafter_role = p.drafter or self.low_role(pipe, h)
        if self.drafter_role is None:
            have = sorted(H / m.config.grid_size for role, m in pipe.drafters.items()
                          if self.role_ratio(role) and m.config.grid_size < H)
            raise MulosdError(f"r={r:g}: model set {pipe.name} has no low-resolution drafter for r={r:g} (no role "
                              f"'r{r:g}' on a {h}x{h} grid); allowed r: {', '.join(f'{x:g}' for x in have) or 'none'} "
                              f"(or name one with drafter=ROLE)")
        drafter = check_drafter(pipe, self.drafter_role, h)
        rows = drafter.config.grid_size if p.rows is None else p.rows
        if p.batching == "continuous" and rows < h:
            raise MulosdError(f"batching=continuous needs whole-image cycles (rows unset or {h}, the low-res grid), "
                              f"got rows={rows}")
        self.batching = p.batching
        if p.batching == "auto":
            able = rows >= h and not p.exact and p.resampling == "parallel" and not p.reverify
            self.batching = "continuous" if able else "static"
        self.upsampler = self.resampler_kind(pipe, r, p.upsampler)
        self.downsampler = self.resampler_kind(pipe, r, p.downsampler)
        up = pipe.resampler(self.upsampler, r, p.resize)
        down = up if self.downsampler == self.upsampler else pipe.resampler(self.downsampler, r, p.resize)
        resamplers = Resamplers(up=up, down=down, lo=h, hi=H)
        settings = MuloSettings(rows=rows, drafting=p.drafting, draft_window=p.draft_window,
                                acceptance=p.acceptance, tau=p.tau, radius=p.resample_radius,
                                resampling=p.resampling, island_window=p.island_window, candidates=p.candidates,
                                window=p.window, tau_peaked=p.tau_peaked, commit=p.commit, reverify=p.reverify)
        self._parts = (pipe.target, drafter, resamplers, settings)
        self.drafter = drafter

    @staticmethod
    def resampler_kind(pipe, r: float, kind: str) -> str:
        """``kind`` with auto resolved: the learned up-/down-sampler when the model set ships one for this (integer)
        r, else pixel."""
        if kind != "auto":
            return kind
        return "learned" if isinstance(r, int) and r in pipe.upsamplers else "pixel"

    @staticmethod
    def low_grid(H: int, r: float) -> int | None:
        """The whole low-res grid h with H / h = r, to 0.1 % (so that a printed ratio, 1.333 for 32 / 24, names
        its grid), or None."""
        h = round(H / r)
        return h if 1 <= h < H and abs(H / h - r) <= 1e-3 * r else None

    @classmethod
    def low_role(cls, pipe, h: int) -> str | None:
        """The low-resolution drafter role (``r<ratio>``) whose model works on an h x h grid, if the set has one."""
        return next((role for role, m in sorted(pipe.drafters.items())
                     if cls.role_ratio(role) and m.config.grid_size == h), None)

    @classmethod
    def default_ratio(cls, pipe) -> float:
        """r when none is given: the smallest ratio H / h among the set's low-resolution drafters (2 if it has
        none, which then fails with the list of what it has)."""
        H = pipe.target.config.grid_size
        ratios = [H / m.config.grid_size for role, m in pipe.drafters.items()
                  if cls.role_ratio(role) and m.config.grid_size < H]
        return min(ratios) if ratios else 2

    @staticmethod
    def role_ratio(role: str) -> float | None:
        """The ratio a low-res drafter role names ("r2" -> 2, "r1.5" -> 1.5), None for other roles ("small")."""
        try:
            ratio = float(role[1:]) if role[:1] == "r" else None
        except ValueError:
            return None
        return ratio if ratio is not None and 1 < ratio < float("inf") else None

    def params(self) -> dict:
        """The parameters, with the drafter role and the up- and down-sampler kinds resolved."""
        return {**super().params(), "drafter": self.drafter_role, "upsampler": self.upsampler,
                "downsampler": self.downsampler, "batching": self.batching}

    def parts(self):
        from mulosd.decoding.mulo import mulo_parts

        target, drafter, resamplers, settings = self._parts
        # the pooling sets, looked up at the first decode (seconds for a 16384-code book; not when merely built)
        return mulo_parts(target, drafter, resamplers, self.pipe.codebook_neighbours(self.p.k, include_self=True),
                          settings)

    @property
    def continuous(self) -> bool:
        """Whether ``Pipeline.generate`` hands this method every image at once, ``batch_size`` of them in flight
        (batching=continuous, or auto where it applies; a call that records acceptance maps runs static batches)."""
        return self.batching == "continuous"

    def generate(self, labels, sampling, streams, trace=None, slots: int | None = None):
        """One batch through the one loop; with continuous batching, any number of images with ``slots`` of them
        in flight (:func:`~mulosd.decoding.mulo.decode_continuous`)."""
        if not self.continuous or (trace is not None and self.p.batching == "auto"):
            return super().generate(labels, sampling, streams, trace=trace)
        from mulosd.decoding.mulo import decode_continuous

        if trace is not None:
            raise MulosdError("acceptance maps record the cycles of static batches; use batching=static (or auto) "
                              "with --acceptance-map / --acceptance-gif")
        target, drafter, resamplers, settings = self._parts
        neighbours = self.pipe.codebook_neighbours(self.p.k, include_self=True)
        return decode_continuous(target, drafter, resamplers, neighbours, settings, labels, sampling, streams,
                                 slots or len(labels))


class _Continuous(Method):
    """Methods on the model set's continuous-token models (KL tokenizer, transformer + diffusion head)."""

    baseline = "car"

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.cont = pipe.continuous_models()
        self.model = self.cont.target

    def decode_images(self, tokens):
        return (self.cont.tokenizer.decode(tokens) + 1) / 2

    def check_sampling(self, sampling: SamplingConfig) -> None:
        check_continuous(sampling)


class CAR(_Continuous):
    """Continuous-token AR baseline: one transformer forward and one diffusion-head chain per token."""

    name = "car"
    Params = CARParams

    def __init__(self, pipe, **params):
        super().__init__(pipe, **params)
        self.model = self.cont.model(self.p.model)

    def parts(self):
        from mulosd.decoding.continuous import car_parts

        return car_parts(self.model)


class CSpD(_Continuous):
    """Continuous speculative decoding (Wang et al.): the small continuous drafter proposes gamma tokens recording
    its diffusion noises; the target scores them in one forward and replays its head along the aligned
    trajectories; surrogate acceptance ratio; rejected tokens replaced by acceptance-rejection residual samples.
    Approximately lossless (the ratio is a biased surrogate, measured in docs/CSPD.md)."""

    name = "cspd"
    exact = False
    Params = CSpDParams

    def __init__(self, pipe, **params):
        from mulosd.decoding.continuous import check_pair

        super().__init__(pipe, **params)
        self.gamma = self.p.gamma
        self.drafter = self.cont.model(self.p.drafter)  # "target" drafts for itself: every draft is accepted (a test)
        check_pair(self.model, self.drafter)

    def parts(self):
        from mulosd.decoding.continuous import cspd_parts

        p = self.p
        return cspd_parts(self.model, self.drafter, self.gamma, prefill=p.prefill, align=p.align, relax=p.relax,
                          max_tries=p.max_tries, independent=p.independent)


REGISTRY: dict[str, type[Method]] = {m.name: m for m in (AR, SD, SJD, MCSJD, PJD, Eagle2, Lantern, GSD, ZipAR, Mulo,
                                                          CAR, CSpD)}


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise MulosdError(f"unknown method {name!r}; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
