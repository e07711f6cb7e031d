"""The methods' parameter schemas (decoding/params.py): declarations, defaults, ranges, string forms, errors."""

import math

import pytest

from mulosd.decoding.methods import REGISTRY
from mulosd.decoding.params import COUPLINGS, INITS, LanternParams, MCSJDParams, MuloParams, Params, SDParams, param
from mulosd.errors import MulosdError

SCHEMAS = [(name, cls.Params) for name, cls in REGISTRY.items()]

# the defaults every method had before the schemas (docs/METHODS.md, docs/MULOSD.md, docs/CSPD.md)
DEFAULTS = {
    "ar": {"model": "target"},
    "sd": {"gamma": 3, "drafter": "small"},
    "sjd": {"window": 16, "init": "random", "coupling": "none", "init_r": None, "init_upsampler": "auto"},
    "mcsjd": {"window": 16, "init": "random", "coupling": "maximal", "init_r": None, "init_upsampler": "auto"},
    "pjd": {"window": 16, "init": "random", "coupling": "maximal", "init_r": None, "init_upsampler": "auto",
            "rows": 2, "start": 8},
    "eagle2": {"depth": 2, "topk": 8, "tokens": 10},
    "lantern": {"gamma": 8, "drafter": "small", "k": 20, "delta": 0.1, "lam": None},
    "gsd": {"window": 16, "init": "random", "coupling": "none", "init_r": None, "init_upsampler": "auto",
            "group": 10, "prob_tol": 0.15, "embed_tol": 0.5},
    "zipar": {"window": 8},
    # r and upsampler resolve per model set (None: its smallest low-res ratio; auto: learned when it has one for r),
    # which on fmnist-32 is r = 2 with the learned up-sampler, as before (tests/test_mulo.py checks the resolution)
    # commit and reverify take the preset's values when unset (ours: target, 0; paper: candidate, 0)
    "mulo": {"preset": "ours", "r": None, "drafter": None, "rows": None, "drafting": "parallel", "draft_window": 2,
             "upsampler": "auto", "downsampler": "auto", "candidates": "argmax", "resize": "bicubic",
             "acceptance": "threshold", "window": 16, "tau": 0.1, "tau_peaked": None, "commit": None, "reverify": None,
             "k": 32, "rejection": "local", "radius": 1, "resampling": "parallel", "island_window": 2,
             "batching": "auto"},
    "car": {"model": "target"},
    "cspd": {"gamma": 4, "drafter": "small", "prefill": 0.05, "align": True, "relax": 1.0, "independent": False,
             "max_tries": 100},
}

# (method, parameter, smallest allowed, largest allowed, refused values)
RANGES = [
    ("sd", "gamma", 1, None, [0, -1]),
    ("sjd", "window", 1, None, [0]),
    ("zipar", "window", 1, None, [0]),
    ("pjd", "window", 1, None, [0]),
    ("pjd", "rows", 1, None, [0]),
    ("pjd", "start", 1, None, [0, -2]),
    ("eagle2", "depth", 1, None, [0]),
    ("eagle2", "topk", 1, None, [0]),
    ("eagle2", "tokens", 1, None, [0]),
    ("mulo", "window", 1, None, [0]),
    ("lantern", "k", 0, None, [-1]),
    ("lantern", "delta", 0.0, 1.0, [-0.01, 1.01]),
    ("lantern", "lam", 1.0, 1e6, [0.99, 2e6]),
    ("gsd", "group", 1, None, [0]),
    ("gsd", "prob_tol", 1e-9, 1.0, [0, 1.01]),
    ("gsd", "embed_tol", 1e-9, 2.0, [0, 2.01]),
    ("mulo", "r", 2, None, [1, 0]),
    ("mulo", "rows", 1, None, [0]),
    ("mulo", "draft_window", 1, None, [0]),
    ("mulo", "tau", 1e-9, 1.0, [0, 1.5, -math.inf]),
    ("mulo", "k", 1, None, [0]),
    ("mulo", "radius", 0, None, [-1]),
    ("mulo", "island_window", 1, None, [0]),
    ("cspd", "gamma", 1, None, [0]),
    ("cspd", "prefill", 0.0, 1.0, [-0.1, 1.5]),
    ("cspd", "relax", 1.0, 1e6, [0.5]),
    ("cspd", "max_tries", 1, None, [0]),
]


