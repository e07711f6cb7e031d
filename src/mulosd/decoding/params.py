"""The parameters of every decoding method: one frozen dataclass per method, the one place their names, types,
defaults, allowed values and help texts are declared and validated.

    p = SDParams.parse({"gamma": "4"})    # -> SDParams(gamma=4, drafter='small')
    p.gamma, p.to_dict(), SDParams.names(), SDParams.defaults(), SDParams.specs()["gamma"].describe()

A field is declared with ``param(default, help, low=..., high=..., choices=..., ...)``; its type is the field's
annotation (``int``, ``float``, ``bool``, ``str``, optionally ``| None``; ``int | float`` is an integer that may also
be infinite). Building an instance (``parse`` or the constructor) validates every value and raises
``MulosdError`` naming the parameter, the value and what is allowed. The string forms the CLI and bench deliver are
accepted: ``"3"``, ``"0.1"``, ``"inf"`` where infinity is allowed, ``"true"`` / ``"false"``, ``"none"`` where None is
allowed (JSON-parsed numbers and booleans are taken as they are).

Rules between parameters of one method go in the class's ``check``. Rules that need the model set (vocabulary size,
grids, drafter roles) are checked where the method is built (``decoding/methods.py``). This module itself imports no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from mulosd.errors import MulosdError

_META = "mulosd.param"
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")
_NONE = ("none", "null")
_INF = ("inf", "+inf", "infinity")
_KINDS = (bool, int, float, str)


def param(default: Any, help: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
          choices: tuple[str, ...] | None = None, inf: bool = False, none: str | None = None,
          off: str | None = None) -> Any:
    """A method parameter: ``default``, ``help`` (what it does), ``low`` / ``high`` (inclusive bounds of a number;
    ``low_open`` excludes ``low``), ``choices`` (the allowed strings), ``inf`` (infinity is allowed too), ``none``
    (what None means; needed when None is allowed) and ``off`` (a flag's name for False on the command line, e.g.
    ``prefix-accept``; default ``no-NAME``)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "choices": choices, "inf": inf,
            "none": none, "off": off}
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclass(frozen=True)
class Spec:
    """One parameter as declared: what ``param`` was given plus the name and the type from the annotation."""

    name: str
    type: type  # bool, int, float or str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    inf: bool = False
    optional: bool = False  # None is allowed
    none: str | None = None  # what None means
    off: str | None = None

    # ---- what is allowed, in words ------------------------------------------------------------------------
    def bounds(self) -> str:
        """The allowed range of a number: ">= 1", "in (0.0, 1.0]", "" (none)."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low!r}, {self.high!r}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low!r}"
        if self.high is not None:
            return f"<= {self.high!r}"
        return ""

    def allowed(self) -> str:
        """What a value must be, as in an error message: "an integer >= 0 or inf", "one of a, b"."""
        if self.type is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.type is str:
            return "a non-empty name"
        noun = "an integer" if self.type is int else "a number"
        text = f"{noun} {self.bounds()}".rstrip()
        return text + " or inf" if self.inf and self.type is int else text

    def default_text(self) -> str:
        if self.default is None:
            return f"none ({self.none})"
        if self.type is bool:
            return "true" if self.default else "false"
        return str(self.default)

    def type_name(self) -> str:
        """The type for listings: int, float, bool, str, choice; "|inf" / "|none" where those are allowed."""
        name = "choice" if self.choices else self.type.__name__
        return name + ("|inf" if self.inf else "") + ("|none" if self.optional else "")

    def allowed_text(self) -> str:
        """What a value may be, for help and listings: "integer >= 1", "number in (0.0, 1.0] or inf", "one of a,
        b", "name"; "" for a flag."""
        if self.type is bool:
            return ""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        text = "name" if self.type is str else f"{self.type_word()} {self.bounds()}".rstrip()
        return text + (" or inf" if self.inf else "") + (" or none" if self.optional else "")

    def type_word(self) -> str:
        return {bool: "flag", int: "integer", float: "number", str: "name"}[self.type]

    def describe(self) -> str:
        """One line for help and listings: help, allowed values, default."""
        allowed = self.allowed_text()
        return f"{self.help} ({allowed + '; ' if allowed else ''}default {self.default_text()})"

    def error(self, raw: Any) -> MulosdError:
        if self.choices:
            return MulosdError(f"{self.name} must be {self.allowed()}; got {raw!r}")
        extras = (["inf"] if self.inf and self.type is float else []) + ([f"none: {self.none}"] if self.optional else [])
        tail = f" (or {' or '.join(extras)})" if extras else ""
        return MulosdError(f"{self.name} must be {self.allowed()}, got {raw!r}{tail}")

    # ---- values -------------------------------------------------------------------------------------------
    def typed(self, value: Any) -> Any:
        """The value in this parameter's type, from itself or a string form (the range is not checked);
        MulosdError when it has another type or does not read as one."""
        if value is None or (self.optional and isinstance(value, str) and value.strip().lower() in _NONE):
            if self.optional:
                return None
            raise self.error(value)
        try:
            return self._coerce(value)
        except ValueError:
            raise self.error(value) from None

    def _coerce(self, value: Any) -> Any:
        text = value.strip().lower() if isinstance(value, str) else None
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError(value)
        if self.type is str:
            if isinstance(value, str) and value.strip():
                return value.strip()
            raise ValueError(value)
        if isinstance(value, bool):
            raise ValueError(value)
        if self.inf and (text in _INF or (isinstance(value, float) and value == math.inf)):
            return math.inf
        if self.type is int:
            if isinstance(value, int):
                return value
            if text is not None:
                return int(text)
            raise ValueError(value)
        if isinstance(value, (int, float)) or text is not None:
            number = float(value)
            if math.isnan(number):
                raise ValueError(value)
            return number
        raise ValueError(value)

    def in_range(self, value: Any) -> bool:
        if value is None or (value == math.inf and self.inf):
            return True
        if self.choices:
            return value in self.choices
        if self.type in (bool, str):
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def parse(self, value: Any) -> Any:
        """The validated value (a string form read as this parameter's type); MulosdError when not allowed."""
        typed = self.typed(value)
        if not self.in_range(typed):
            raise self.error(value)
        return typed


