"""``mulosd bench``: speed and quality of decoding methods side by side, in one process.

Every setting (a method plus parameters; sweeps expand into one setting per point) decodes the same images:
image i has random stream (seed, i) and class i mod C (a class-conditional set of C classes) or caption i mod P
(a text-to-image set, given P captions: ``bench_captions``). Batches are interleaved: round b decodes batch b with
every setting, in an order rotated each round, so slow drift of the machine hits all settings alike. After
every round the raw per-batch records (with the classifier features and the first images of every setting) are
written atomically to ``state.json`` / ``state.safetensors`` in the output directory, together with the
aggregated ``results.json``, ``results.csv`` and ``results.md``; ``resume=True`` continues after the last finished
round, and its ``samples/<setting>.png`` grids are those an uninterrupted run writes. A folder that already holds
files is refused unless ``resume`` (a run of the same config; else the differences are named) or ``force``
(bench's own files in it are deleted first). A setting that raises is reported in its row (``error``) and skipped
in later rounds; the others go on.

Under torchrun (``torchrun --nproc_per_node=N -m mulosd bench ...``; ``mulosd.distributed``) round b is decoded by
rank b mod N: the ranks decode N rounds at a time, each its own, and send their records, features and sample
images to rank 0, which merges them in round order and writes exactly what one process writes (the rows, the state
for --resume, the grids), plus ``config.world_size``. Latencies stay per batch, so per rank: the time one process
takes per image, not the job's throughput. Rank 0 alone reads and writes files; a resumed run's progress is
broadcast from it.

Each setting's method is built once, before any work, and ``--out`` is checked (with a resumed run's state) before
it is created, so bad values leave no folder behind. That one object decodes its warm-up batch and every measured
batch (``Pipeline.generate``); the images of a batch are classified once, by the pipeline. The module reads top to
bottom: settings, conditions, scheduling and resume, measurement, quality, writing, and ``run_bench`` with the
state of one run (``_BenchRun``).

Quality is measured where it means something. A Fashion-MNIST-like set (one with a classifier: fmnist-32 and sets
trained like it) gets class accuracy, FID/KID in the classifier's feature space (and with --inception in
Inception's) against the Fashion-MNIST test split, and the two-sample tests against its family's reference. A set
without a classifier (one imported from LlamaGen checkpoints: RGB, 256-512 px, ImageNet classes or captions) gets
the speed columns and, with --inception, the two-sample test of each setting against its reference in Inception
space only: its classifier columns are None ("n/a" in results.md, with the reason), and no Fashion-MNIST reference
is computed for it, as its images are not drawn from that distribution.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import platform
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mulosd.data import FashionMNIST
from mulosd.decoding.methods import Method, get_method
from mulosd.decoding.sampling import SamplingSettings
from mulosd.decoding.state import PHASES, add_counts
from mulosd.distributed import Context, dtype_name, init, pipe_device, pipe_dtype
from mulosd.distributed import context as dist_context
from mulosd.errors import MulosdError
from mulosd.evaluation.fid import (cached_reference, fid_from_features, kernel_distance, kid_permutation_test,
                                   stratified_kid_ok)
from mulosd.io import atomic_write, cache_dir, atomic_write_json, atomic_write_text, check_writable
from mulosd.models.condition import Captions

SPACES = ("classifier", "inception")
# KID (against the test set, and between a setting and its reference) weighs each setting's images as the
# balanced sample they are: image i asks for class i mod C, or caption i mod P (fid._pair_weights). Recorded in
# results.json's config as "kid_strata"; runs written before it carry an i.i.d.-weighted KID, biased low, that the
# doc tables do not show.
KID_STRATA = {"class": "requested class", "caption": "requested caption"}
PERMUTATIONS = 1000
SAMPLE_IMAGES = 20  # the first images of every setting go into samples/<setting>.png
WARMUP_SEED_OFFSET = 7919  # the uncounted warm-up batch draws other images than the measured ones


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass
class Setting:
    label: str
    method: str
    params: dict = field(default_factory=dict)


def _param_names(method: str) -> set[str]:
    """The parameter names of a method, from its typed schema."""
    return set(get_method(method).param_names())


def _check_key(option: str, item: str, method: str, key: str) -> None:
    allowed = _param_names(method)
    if key not in allowed:
        raise MulosdError(f"{option} {item!r}: method {method!r} has no parameter {key!r}; "
                          f"allowed: {', '.join(sorted(allowed)) or 'none'}")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _label(name: str, params: dict) -> str:
    return name + ("" if not params else "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]")


def _method_names(methods: str, extra: tuple[str, ...]) -> list[str]:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names and not extra:
        raise MulosdError("--methods is empty; name at least one method (see `mulosd methods`)")
    if len(set(names)) != len(names):
        raise MulosdError(f"--methods names a method twice: {methods!r}")
    return names


def _split_option(option: str, item: str, names: list[str]) -> tuple[str, str, str]:
    """``METHOD.KEY=VALUE`` (a --param) or ``METHOD.KEY=V1,V2`` (a --sweep) -> (method, key, value text), checked."""
    head, eq, values = item.partition("=")
    method, dot, key = head.partition(".")
    if not eq or not dot or not key or not values:
        shape = "METHOD.KEY=VALUE" + ("[,VALUE...]" if option == "--sweep" else "")
        raise MulosdError(f"{option} {item!r} must look like {shape}")
    if method not in names:
        raise MulosdError(f"{option} {item!r} is for method {method!r}, which is not in --methods ({', '.join(names)})")
    _check_key(option, item, method, key)
    return method, key, values


def _sweep_settings(name: str, fixed: dict, grid: dict[str, list]) -> list[Setting]:
    """One setting per point of the product of ``grid``'s value lists, each with the ``fixed`` parameters too."""
    get_method(name)
    keys = list(grid)
    settings = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        params = {**fixed, **dict(zip(keys, combo))}
        settings.append(Setting(_label(name, params), name, params))
    return settings


def _extra_setting(item: str) -> Setting:
    """A --setting ``METHOD:KEY=VALUE[,KEY=VALUE...]``."""
    method, _, rest = item.partition(":")
    method = method.strip()
    get_method(method)
    params = {}
    for kv in filter(None, rest.split(",")):
        key, eq, value = kv.partition("=")
        if not eq:
            raise MulosdError(f"--setting {item!r} must look like METHOD:KEY=VALUE[,KEY=VALUE...]")
        _check_key("--setting", item, method, key)
        params[key] = _parse_value(value)
    return Setting(_label(method, params), method, params)