def test_registry_order_and_every_method_has_its_own_schema():
    assert list(REGISTRY) == ["ar", "sd", "sjd", "mcsjd", "pjd", "eagle2", "lantern", "gsd", "zipar", "mulo",
                              "car", "cspd"]
    for name, cls in REGISTRY.items():
        assert cls.name == name and cls.Params.method == name and cls.Params is not Params
        assert cls.param_names() == cls.Params.names() == tuple(DEFAULTS[name])


@pytest.mark.parametrize("name,schema", SCHEMAS)
def test_defaults_are_unchanged_declared_with_help_and_inside_their_range(name, schema):
    assert schema.defaults() == DEFAULTS[name]
    resolved = {**DEFAULTS[name], **({"commit": "target", "reverify": 0} if name == "mulo" else {})}  # the preset's
    assert schema.parse({}).to_dict() == resolved
    assert dict(REGISTRY[name].defaults) == DEFAULTS[name]
    for key, spec in schema.specs().items():
        assert spec.help.strip() and spec.name == key
        assert spec.parse(spec.default) == spec.default  # the default is allowed (and normal)
        assert spec.in_range(spec.default)
        if spec.default is None:
            assert spec.optional and spec.none
        line = schema.describe()[key]
        assert spec.help in line and "default" in line


def test_method_defaults_view_is_read_only():
    with pytest.raises(TypeError):
        REGISTRY["sd"].defaults["gamma"] = 5
    assert REGISTRY["sd"].defaults["gamma"] == 3


@pytest.mark.parametrize("method,key,low,high,bad", RANGES)
def test_ranges(method, key, low, high, bad):
    schema = REGISTRY[method].Params
    assert getattr(schema.parse({key: low}), key) == low
    if high is not None:
        assert getattr(schema.parse({key: high}), key) == high
    for value in bad:
        with pytest.raises(MulosdError, match=rf"^{key} must be "):
            schema.parse({key: value})


@pytest.mark.parametrize("name,schema", SCHEMAS)
def test_every_parse_error_names_the_parameter_and_what_is_allowed(name, schema):
    for key, spec in schema.specs().items():
        bad = 1.5 if spec.type in (bool, int, str) else "x"
        with pytest.raises(MulosdError) as err:
            schema.parse({key: bad})
        msg = str(err.value)
        assert msg.startswith(f"{key} must be ") and repr(bad) in msg
        assert spec.allowed() in msg


def test_unknown_names_list_the_allowed_ones():
    with pytest.raises(MulosdError, match=r"method 'sd' has no parameters named 'tau', 'k'; allowed: gamma, drafter"):
        SDParams.parse({"gamma": 3, "tau": 0.1, "k": 2})


def test_messages_as_before():
    cases = [
        (SDParams, {"gamma": 0}, "gamma must be an integer >= 1, got 0"),
        (MuloParams, {"tau": 0}, "tau must be a number in (0.0, 1.0], got 0"),
        (MuloParams, {"radius": -1}, "radius must be an integer >= 0 or inf, got -1"),
        (MuloParams, {"rejection": "global"}, "rejection must be one of raster, naive_local, local; got 'global'"),
        (LanternParams, {"delta": 1.5}, "delta must be a number in [0.0, 1.0], got 1.5"),
        (MCSJDParams, {"coupling": "none"}, "mcsjd needs a coupling; allowed: maximal, gumbel"),
    ]
    for schema, raw, msg in cases:
        with pytest.raises(MulosdError) as err:
            schema.parse(raw)
        assert msg in str(err.value)