@functools.cache
def _specs(cls: type) -> dict[str, Spec]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with param()")
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        optional = type(None) in args
        kinds = [a for a in args if a is not type(None)]
        if kinds == [int, float] and meta["inf"]:
            kinds = [int]  # an integer or infinity
        if len(kinds) != 1 or kinds[0] not in _KINDS:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported parameter type {hints[f.name]!r}")
        if optional and not meta["none"]:
            raise TypeError(f"{cls.__name__}.{f.name} may be None: say what None means (param(..., none=...))")
        kind = kinds[0]
        low, high = meta["low"], meta["high"]
        if kind is float:  # bounds shown as the numbers they are compared with (0.0, 1.0)
            low, high = (None if low is None else float(low)), (None if high is None else float(high))
        out[f.name] = Spec(name=f.name, type=kind, default=f.default, help=meta["help"], low=low, high=high,
                           low_open=meta["low_open"], choices=meta["choices"], inf=meta["inf"], optional=optional,
                           none=meta["none"], off=meta["off"])
    return out


@dataclass(frozen=True)
class Params:
    """Base of the per-method parameter classes. An instance holds valid values only: construction validates and
    normalises every field (``Spec.parse``), then runs ``check``."""

    method: ClassVar[str] = ""  # the method these parameters belong to (error messages)

    def __post_init__(self):
        for name, spec in self.specs().items():
            object.__setattr__(self, name, spec.parse(getattr(self, name)))
        self.check()

    def check(self) -> None:
        """Rules between parameters (raise MulosdError); none by default."""

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        """Every parameter's declaration, in field order."""
        return _specs(cls)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.specs())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {name: spec.default for name, spec in cls.specs().items()}

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Per parameter, one line: help, allowed values, default."""
        return {name: spec.describe() for name, spec in cls.specs().items()}

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None = None):
        """``raw`` (name -> value or string form; missing names take their defaults) -> a validated instance.
        MulosdError for an unknown name (listing the allowed ones), a bad value or a broken rule between values."""
        raw = dict(raw or {})
        unknown = [k for k in raw if k not in cls.specs()]
        if unknown:
            raise MulosdError(f"method {cls.method!r} has no parameters named {', '.join(map(repr, unknown))}; "
                              f"allowed: {', '.join(cls.names()) or 'none'}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, **changes):
        """A copy with some values changed (validated like a new instance)."""
        return dataclasses.replace(self, **changes)


# ---- the methods' parameters (defaults and ranges: docs/METHODS.md, docs/MULOSD.md, docs/CSPD.md) -------------
COUPLINGS = ("none", "maximal", "gumbel")  # the Jacobi proposer's couplings (decoding.proposers imports them)
INITS = ("random", "spatial", "lowres")  # and its initialisations (lowres: the multi-scale prior)
_GAMMA = "draft length: tokens the drafter proposes per target forward"
_DRAFTER = ("drafter role in the model set (same grid and vocabulary as the target; fmnist-32 also ships 'distilled', "
            "the small drafter distilled from its target: more drafts accepted)")


@dataclass(frozen=True)
class ARParams(Params):
    method = "ar"
    model: str = param("target", "the model that samples: target, or a drafter role (r2, r4, small, distilled) to "
                                 "sample that drafter alone at its own resolution")


@dataclass(frozen=True)
class SDParams(Params):
    method = "sd"
    # gamma = 3 measured fastest at batch 1 on fmnist-32 (docs/METHODS.md): with ~40 % of drafts accepted,
    # longer drafts spend more drafter steps than they save
    gamma: int = param(3, _GAMMA, low=1)
    drafter: str = param("small", _DRAFTER)


@dataclass(frozen=True)
class SJDParams(Params):
    method = "sjd"
    window: int = param(16, "Jacobi window: tokens drafted and verified per target forward", low=1)
    init: str = param("random", "initialisation of new window cells: random (uniform token), spatial (the token "
                                "to the left) or lowres (multi-scale: the low-res drafter's image up-sampled to "
                                "high-res codes, the up-sampler's distribution as the first q)", choices=INITS)
    coupling: str = param("none", "how a re-draft is tied to the cell's previous draft (none: drawn afresh)",
                          choices=COUPLINGS)
    init_r: float | None = param(None, "init=lowres: resolution ratio of the low-res drafter (a role r<ratio> of "
                                       "the set; the largest ratio is the cheapest image to draft)", low=1,
                                 low_open=True, none="the set's largest ratio, 4 on fmnist-32")
    init_upsampler: str = param("auto", "init=lowres: learned (a distribution per cell; integer ratio), pixel "
                                        "(deterministic codes, one-hot q) or auto (learned when the set has one)",
                                choices=("auto", "learned", "pixel"))

    def __post_init__(self):
        super().__post_init__()
        if self.init_r is not None and float(self.init_r).is_integer():
            object.__setattr__(self, "init_r", int(self.init_r))

    def check(self) -> None:
        if self.init != "lowres" and (self.init_r is not None or self.init_upsampler != "auto"):
            raise MulosdError(f"{self.method}: init_r and init_upsampler apply to init=lowres only (got init={self.init})")


@dataclass(frozen=True)
class MCSJDParams(SJDParams):
    method = "mcsjd"
    coupling: str = param("maximal", "how a re-draft is tied to the cell's previous draft (none is refused: that is "
                                     "--method sjd)", choices=COUPLINGS)

    def check(self) -> None:
        if self.coupling == "none":
            raise MulosdError("mcsjd needs a coupling; allowed: maximal, gumbel (coupling=none is --method sjd)")


@dataclass(frozen=True)
class PJDParams(SJDParams):
    """PJD's lossless 2-D form (decoding/pjd.py); defaults from the sweep in docs/METHODS.md."""

    method = "pjd"
    # rows = 2, start = 8: the fastest of the measured layouts on these CPUs, where every staircase token adds to
    # the forward's cost (docs/METHODS.md); on a GPU a forward's cost is flat in its tokens and deeper staircases pay
    rows: int = param(2, "rows drafted at once: the frontier window's row and rows - 1 staircase rows below it (1 is "
                         "sjd / mcsjd)", low=1)
    start: int = param(8, "row start threshold c: a row below drafts only the columns at least c before the row "
                          "above's drafted extent", low=1)
    coupling: str = param("maximal", "how a re-draft is tied to the cell's previous draft (none: drawn afresh)",
                          choices=COUPLINGS)