def parse_settings(methods: str, sweeps: tuple[str, ...] = (), params: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> list[Setting]:
    """``methods`` "ar,sd,mulo"; ``sweeps`` like "mulo.tau=0.05,0.1" (several for one method give the product);
    ``params`` like "mulo.k=16" (fixed); ``extra`` single settings like "mulo:upsampler=pixel,resampling=serial"
    appended as they are. Every method is checked to exist and every key to be a parameter of it."""
    names = _method_names(methods, extra)
    fixed: dict[str, dict] = {n: {} for n in names}
    grid: dict[str, dict[str, list]] = {n: {} for n in names}
    for item in params:
        method, key, value = _split_option("--param", item, names)
        fixed[method][key] = _parse_value(value)
    for item in sweeps:
        method, key, values = _split_option("--sweep", item, names)
        grid[method][key] = [_parse_value(v) for v in values.split(",")]
    settings = [s for n in names for s in _sweep_settings(n, fixed[n], grid[n])]
    settings += [_extra_setting(item) for item in extra]
    labels = [x.label for x in settings]
    if len(set(labels)) != len(labels):
        raise MulosdError(f"the same setting appears twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    return settings


@dataclass
class BenchConfig(SamplingSettings):
    num_images: int = 100
    batch_size: int = 1
    seed: int = 0
    warmup: bool = True
    inception: bool = False  # also FID with the standard Inception-v3 (about 0.13 s per image on 2 cores)
    reference_images: int = 10000  # test-split images behind the Inception reference statistics
    round_images: int | None = None  # images per round (a multiple of batch_size); None: one batch

    @property
    def round_size(self) -> int:
        """Images every setting decodes before any decodes the next ones: one batch, or ``round_images``."""
        return self.round_images or self.batch_size

    def validate(self) -> None:
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise MulosdError(f"--num-images must be an integer >= 1, got {self.num_images!r}")
        if self.batch_size < 1:
            raise MulosdError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.round_images is not None and (self.round_images < 1 or self.round_images % self.batch_size):
            raise MulosdError(f"--round-images must be a positive multiple of --batch-size ({self.batch_size}), "
                              f"got {self.round_images}")
        self.sampling()
        if not isinstance(self.reference_images, int) or not 2 <= self.reference_images <= 10000:
            raise MulosdError(f"--reference-images must be an integer in [2, 10000] (the test split), "
                              f"got {self.reference_images!r}")
        if self.inception:
            from mulosd.evaluation.inception import inception_path

            inception_path()  # missing weights: say how to install them before any work starts


# ---- conditions -------------------------------------------------------------------------------------------
GRID_NAME_CHARS = 12  # a caption's name in its sample-grid row: the row label has room for about this many


@dataclass
class BenchCaptions:
    """The P captions of a text-to-image bench (image i gets caption i mod P), with what they were given as:
    ``source`` is recorded in results.json and compared by --resume, so another caption list is another run."""

    captions: Captions
    names: list[str]  # one short name per caption, for the sample grids' rows
    source: dict  # {"prompts": [...], "t5": encoder folder name} or {"caption_features": [...], "features_sha256"}


def _short(text: str) -> str:
    """``text`` cut to GRID_NAME_CHARS characters (an ellipsis marks a cut)."""
    return text if len(text) <= GRID_NAME_CHARS else text[: GRID_NAME_CHARS - 1] + "…"


def _captions_digest(captions: Captions) -> str:
    """A short fingerprint of caption features and masks: equal digests, equal conditions. Feature files keep
    their names when re-extracted (LlamaGen's extract_t5_feature.py numbers them), so names alone do not say."""
    h = hashlib.sha256()
    for t in (captions.features.float(), captions.mask):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def bench_captions(pipe, prompts: tuple[str, ...] | list[str] = (), features: tuple[str, ...] | list[str] = (),
                   t5_path: str | Path | None = None) -> BenchCaptions | None:
    """The captions of a text-to-image bench: ``prompts`` encoded by the T5 encoder in ``t5_path``, or the caption
    feature files ``features`` (``Pipeline.captions``). None when none of the three is given (a class-conditional
    bench). Captions for a class-conditional set, prompts with feature files, prompts without ``t5_path``, or a
    bad feature file are refused by ``Pipeline.captions`` naming what is allowed."""
    if not prompts and not features and t5_path is None:
        return None
    captions = pipe.captions(prompts=list(prompts), features=list(features), t5_path=t5_path)
    if prompts:  # the encoder enters (another T5 gives other features); its digest would vary across devices
        return BenchCaptions(captions, [_short(p) for p in prompts],
                             {"prompts": list(prompts), "t5": Path(t5_path).name})
    return BenchCaptions(captions, [_short(Path(f).stem) for f in features],
                         {"caption_features": [Path(f).name for f in features],
                          "features_sha256": _captions_digest(captions)})


def _check_conditions(pipe, captions: BenchCaptions | None) -> None:
    """A class-conditional set takes no captions; a text-to-image set needs them (its message names the options
    that give them)."""
    pipe.check_condition_kind("caption" if captions is not None else "class")


def _condition_ids(pipe, captions: BenchCaptions | None, n: int) -> torch.Tensor:
    """What image i asks for, for i < n: class i mod C, or (a text-to-image bench) the index i mod P of its caption.
    KID's strata and the sample grids' rows."""
    return torch.arange(n) % (len(captions.captions) if captions is not None else len(pipe.class_names))


def _conditions_record(pipe, captions: BenchCaptions | None, n: int) -> dict:
    """results.json's account of the conditions: the class ids asked for, or the captions' source."""
    if captions is not None:
        return {"kind": "caption", "image_i": f"caption i mod {len(captions.captions)}", **captions.source}
    classes = len(pipe.class_names)
    return {"kind": "class", "image_i": f"class i mod {classes}", "class_ids": list(range(min(n, classes)))}


def _fmnist_like(pipe) -> bool:
    """Whether a set's images are Fashion-MNIST-like, so that FID/KID against the Fashion-MNIST test split means
    something: it has a classifier, trained on Fashion-MNIST (fmnist-32 and sets trained like it). A set imported
    from LlamaGen checkpoints has none."""
    return pipe.classifier is not None


# ---- scheduling and resume --------------------------------------------------------------------------------
def _batches(cfg: BenchConfig) -> list[tuple[int, int]]:
    """Round b decodes images [lo, hi) of every setting: one batch, or ``round_images`` (several batches; a
    continuously batched method keeps batch-size images in flight across the round)."""
    n = cfg.round_size
    return [(b, min(b + n, cfg.num_images)) for b in range(0, cfg.num_images, n)]


def _round_order(settings: list[Setting], b: int) -> list[Setting]:
    """The settings in the order round b runs them: rotated by b, so no setting always runs first."""
    return settings[b % len(settings):] + settings[: b % len(settings)]


def _run_config(pipe, settings: list[Setting], cfg: BenchConfig, captions: BenchCaptions | None = None) -> dict:
    """What a run measures; a resumed run must have the same (compared as JSON). The transformers' dtype changes
    the images, so a run in another dtype than float32 names it (runs in float32, older ones included, do not);
    the device and the number of processes do not enter: a resumed run may use others. A text-to-image run names
    its conditions (the captions' source, ``BenchCaptions.source``); a class-conditional run's classes follow from
    the model set and the number of images (results.json's config lists them all the same, as ``conditions``)."""
    dtype = dtype_name(pipe_dtype(pipe))
    return {"model": pipe.name, "num_images": cfg.num_images, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "sampling": cfg.sampling().record(), "settings": [[s.label, s.method, s.params] for s in settings],
            "inception": cfg.inception, **({"reference_images": cfg.reference_images} if cfg.inception else {}),
            **({"round_images": cfg.round_images} if cfg.round_images else {}),
            **({"dtype": dtype} if dtype != "float32" else {}),
            **({"conditions": _conditions_record(pipe, captions, cfg.num_images)} if captions is not None else {})}


_ABSENT = object()


def _shown(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _settings_differences(old: list, new: list) -> list[str]:
    """Which setting labels a resumed run adds or drops, which keep their label but not their method or
    parameters, or (all else equal) how their order changed: the order decides every round's rotation."""
    before, after = {e[0]: e for e in old}, {e[0]: e for e in new}
    added = [label for label in after if label not in before]
    removed = [label for label in before if label not in after]
    out = [f"settings added: {', '.join(added)}"] if added else []
    out += [f"settings removed: {', '.join(removed)}"] if removed else []
    out += [f"setting {label}: {_shown(before[label][1:])} -> {_shown(after[label][1:])}"
            for label in after if label in before and before[label] != after[label]]
    if not out:
        out = [f"settings order: {', '.join(before)} -> {', '.join(after)}"]
    return out


def _config_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every field of a run's config that differs (dicts field by field, the settings by
    label), in the new config's order, then the fields only the old one has."""
    diffs = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        if key == "settings" and isinstance(a, list) and isinstance(b, list):
            diffs += _settings_differences(a, b)
        elif isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {_shown(a.get(k, _ABSENT))} -> {_shown(b.get(k, _ABSENT))}"
                      for k in [*b, *(k for k in a if k not in b)] if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
        else:
            diffs.append(f"{key}: {_shown(a)} -> {_shown(b)}")
    return diffs


@dataclass
class _Saved:
    """What a resumed run continues from (``_load_state``)."""
    records: dict
    errors: dict
    done_rounds: int
    feats: dict | None  # per space, per label: [features so far]; None without a feature file
    samples: dict  # label -> (its first images so far, their image indices); labels without any left out


def _load_state(out: Path, config: dict, settings: list[Setting], spaces) -> _Saved:
    """A resumed run's state, after checking that ``out`` holds a run of the same config (else the differences
    are named). Only reads: a refused resume leaves the folder (or its absence) as it was."""
    state_path, feats_path = out / "state.json", out / "state.safetensors"
    if not state_path.is_file():
        raise MulosdError(f"--resume: no bench run to continue in {out} (no state.json); start without --resume")
    try:
        state = json.loads(state_path.read_text())
        old = state["config"]
        keep = (state["records"], state["errors"], int(state["done_rounds"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise MulosdError(f"--resume: {state_path} is unreadable ({type(exc).__name__}: {exc}); "
                          f"use another --out, or --force to start over in {out}") from None
    diffs = _config_differences(old, json.loads(json.dumps(config))) if isinstance(old, dict) else ["config"]
    if diffs:
        raise MulosdError(f"--resume: {out} holds a run with other settings ({'; '.join(diffs)}); use the same "
                          f"options, another --out, or --force to start over in {out}")
    feats, samples = None, {}
    if feats_path.exists():
        try:
            saved = load_file(str(feats_path))
        except (SafetensorError, OSError) as exc:
            raise MulosdError(f"--resume: {feats_path} is unreadable ({exc}); use another --out, or --force to "
                              f"start over in {out}") from None
        feats = {space: {s.label: [saved[f"{space}/{s.label}"]] if f"{space}/{s.label}" in saved else []
                         for s in settings} for space in spaces}
        samples = {s.label: (saved[f"samples/{s.label}"], saved[f"samples_index/{s.label}"]) for s in settings
                   if f"samples/{s.label}" in saved and f"samples_index/{s.label}" in saved}
    return _Saved(*keep, feats, samples)


# bench's own files in an output folder: what --force deletes (nothing else in the folder is touched)
RUN_FILES = ("results.json", "results.csv", "results.md", "state.json", "state.safetensors")
RUN_FOLDERS = ("plots", "samples")  # of PNG files


def _own_file(name: str, names) -> bool:
    """``name`` is one of ``names`` or the temporary file atomic_write left of one (``.NAME.xxxx.tmp``)."""
    return name in names or (name.startswith(".") and name.endswith(".tmp")
                             and any(name.startswith(f".{n}.") for n in names))


def _check_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse, before anything is created or deleted, a folder that already holds files unless the run continues
    it (``resume``) or starts over in it (``force``)."""
    if resume and force:
        raise MulosdError("--resume continues the run in --out and --force deletes it; give one of them")
    if not resume and not force and out.is_dir() and any(out.iterdir()):
        raise MulosdError(f"{out} is not empty (an earlier run?); use --resume to continue that run, --force to "
                          f"delete its results first, or another --out")


def _clear_run(out: Path) -> None:
    """--force: delete bench's own files (results.*, state.*, the PNGs of plots/ and samples/, temporary files
    of interrupted writes) from ``out``; whatever else is in it stays, and nothing outside it is touched."""
    for entry in out.iterdir():
        if entry.name in RUN_FOLDERS and entry.is_dir() and not entry.is_symlink():
            for f in entry.iterdir():
                temporary = f.name.startswith(".") and f.name.endswith(".tmp") and ".png." in f.name
                if (f.is_file() or f.is_symlink()) and (f.suffix == ".png" or temporary):
                    f.unlink()
            if not any(entry.iterdir()):
                entry.rmdir()
        elif (entry.is_file() or entry.is_symlink()) and _own_file(entry.name, RUN_FILES):
            entry.unlink()  # a link is removed itself, never what it points to


# ---- measurement ------------------------------------------------------------------------------------------
def _build_methods(pipe, settings: list[Setting]) -> dict[str, Method]:
    """Every setting's method, built (and so validated) once, before any work starts."""
    return {s.label: get_method(s.method)(pipe, **s.params) for s in settings}


def _decode(pipe, method: Method, conditions: torch.Tensor | Captions, lo: int, seed: int, cfg: BenchConfig,
            classify: bool = True):
    """Images [lo, lo + len(conditions)) of one setting (class ids or captions), decoded by its built method (one
    GenerationOutput)."""
    return pipe.generate(method, conditions, cfg.sampling(), seed=seed, batch_size=cfg.batch_size, first_index=lo,
                         classify=classify)


def token_digest(tokens: torch.Tensor) -> str:
    """A short fingerprint of one image's tokens (its dtype, shape and values): equal digests, equal tokens."""
    t = tokens.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()[:16]


def _record(b: int, output, rank: int = 0, peak_memory_mb: float | None = None) -> dict:
    """The raw numbers of one decoded batch that the rows are aggregated from (kept in state.json): with the
    rank that decoded it, its peak device memory (CUDA; None on the CPU) and every image's token digest. ``correct``
    (images of the class they asked for) is None where nothing classified them (no classifier, or captions)."""
    st, counts = output.stats, output.stats["counts"]
    correct = None if output.predictions is None else int((output.predictions == output.labels).sum())
    return {
        "batch": b, "images": len(output.labels), "wall_s": st["wall_time_s"],
        "drafter_forwards": st["drafter_forwards"],
        **{k: counts[k] for k in ("active_forwards", "tokens", "accepted", "drafted", "resampled")},
        "correct": correct, "time_s": st["time_breakdown_s"],
        "accept_hist": st["accepted_length_histogram"], "rank": rank, "peak_memory_mb": peak_memory_mb,
        "token_digests": [token_digest(t) for t in output.tokens],
    }


def _cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), None where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_description() -> str:
    """Architecture, CPU model (Linux: /proc/cpuinfo), torch threads and version: speed-ups between methods are
    measured in one process, but how they compare across runs depends on the CPU, so every run names it."""
    model = _cpu_model()
    return (f"{platform.machine()}{f' ({model})' if model else ''}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


@functools.lru_cache(maxsize=1)
def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version, read locally: NVML (pynvml) when importable, else ``nvidia-smi``; None when
    neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - not installed, no driver, no permission: try the next way
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
        lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        return lines[0] if lines else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_description(device: torch.device | str) -> dict:
    """What decoded: the device, its name (the GPU's, or the CPU model), the CUDA version PyTorch was built with
    and the NVIDIA driver's version (both None on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device": str(device), "device_name": torch.cuda.get_device_name(device),
                "cuda_version": torch.version.cuda, "driver_version": nvidia_driver_version()}
    return {"device": "cpu", "device_name": _cpu_model() or platform.processor() or platform.machine(),
            "cuda_version": None, "driver_version": None}


def _speed_references(settings: list[Setting], methods: dict[str, Method], records: dict) -> tuple[dict, dict]:
    """Every method is timed against the plain AR decoder of its own model family (Method.baseline: ar for the
    discrete models, car for the continuous ones), run with default parameters in this same process. Returns
    {baseline: label of its first default-parameter setting} and {baseline: its median latency per image}."""
    references, latency = {}, {}
    baselines = {type(m).baseline for m in methods.values()}
    for s in settings:
        if s.method in baselines and not s.params and s.method not in references:
            references[s.method] = s.label
            if records[s.label]:
                latency[s.method] = statistics.median(r["wall_s"] / r["images"] for r in records[s.label])
    return references, latency


# ---- quality ----------------------------------------------------------------------------------------------
def _features(pipe, images: torch.Tensor) -> torch.Tensor:
    """The classifier's features of images in [0, 1], computed on the classifier's device, returned on the CPU."""
    device = next(pipe.classifier.parameters()).device
    with torch.inference_mode():
        x = images * 2 - 1
        return torch.cat([pipe.classifier.features(x[i : i + 500].to(device)).float().cpu()
                          for i in range(0, len(x), 500)])


def reference_stats(pipe, cache_dir: Path, data_dir: str | None = None):
    """Classifier-feature statistics of the 10 000 Fashion-MNIST test images (cached per classifier weights)."""
    test = FashionMNIST.load("test", data_dir)
    h = hashlib.sha256()
    for t in pipe.classifier.state_dict().values():  # keyed by the weights, so a retrained classifier never reuses it
        h.update(t.detach().to(torch.float16).cpu().numpy().tobytes())
    return cached_reference(cache_dir / f"ref_classifier_{pipe.name}_{h.hexdigest()[:12]}.safetensors",
                            lambda: _features(pipe, (test.at(32) + 1) / 2))


def inception_reference(extract, cache_dir: Path, n: int, data_dir: str | None = None, progress: bool = False):
    """Inception-v3 statistics of the first ``n`` Fashion-MNIST test images at 32 px (computed once, cached)."""
    def compute():
        images = (FashionMNIST.load("test", data_dir).at(32)[:n] + 1) / 2
        chunks = range(0, n, 500)
        return torch.cat([extract(images[i : i + 500]) for i in tqdm(chunks, desc="inception reference",
                                                                     disable=not progress)])

    return cached_reference(cache_dir / f"ref_inception_fmnist-test-32px_{n}.safetensors", compute)


def real_floor(extract, ref, n: int, data_dir: str | None = None, cache: Path | None = None) -> float | None:
    """FID of n real training images against the test reference: the best any sampler can score at this n. With
    ``cache`` (a folder) the value is kept in a small JSON keyed by the reference statistics and n, so a resumed
    run does not recompute it (Inception features of 1000 images take minutes on 2 cores)."""
    if n < 2:
        return None
    path = None
    if cache is not None:
        key = hashlib.sha256(ref[0].double().numpy().tobytes()).hexdigest()[:12]
        path = Path(cache) / f"floor_{key}_{n}.json"
        if path.exists():
            try:
                return float(json.loads(path.read_text())["fid"])
            except (ValueError, KeyError, TypeError):
                pass  # unreadable: recompute and rewrite
    train = FashionMNIST.load("train", data_dir)
    fid = round(fid_from_features(extract((train.at(32)[:n] + 1) / 2), *ref[:2]), 4)
    if path is not None:
        atomic_write_json(path, {"fid": fid, "n": n})
    return fid


def _quality(space: str, feats: torch.Tensor | None, ref, labels: torch.Tensor) -> dict:
    """FID and KID of one setting's features in one feature space (None when fewer than 2 images). Image i asked
    for class ``labels[i]``: KID weighs the class-balanced sample as such (``kernel_distance``'s ``strata``), and
    is None while some class has fewer than 2 images (fewer than 20 in all for 10 classes), where no unbiased
    estimate exists."""
    if feats is None or len(feats) < 2:
        return {f"fid_{space}": None, f"kid_{space}": None}
    strata = labels[: len(feats)]
    kid = (round(kernel_distance(feats, ref[2], normalise=space == "classifier", strata=strata), 6)
           if stratified_kid_ok(strata) else None)
    return {f"fid_{space}": round(fid_from_features(feats, *ref[:2]), 4), f"kid_{space}": kid}


def _quality_due(done_rounds: int, total_rounds: int, final: bool, previous: int | None = None) -> bool:
    """Whether a write recomputes FID/KID: at the end and at every tenth of the run. Each FID needs the square root
    of a 2048 x 2048 covariance product (seconds on 2 cores per setting), so recomputing it after every round would
    cost more than the decoding it measures; the rows in between carry the last values (config: quality_round).
    ``previous``: the rounds done at the last write, when a write can follow several rounds (under torchrun, one
    per rank): due when a tenth was crossed since."""
    every = max(1, total_rounds // 10)
    if previous is None:
        return final or done_rounds % every == 0
    return final or done_rounds // every > previous // every


def _qualities(feats: dict, refs: dict, labels: torch.Tensor) -> dict:
    """FID/KID columns of one setting from its features per space; None in a space without reference statistics
    (not measured, or a set that is not Fashion-MNIST-like)."""
    out = {}
    for space in SPACES:
        out.update(_quality(space, feats.get(space), refs[space], labels) if space in refs
                   else {f"fid_{space}": None, f"kid_{space}": None})
    return out


def _extractors(pipe, cfg: BenchConfig) -> dict:
    """Feature extractor per space: the model set's classifier (where it has one), and Inception-v3 (on the
    pipeline's device) with ``cfg.inception``."""
    extractors = {}
    if pipe.classifier is not None:
        extractors["classifier"] = lambda images: _features(pipe, images)
    if cfg.inception:
        from mulosd.evaluation.inception import InceptionFeatures

        extractors["inception"] = InceptionFeatures(device=pipe_device(pipe))
    return extractors


def _tests_vs_reference(own: dict, base: dict, labels: torch.Tensor) -> dict:
    """Two-sample test of one setting against its family's reference setting (ar / car) per feature space:
    KID between the two sets and the permutation p-value that they come from one distribution (stratified by what
    image i of both sets asked for: its class, or its caption). None when there is no reference in the run, for the
    reference itself, or while the two sets differ in size; the KID alone is None while some class (caption) has
    fewer than 2 images (the p-value stays exact whatever the statistic)."""
    out = {}
    for space in SPACES:
        x, y = own.get(space), base.get(space)
        ok = x is not None and y is not None and len(x) == len(y) >= 2
        kid, p = (kid_permutation_test(x, y, strata=labels[: len(x)], num_permutations=PERMUTATIONS,
                                       normalise=space == "classifier") if ok else (None, None))
        biased = not (ok and stratified_kid_ok(labels[: len(x)]))
        out[f"kid_vs_reference_{space}"] = None if kid is None or biased else round(kid, 6)
        out[f"p_vs_reference_{space}"] = None if p is None else round(p, 4)
    return out


def _joined(feats: dict, label: str) -> dict:
    """One setting's features so far, per space (spaces without any left out)."""
    return {space: torch.cat(v[label]) for space, v in feats.items() if v[label]}


def _setting_quality(label: str, ref_label: str | None, feats: dict, refs: dict, labels: torch.Tensor) -> dict:
    """FID/KID of one setting against the test set, and its two-sample tests against its family's reference."""
    own = _joined(feats, label)
    base = _joined(feats, ref_label) if ref_label not in (None, label) else {}
    return {**_qualities(own, refs, labels), **_tests_vs_reference(own, base, labels)}


# ---- writing ----------------------------------------------------------------------------------------------
CSV_FIELDS = ["label", "method", "batch_size", "num_images", "latency_s_per_image", "speedup_vs_ar",
              "target_forwards_per_image", "drafter_forwards_per_image", "step_compression", "acceptance_rate",
              "resampled_per_image", "class_accuracy", "fid_classifier", "kid_classifier", "fid_inception",
              "kid_inception", "kid_vs_reference_classifier", "p_vs_reference_classifier",
              "kid_vs_reference_inception", "p_vs_reference_inception", "peak_memory_mb", "error"]


def _sum_lists(lists) -> list[int]:
    return functools.reduce(add_counts, lists, [])


def _speed_columns(records: list[dict], ar_latency: float | None) -> dict:
    """Latency, speed-up and work per image of one setting's batches (its row's columns before FID/KID)."""
    n = sum(r["images"] for r in records)
    lat = [r["wall_s"] / r["images"] for r in records]
    med = statistics.median(lat)
    q = statistics.quantiles(lat, n=10) if len(lat) >= 2 else [lat[0]] * 9
    total = lambda key: sum(r[key] for r in records)  # noqa: E731
    return {
        "latency_s_per_image": round(med, 5),
        "latency_mean_s": round(total("wall_s") / n, 5),
        "latency_p10_p90_s": [round(q[0], 5), round(q[-1], 5)],
        "speedup_vs_ar": round(ar_latency / med, 3) if ar_latency else None,
        "target_forwards_per_image": round(total("active_forwards") / n, 3),
        # drafter forwards are batched passes: each one serves every image of its batch
        "drafter_forwards_per_image": round(total("drafter_forwards") / len(records), 3),
        # tokens committed per target forward an image took part in (1.0 for AR)
        "step_compression": round(total("tokens") / max(1, total("active_forwards")), 4),
        "acceptance_rate": round(total("accepted") / total("drafted"), 4) if total("drafted") else None,
        "resampled_per_image": round(total("resampled") / n, 3),
        # None without a classifier (no batch was classified)
        "class_accuracy": (None if any(r["correct"] is None for r in records) else round(total("correct") / n, 4)),
        # the most device memory one measured batch allocated (CUDA; warm-up excluded); None on the CPU
        "peak_memory_mb": max((r["peak_memory_mb"] for r in records if r.get("peak_memory_mb") is not None),
                              default=None),
    }


def _phase_columns(records: list[dict]) -> dict:
    """Mean seconds per image per measured phase, and the summed accepted-length histogram."""
    n = sum(r["images"] for r in records)
    return {"time_breakdown_s": {k: round(sum(r["time_s"].get(k, 0.0) for r in records) / n, 5) for k in PHASES
                                 if any(k in r["time_s"] for r in records)},
            "accepted_length_histogram": _sum_lists(r.get("accept_hist", []) for r in records)}


def _aggregate(setting: Setting, method: Method, records: list[dict], quality: dict, ar_latency,
               cfg: BenchConfig, error: str | None) -> dict:
    """One row of results.json: the setting, then (once it has records) speed, quality and phase columns."""
    row = {"label": setting.label, "method": setting.method, "params": {**type(method).defaults, **setting.params},
           "exact": bool(method.exact),  # the built method knows (mulo is exact with acceptance=exact)
           "batch_size": cfg.batch_size, "num_images": sum(r["images"] for r in records), "error": error}
    if records:
        row.update({**_speed_columns(records, ar_latency), **quality, **_phase_columns(records)})
    return row


def step_compression(row: dict) -> float:
    """A row's tokens per target forward; results.json files written before the duplicate name was dropped also
    carry it as ``mean_accepted_length`` (the same number), which older files may have alone."""
    return row["step_compression"] if "step_compression" in row else row["mean_accepted_length"]


NA = "n/a"  # a cell whose metric does not exist for the model set (see ``na_reason``)


def na_reason(config: dict) -> str | None:
    """Why a run's classifier and test-set columns are "n/a" in results.md (one line under the table), None where
    they apply. Runs written before sets without a classifier were benched have no ``classifier`` key: they had one."""
    if config.get("classifier", True):
        return None
    return (f"n/a: model set {config['model']} has no classifier: no class accuracy, no classifier-space FID, KID "
            f"or p-value, and no FID/KID against the Fashion-MNIST test split (its images are not Fashion-MNIST-like); "
            f"with --inception, the Inception p-value tests each setting against its family's reference (ar / car).")


def _p_cell(row: dict, classifier: bool = True) -> str:
    """The two-sample p-values against the reference setting, '-' where not computed (1000 re-splits: the
    smallest p is 1/1001, shown as 0.001), "n/a" in the classifier space of a set without a classifier."""
    ps = [row.get(f"p_vs_reference_{space}") for space in SPACES]
    if classifier and all(p is None for p in ps):
        return "-"
    cells = ["-" if p is None else f"{p:.3f}" for p in ps]
    return " / ".join([cells[0] if classifier else NA, *cells[1:]])


def measured_phases(rows: list[dict]) -> list[str]:
    """The phases (in PHASES order) that some row's time breakdown measured: the table's and the plot's columns."""
    return [k for k in PHASES if any(k in (r.get("time_breakdown_s") or {}) for r in rows)]


def _markdown_row(r: dict, phases: list[str], show_kid: bool, classifier: bool = True) -> str:
    """One setting's line of the table; without a classifier its class accuracy and classifier / test-set
    columns are "n/a"."""
    if r.get("error") and "latency_s_per_image" not in r:
        return f"| `{r['label']}` | error: {r['error'].strip().splitlines()[-1]} ||||||||||||"
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    q = f if classifier else lambda v, fmt: NA  # noqa: E731 - the columns that need a classifier (or its reference)
    tb = r.get("time_breakdown_s") or {}
    times = " / ".join(f(tb.get(k), ".3f") for k in phases) if tb else "-"
    return (f"| `{r['label']}` | {f(r['speedup_vs_ar'], '.2f')}x | {r['latency_s_per_image']:.3f} "
            f"({r['latency_p10_p90_s'][0]:.3f}-{r['latency_p10_p90_s'][1]:.3f}) | {r['target_forwards_per_image']:.1f} | "
            f"{step_compression(r):.2f}x | {f(r['acceptance_rate'], '.3f')} | {f(r['resampled_per_image'], '.1f')} | "
            f"{q(r['class_accuracy'], '.3f')} | {q(r['fid_classifier'], '.2f')} | "
            f"{q(None if r.get('kid_classifier') is None or not show_kid else 1000 * r['kid_classifier'], '.2f')} | "
            f"{q(r.get('fid_inception'), '.2f')} | {_p_cell(r, classifier)} | {times} |")


def markdown_table(rows: list[dict], show_kid: bool = True, na: str | None = None) -> str:
    """The Markdown table of results.md; its time column lists the phases that some row measured, in PHASES order.
    ``show_kid=False`` leaves the KID cells empty ("-"), for runs whose results.json predates the class-stratified
    KID estimator (no ``config.kid_strata``): their stored KID is biased low, by more the smaller the run. ``na``
    (``na_reason``: a set without a classifier) shows the class accuracy, classifier and test-set columns as "n/a"
    and adds itself as a line under the table."""
    phases = measured_phases(rows)
    lines = ["| setting | speedup vs AR | latency s/img (p10-p90) | target fwd/img | step compression | accept rate | "
             "resampled/img | class acc | FID (classifier) | KID x1000 (classifier) | FID (Inception) | "
             "p same as ref (classifier / Inception) | "
             f"time: {' / '.join(phases) or 'per phase'} (s/img) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_markdown_row(r, phases, show_kid, classifier=na is None) for r in rows]
    return "\n".join(lines + ([f"\n{na}"] if na else [])) + "\n"


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return buf.getvalue()


def _write_results(out: Path, result: dict) -> None:
    """results.json, results.csv and results.md, each written atomically."""
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.csv", _csv_text(result["methods"]))
    atomic_write_text(out / "results.md", markdown_table(result["methods"], na=na_reason(result["config"])))


def _save_state(out: Path, config: dict, records: dict, errors: dict, done_rounds: int, feats: dict,
                samples: dict) -> None:
    """What --resume reads: the raw records (state.json), and every setting's features so far with its sample
    images and their image indices (state.safetensors; the images as decoded, so a resumed grid is the same)."""
    atomic_write_json(out / "state.json", {"config": config, "records": records, "errors": errors,
                                           "done_rounds": done_rounds})
    tensors = {f"{space}/{k}": torch.cat(v).contiguous() for space, d in feats.items() for k, v in d.items() if v}
    for label, (images, index) in samples.items():
        tensors[f"samples/{label}"], tensors[f"samples_index/{label}"] = images.contiguous(), index.contiguous()
    atomic_write(out / "state.safetensors", lambda tmp: save_file(tensors, tmp))


GRID_TILE = 96  # sample grids scale small images up to about this many pixels (fmnist-32: 3x); large ones stay 1x


def _save_sample_grid(out: Path, label: str, images: torch.Tensor, asked: torch.Tensor, names) -> None:
    """samples/<label>.png: ``images`` in rows by ``asked`` (the class or caption each image asked for, named by
    ``names``)."""
    from mulosd.evaluation.grids import image_grid

    grid = image_grid(images, asked, names, scale=max(1, GRID_TILE // images.shape[-1]))
    safe = "".join(ch if ch.isalnum() or ch in "-_=.," else "_" for ch in label)
    atomic_write(out / "samples" / f"{safe}.png", lambda tmp: grid.save(tmp, format="PNG"))


# ---- the run ----------------------------------------------------------------------------------------------
class _BenchRun:
    """The state of one ``run_bench`` call: the built methods, the raw per-batch records and image features per
    setting, the settings that failed, the finished rounds, and the FID/KID columns as last computed. Under
    torchrun every rank holds one; the records, features and grids are rank 0's (``absorb``), the others keep
    only what decides their work (the finished rounds and the failed settings, broadcast from rank 0)."""

    def __init__(self, pipe, settings: list[Setting], cfg: BenchConfig, out: Path, save_samples: bool, plots: bool,
                 ctx: Context | None = None, captions: BenchCaptions | None = None):
        self.pipe, self.settings, self.cfg, self.out = pipe, settings, cfg, out
        self.save_samples, self.plots = save_samples, plots
        self.ctx = ctx or Context()
        self.device = pipe_device(pipe)
        self.captions = captions
        self.methods = _build_methods(pipe, settings)
        self.config = _run_config(pipe, settings, cfg, captions)
        self.extractors = _extractors(pipe, cfg)
        self.records: dict[str, list[dict]] = {s.label: [] for s in settings}
        self.feats = {space: {s.label: [] for s in settings} for space in self.extractors}
        self.errors: dict[str, str] = {}
        self.done_rounds = 0
        self.previous_rounds = 0  # the rounds done at the write before: when a tenth of the run was crossed
        self.labels = _condition_ids(pipe, captions, cfg.num_images)  # image i: class i mod C, or caption i mod P
        self.names = captions.names if captions is not None else pipe.class_names  # the sample grids' row names
        self.batches = _batches(cfg)
        # label -> (its first SAMPLE_IMAGES images so far, their image indices): the grid, kept in the state
        self.samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.no_grid: set[str] = set()  # resumed from a state without a setting's samples: its old grid stays
        self.quality: dict[str, dict] = {}  # label -> FID/KID columns as last computed
        self.quality_round = 0  # the round at which they were
        self.machine = machine_description()  # read once: every write of this process names the same CPU
        self.hardware = {**device_description(self.device), "dtype": dtype_name(pipe_dtype(pipe)),
                         "world_size": self.ctx.world_size}
        self.refs: dict = {}
        self.floors: dict = {}

    def open(self, resume: bool, force: bool) -> None:
        """Read a resumed run's state (checked against this run's config), then create --out (and with ``force``
        delete bench's files in it): nothing is created or deleted before every check has passed. Rank 0 does
        it; every rank learns the finished rounds and failed settings (or rank 0's refusal)."""
        self.done_rounds, self.errors = self.ctx.on_main(lambda: self._open(resume, force))

    def _open(self, resume: bool, force: bool) -> tuple[int, dict]:
        saved = _load_state(self.out, self.config, self.settings, self.extractors) if resume else None
        check_writable(self.out / "results.json")  # creates --out: only once everything else is known to be valid
        if force:
            _clear_run(self.out)
        if saved is not None:
            self.records, self.errors, self.done_rounds = saved.records, saved.errors, saved.done_rounds
            if saved.feats is not None:
                self.feats = saved.feats
            self.samples = saved.samples
            if self.done_rounds:  # a state written before samples were kept: complete grids cannot be rebuilt
                self.no_grid = {s.label for s in self.settings} - set(self.samples)
        return self.done_rounds, self.errors

    def conditions(self, lo: int, hi: int) -> torch.Tensor | Captions:
        """What images [lo, hi) are decoded from: their class ids, or their captions."""
        if self.captions is None:
            return self.labels[lo:hi]
        return self.captions.captions[self.labels[lo:hi]]

    def load_references(self, data_dir: str | None, progress: bool) -> None:
        """Test-set statistics per feature space (cached) and the real-vs-real FID floor at this N; none for a set
        whose images are not Fashion-MNIST-like (``_fmnist_like``)."""
        if not _fmnist_like(self.pipe):
            return
        self.refs = {"classifier": reference_stats(self.pipe, cache_dir(), data_dir)}
        if self.cfg.inception:
            self.refs["inception"] = inception_reference(self.extractors["inception"], cache_dir(),
                                                         self.cfg.reference_images, data_dir, progress)
        self.floors = {space: real_floor(extract, self.refs[space], self.cfg.num_images, data_dir, cache_dir())
                       for space, extract in self.extractors.items()}

    def warm_up(self) -> None:
        """One uncounted batch per setting, decoded by the same method object as the measured ones (on every rank);
        a setting whose warm-up fails on some rank is failed on all."""
        hi = min(self.cfg.batch_size, self.cfg.num_images)
        for s in self.settings:
            if s.label in self.errors:
                continue
            try:
                _decode(self.pipe, self.methods[s.label], self.conditions(0, hi), 0,
                        self.cfg.seed + WARMUP_SEED_OFFSET, self.cfg, classify=False)
            except Exception:  # noqa: BLE001 - reported in the row, the other settings go on
                self.errors[s.label] = traceback.format_exc(limit=3)
        if self.ctx.distributed:
            parts = self.ctx.gather(self.errors)
            if self.ctx.main:
                for part in parts:
                    for label, error in part.items():
                        self.errors.setdefault(label, error)
            self.errors = self.ctx.broadcast(self.errors)

    def measure(self, s: Setting, b: int) -> dict:
        """Decode batch b with setting s on this rank: its record, features and sample images, or its error, as
        an item for ``absorb`` (on rank 0)."""
        lo, hi = self.batches[b]
        item = {"label": s.label, "batch": b, "error": None}
        cuda = self.device.type == "cuda"
        try:
            if cuda:  # this batch's own peak: every setting's models stay loaded, the others' caches are freed
                torch.cuda.reset_peak_memory_stats(self.device)
            output = _decode(self.pipe, self.methods[s.label], self.conditions(lo, hi), lo, self.cfg.seed, self.cfg)
            peak = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if cuda else None
            item["feats"] = {space: extract(output.images) for space, extract in self.extractors.items()}
        except Exception:  # noqa: BLE001 - reported in the row, the other settings go on
            return {**item, "error": traceback.format_exc(limit=3), "feats": None}
        item["record"] = _record(b, output, self.ctx.rank, peak)
        if self.save_samples and lo < SAMPLE_IMAGES:
            n = min(hi, SAMPLE_IMAGES) - lo
            item["samples"] = (output.images[:n].cpu(), torch.arange(lo, lo + n))
        return item

    def decode_round(self, b: int, bar) -> list[dict]:
        """Batch b with every setting that has not failed, in the round's rotated order."""
        items = []
        for s in _round_order(self.settings, b):
            bar.update(1)
            if s.label not in self.errors:
                items.append(self.measure(s, b))
        return items

    def absorb(self, item: dict) -> None:
        """Keep one measured item (rank 0; items arrive in round order): its record and features, its sample
        images (and the grid redrawn), or its error. Items of a setting after the batch it failed at are dropped,
        as one process would never have decoded them."""
        label = item["label"]
        if label in self.errors:
            return
        if item["error"] is not None:
            self.errors[label] = item["error"]
            return
        self.records[label].append(item["record"])
        for space, feats in item["feats"].items():
            self.feats[space][label].append(feats)
        if "samples" in item and label not in self.no_grid:
            new, new_index = item["samples"]
            images, index = self.samples.get(label, (new[:0], torch.zeros(0, dtype=torch.long)))
            images = torch.cat([images, new.to(images.dtype)])
            index = torch.cat([index, new_index])
            self.samples[label] = images, index
            _save_sample_grid(self.out, label, images, self.labels[index], self.names)

    def run_rounds(self, progress: bool) -> dict | None:
        """Every round not yet done, each followed by a write; the last write is final. Under torchrun the ranks
        decode W rounds at a time (round b on rank b mod W) and rank 0 writes after each such step. Returns
        results.json's dict on rank 0, None on the others."""
        n, total, ctx = len(self.settings), len(self.batches), self.ctx
        bar = tqdm(total=total * n, initial=self.done_rounds * n, desc="bench", disable=not (progress and ctx.main))
        result = None
        while self.done_rounds < total:
            start = self.done_rounds
            b = start + ctx.rank
            parts = ctx.gather(self.decode_round(b, bar) if b < total else [])
            self.done_rounds = min(start + ctx.world_size, total)
            if ctx.main:
                for item in sorted((i for part in parts for i in part), key=lambda i: i["batch"]):  # stable
                    self.absorb(item)
                bar.update(self.done_rounds * n - bar.n)
                result = self.write(final=self.done_rounds == total)
                self.previous_rounds = self.done_rounds
            if ctx.distributed:
                self.errors = ctx.broadcast(self.errors)
        bar.close()
        if not ctx.main:
            return None
        return result if result is not None else self.write(final=True)

    def due(self, final: bool) -> bool:
        return _quality_due(self.done_rounds, len(self.batches), final, self.previous_rounds)

    def rows(self, final: bool, references: dict, ref_latency: dict) -> list[dict]:
        """The results rows; FID/KID recomputed where due (``_quality_due``), else carried from the last time."""
        rows = []
        for s in self.settings:
            method = self.methods[s.label]
            if s.label not in self.quality or self.due(final):
                self.quality[s.label] = _setting_quality(s.label, references.get(type(method).baseline), self.feats,
                                                         self.refs, self.labels)
                self.quality_round = self.done_rounds
            rows.append(_aggregate(s, method, self.records[s.label], self.quality[s.label],
                                   ref_latency.get(type(method).baseline), self.cfg, self.errors.get(s.label)))
        return rows

    def result(self, rows: list[dict], final: bool, references: dict) -> dict:
        """results.json: the run's config with its conditions, progress, machine, device and FID floors (None for
        a set that is not Fashion-MNIST-like), whether the set has a classifier (``na_reason``), and the rows."""
        kind = "caption" if self.captions is not None else "class"
        return {"config": {**self.config, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": self.machine,
                           **self.hardware,
                           "conditions": _conditions_record(self.pipe, self.captions, self.cfg.num_images),
                           "classifier": self.pipe.classifier is not None,
                           "rounds_done": self.done_rounds, "rounds_total": len(self.batches), "complete": final,
                           "quality_round": self.quality_round, "kid_strata": KID_STRATA[kind],
                           "fid_classifier_real_floor": self.floors.get("classifier"),
                           "fid_inception_real_floor": self.floors.get("inception"),
                           "speedup_reference": references.get("ar"), "speedup_references": references},
                "methods": rows}

    def write(self, final: bool) -> dict:
        """Results, state and (at the quality cadence: plots show FID) plots, all written atomically."""
        references, ref_latency = _speed_references(self.settings, self.methods, self.records)
        due = self.due(final)
        result = self.result(self.rows(final, references, ref_latency), final, references)
        _write_results(self.out, result)
        _save_state(self.out, self.config, self.records, self.errors, self.done_rounds, self.feats, self.samples)
        if self.plots and due:  # plotting every round would cost
            _write_plots(result, self.out)
        return result


def _write_plots(result: dict, out: Path) -> None:
    """plots/: the frontier (speed-up against FID) where some setting has an FID, the accepted lengths and the time
    per phase always. A set without a classifier has no FID (no reference for its images): an empty frontier
    would only mislead."""
    from mulosd.evaluation import plots

    if any(r.get(f"fid_{space}") is not None for r in result["methods"] for space in SPACES):
        plots.write_plots(result, out)
        return
    plots.accepted_length_plot(result, out / "plots" / "accepted_length.png")
    plots.time_breakdown_plot(result, out / "plots" / "time_breakdown.png")


def run_bench(pipe, settings: list[Setting], cfg: BenchConfig, out_dir: str | Path, resume: bool = False,
              progress: bool = True, data_dir: str | None = None, save_samples: bool = True, plots: bool = True,
              force: bool = False, captions: BenchCaptions | None = None) -> dict | None:
    """Run (or with ``resume`` continue) a bench of ``settings`` into ``out_dir``; returns results.json's dict.
    An ``out_dir`` that holds files is refused unless ``resume`` (a run of the same config) or ``force`` (bench's
    own files in it are deleted first; other files stay); the two together are refused. Every refusal comes
    before ``out_dir`` is created or anything in it changes.

    A class-conditional set decodes image i from class i mod C; a text-to-image set needs ``captions``
    (``bench_captions``: image i gets caption i mod P), which a class-conditional set refuses. A set without a
    classifier is benched for speed, and with ``cfg.inception`` for each setting's two-sample test against its
    reference in Inception space; its classifier and test-set columns are None.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: the rounds are shared out (round b on rank b mod W),
    rank 0 alone reads and writes ``out_dir`` and returns the dict; the other ranks return None. A job with more
    processes than rounds is refused."""
    cfg.validate()
    _check_conditions(pipe, captions)
    rounds = len(_batches(cfg))
    dist_context().check_world(rounds, f"batch{'es' if rounds > 1 else ''} ({cfg.num_images} images at batch size "
                               f"{cfg.batch_size}); every process decodes whole batches",
                               "; a smaller --batch-size or more --num-images gives more batches")
    ctx = init(pipe_device(pipe))
    ctx.on_main(lambda: _check_out(Path(out_dir), resume, force))  # before the methods are built (a while)
    run = _BenchRun(pipe, settings, cfg, Path(out_dir), save_samples, plots, ctx, captions)
    run.open(resume, force)
    if ctx.main:
        run.load_references(data_dir, progress)
    if cfg.warmup and run.done_rounds < len(run.batches):
        run.warm_up()
    return run.run_rounds(progress)