def test_string_forms_from_the_cli_and_bench():
    p = MuloParams.parse({"r": "4", "tau": "inf", "radius": "Infinity", "rows": "none", "drafter": "null", "k": " 8"})
    assert (p.r, p.tau, p.radius, p.rows, p.drafter, p.k) == (4, math.inf, math.inf, None, None, 8)
    assert MuloParams.parse({"tau": float("inf"), "radius": float("inf")}).radius == math.inf
    assert MuloParams.parse({"tau": 1}).tau == 1.0 and isinstance(MuloParams.parse({"tau": 1}).tau, float)
    c = REGISTRY["cspd"].Params.parse({"align": "false", "independent": "True", "prefill": "0.5"})
    assert (c.align, c.independent, c.prefill) == (False, True, 0.5)
    assert LanternParams.parse({"lam": "2"}).lam == 2.0 and LanternParams.parse({"lam": None}).lam is None
    for schema, raw in [(SDParams, {"gamma": True}), (SDParams, {"gamma": 3.0}), (SDParams, {"gamma": "3.5"}),
                        (SDParams, {"gamma": "inf"}), (SDParams, {"drafter": None}), (SDParams, {"drafter": ""}),
                        (LanternParams, {"delta": "inf"}), (LanternParams, {"delta": float("nan")}),
                        (REGISTRY["cspd"].Params, {"align": 1}), (REGISTRY["cspd"].Params, {"align": "maybe"})]:
        with pytest.raises(MulosdError, match="must be"):
            schema.parse(raw)


def test_rules_between_parameters():
    assert MCSJDParams.parse({"coupling": "gumbel"}).coupling == "gumbel"
    with pytest.raises(MulosdError, match="lam replaces delta"):
        LanternParams.parse({"lam": 2, "delta": 0.3})
    assert LanternParams.parse({"lam": 2, "delta": 0.1}).lam == 2.0  # delta at its default is not in the way
    radius = lambda **kw: MuloParams.parse(kw).resample_radius  # noqa: E731
    assert radius() == 1 and radius(radius=3) == 3 and radius(radius="inf") is None
    assert radius(rejection="raster", radius=3) is None and radius(rejection="naive_local", radius=3) == 0


def test_instances_are_validated_frozen_and_replaceable():
    with pytest.raises(MulosdError, match="gamma must be"):
        SDParams(gamma=0)
    p = SDParams.parse({"gamma": "5"})
    with pytest.raises(AttributeError):
        p.gamma = 6
    assert p.replace(gamma=6).gamma == 6 and p.gamma == 5
    with pytest.raises(MulosdError, match="gamma must be"):
        p.replace(gamma=-1)


def test_exactness():
    exact = {name for name, cls in REGISTRY.items() if cls.is_exact()}
    assert exact == {"ar", "sd", "sjd", "mcsjd", "pjd", "eagle2", "car"}
    mulo = REGISTRY["mulo"]
    assert mulo.exact is False and mulo.is_exact({"acceptance": "exact"}) is True
    assert mulo.exactness() == "lossy (exact with acceptance=exact)" and REGISTRY["sd"].exactness() == "exact"
    with pytest.raises(MulosdError, match="acceptance must be one of"):
        mulo.is_exact({"acceptance": "lossless"})


def test_jacobi_choices_match_the_proposer():
    from mulosd.decoding.proposers import JacobiProposer

    assert INITS == JacobiProposer.INITS and COUPLINGS == JacobiProposer.COUPLINGS


def test_declarations_are_checked():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoHelpForNone(Params):
        x: int | None = param(None, "x", low=0)

    with pytest.raises(TypeError, match="say what None means"):
        NoHelpForNone.parse({})

    @dataclass(frozen=True)
    class ListType(Params):
        x: list = param(None, "x", none="nothing")

    with pytest.raises(TypeError, match="unsupported parameter type"):
        ListType.parse({})