@dataclass(frozen=True)
class EagleParams(Params):
    """EAGLE-2 with the set's EAGLE head; defaults from the sweep in docs/METHODS.md."""

    method = "eagle2"
    # depth 2, topk 8, 10 nodes: the fastest measured tree on these CPUs (docs/METHODS.md): the head's top
    # candidates hold the target's token about half the time, so deeper trees cost more forwards than they save
    depth: int = param(2, "levels of the draft tree (head forwards per cycle)", low=1)
    topk: int = param(8, "children proposed per expanded node, and nodes expanded per level", low=1)
    tokens: int = param(10, "draft-tree nodes verified per target forward (the best-scoring candidates)", low=1)


@dataclass(frozen=True)
class LanternParams(SDParams):
    method = "lantern"
    gamma: int = param(8, _GAMMA, low=1)
    k: int = param(20, "codebook neighbours whose target mass is pooled onto the draft (at most the vocabulary "
                       "size - 1; 0 is sd)", low=0)
    delta: float = param(0.1, "total-variation budget of the pooling", low=0, high=1)
    lam: float | None = param(None, "LANTERN++ bound p~(x) <= lam * p(x), replacing delta (1 is sd)", low=1, high=1e6,
                              none="off, the budget is delta")

    def check(self) -> None:
        default = self.specs()["delta"].default
        if self.lam is not None and self.delta != default:
            raise MulosdError(f"lantern: lam replaces delta (the budget is then (lam - 1) * p(x)); give lam or delta, "
                              f"not both (got lam={self.lam}, delta={self.delta})")


@dataclass(frozen=True)
class GSDParams(SJDParams):
    method = "gsd"
    group: int = param(10, "rank window of a group of interchangeable codes (1 is sjd)", low=1)
    prob_tol: float = param(0.15, "largest |p(x') - p(x)| inside a group", low=0, high=1, low_open=True)
    embed_tol: float = param(0.5, "largest code-vector distance inside a group", low=0, high=2, low_open=True)


@dataclass(frozen=True)
class ZipARParams(Params):
    method = "zipar"
    window: int = param(8, "tokens a row must lead the row below by before that row starts (>= the grid size is "
                           "ar)", low=1)


@dataclass(frozen=True)
class MuloParams(Params):
    """MuLo-SD; defaults from the measured sweep in docs/MULOSD.md: the whole low-res image drafted ZipAR-style in
    one cycle, learned up-sampler (when the set has one; else pixel), pooled threshold 0.1 over 32 codes, windows of radius 1, parallel islands."""

    method = "mulo"
    # what preset=paper fixes for every option left unset (None); preset=ours takes OURS
    PAPER: ClassVar[dict] = {"commit": "candidate", "reverify": 0}
    OURS: ClassVar[dict] = {"commit": "target", "reverify": 0}
    preset: str = param("ours", "ours: mulosd's measured defaults (target-drawn commits); paper: the paper's rule "
                                "as published (the candidate itself is committed, no re-verification) for every "
                                "option not given", choices=("ours", "paper"))
    r: float | None = param(None, "resolution ratio H / h between the target's grid and the low-res drafter's (2 "
                                  "or 4 for fmnist-32; 1.5 for a 16x16 drafter under a 24x24 target): the target's "
                                  "grid over r must be whole, and a ratio that is not an integer needs "
                                  "upsampler=pixel", low=1, low_open=True,
                            none="the set's smallest low-res ratio; 2 for fmnist-32")
    drafter: str | None = param(None, "low-resolution drafter role",
                                none="the role r<r>, e.g. r2, r4, r1.5")
    rows: int | None = param(None, "low-resolution rows drafted per cycle", low=1,
                             none="the whole low-res grid in one cycle")
    drafting: str = param("parallel", "serial (token by token) or parallel (ZipAR inside the drafted rows)",
                          choices=("serial", "parallel"))
    draft_window: int = param(2, "ZipAR window of parallel drafting", low=1)
    upsampler: str = param("auto", "learned (the set's latent up-sampler for r; integer r only), pixel (decode, "
                                   "resize, re-encode; any r, any set) or auto: learned when the model set has one "
                                   "for r, else pixel", choices=("auto", "learned", "pixel"))
    # re-synchronisation down-samples the committed top rows of an unfinished image; only the row-causal learned
    # down-sampler maps them as it would the full image (docs/MULOSD.md), so it is the default
    downsampler: str = param("auto", "down-sampler re-synchronising the drafter with committed rows (used when rows "
                                     "is below the low-res grid); auto: learned when the model set ships one for r, "
                                     "else pixel (always pixel for a non-integer r); learned needs an integer r",
                           choices=("auto", "learned", "pixel"))
    candidates: str = param("argmax", "learned up-sampler with threshold acceptance: its most likely code per cell "
                                      "(argmax) or a draw from its distribution (sample)", choices=("argmax", "sample"))
    resize: str = param("bicubic", "pixel up-sampler's resize filter", choices=("bicubic", "bilinear", "lanczos"))
    acceptance: str = param("threshold", "threshold (pooled target mass >= tau; lossy, the paper's rule), soft "
                                         "(accept with probability min(1, pooled mass / tau); lossy) or exact "
                                         "(lossless: a coupled Jacobi window whose first drafts come from the low-res "
                                         "image and the up-sampler's distribution, verified by speculative sampling)",
                            choices=("threshold", "soft", "exact"))
    window: int = param(16, "acceptance=exact: the Jacobi window verified per target forward", low=1)
    tau: float = param(0.1, "acceptance threshold on the pooled target mass; inf rejects every candidate", low=0,
                       high=1, low_open=True, inf=True)
    tau_peaked: float | None = param(None, "entropy-adaptive threshold: the threshold where the target is certain "
                                           "(entropy 0), falling linearly to tau at entropy log k", low=0, high=1,
                                     low_open=True, none="tau everywhere")
    commit: str | None = param(None, "what a passing cell commits: its candidate (the paper) or target (a draw from "
                                     "the target's p restricted to the candidate's pooling set)",
                               choices=("candidate", "target"), none="by preset: ours target, paper candidate")
    reverify: int | None = param(None, "re-verification rounds after local resampling: kept cells whose context "
                                       "changed are judged again in one target forward and the failures' "
                                       "neighbourhoods regenerated", low=0, none="by preset: 0 in ours and paper")
    k: int = param(32, "size of the pooling set, the candidate included (at most the vocabulary size; 1: no "
                       "pooling)", low=1)
    rejection: str = param("local", "what a rejection regenerates: local (windows of radius `radius`), naive_local "
                                    "(the rejected cells only) or raster (everything after the first rejection)",
                           choices=("raster", "naive_local", "local"))
    radius: int | float = param(1, "rejection=local: neighbourhood radius l (window 2l + 1); inf is raster", low=0,
                                inf=True)
    resampling: str = param("parallel", "serial (raster, one cell per forward) or parallel (rejection islands at "
                                        "once)", choices=("serial", "parallel"))
    island_window: int = param(2, "parallel resampling: ZipAR window inside an island", low=1)
    batching: str = param("auto", "static: a batch of images decodes together and waits for its busiest image; "
                                  "continuous: batch-size images in flight, an image that finishes leaves and the "
                                  "next one enters (whole-image cycles, parallel resampling, no re-verification); "
                                  "auto: continuous where those hold and no acceptance map is drawn, else static",
                          choices=("auto", "static", "continuous"))

    def __post_init__(self):
        """Validate, fill the options left unset from the preset, then keep a whole ratio an integer: drafter role
        r2 (not r2.0), "r": 2 in recorded params."""
        for name, value in (self.PAPER if self.preset == "paper" else self.OURS).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        super().__post_init__()
        if self.r is not None and float(self.r).is_integer():
            object.__setattr__(self, "r", int(self.r))

    def check(self) -> None:
        """Continuous batching covers threshold acceptance with parallel resampling and no re-verification; the
        learned resamplers map each low-res cell to an r x r block: an integer r only."""
        if self.batching == "continuous":
            clash = [f"{name}={value}" for name, value, ok in (
                ("acceptance", self.acceptance, self.acceptance != "exact"),
                ("resampling", self.resampling, self.resampling == "parallel"),
                ("reverify", self.reverify, not self.reverify)) if not ok]
            if clash:
                raise MulosdError(f"batching=continuous runs threshold or soft acceptance with parallel resampling and "
                                  f"no re-verification; got {', '.join(clash)} (use batching=static)")
        if self.r is None or float(self.r).is_integer():  # None: checked once the method has resolved r
            return
        for name in ("upsampler", "downsampler"):
            if getattr(self, name) == "learned":
                other = "pixel or auto"
                raise MulosdError(f"{name}=learned needs an integer r (the learned model turns each low-res cell into "
                                  f"an r x r block), got r={self.r:g}; allowed at r={self.r:g}: {name}={other}")

    @property
    def exact(self) -> bool:
        """Lossless (speculative sampling) rather than the pooled threshold."""
        return self.acceptance == "exact"

    @property
    def resample_radius(self) -> int | None:
        """The neighbourhood radius ``rejection`` implies (None is infinite): raster = infinite, naive_local = 0,
        local = ``radius``."""
        if self.rejection == "raster":
            return None
        if self.rejection == "naive_local":
            return 0
        return None if self.radius == math.inf else self.radius


@dataclass(frozen=True)
class CARParams(Params):
    method = "car"
    model: str = param("target", "the continuous model that samples: target, or a continuous drafter role (small)")


@dataclass(frozen=True)
class CSpDParams(Params):
    method = "cspd"
    gamma: int = param(4, _GAMMA, low=1)
    drafter: str = param("small", "continuous drafter role (target drafts for itself: every draft is accepted)")
    prefill: float = param(0.05, "fraction of the tokens the target generates alone before drafting starts (1 is car)",
                           low=0, high=1)
    align: bool = param(True, "replay the drafter's diffusion noises in the target's head (trajectory alignment)")
    relax: float = param(1.0, "the public code's inner temperature dividing the standardised distances inside the "
                              "ratio's Gaussians (1: the paper's ratio; the public code uses 42; > 1 is approximate)",
                         low=1, high=1e6)
    independent: bool = param(False, "test every draft on its own and keep the drafts after a rejected one (the public "
                                     "code's bookkeeping; approximate) instead of the paper's accept-left-to-right-and-"
                                     "truncate", off="prefix-accept")
    max_tries: int = param(100, "bound on acceptance-rejection proposals per residual sample (then a plain target "
                                "draw, counted as a fallback)", low=1)
