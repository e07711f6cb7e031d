"""``mulosd bench``: speed and quality of decoding methods side by side, in one process.

Every setting (a method plus parameters; sweeps expand into one setting per point) decodes the same images:
image i has class i mod 10 and random stream (seed, i). Batches are interleaved: round b decodes batch b with
every setting, in an order rotated each round, so slow drift of the machine hits all settings alike. After
every round the raw per-batch records (and the classifier features of the images) are written atomically to
``state.json`` / ``state.safetensors`` in the output directory, together with the aggregated
``results.json``, ``results.csv`` and ``results.md``; ``resume=True`` continues after the last finished round.
A setting that raises is reported in its row (``error``) and skipped in later rounds; the others go on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import platform
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mulosd.data import FashionMNIST
from mulosd.decoding.methods import get_method
from mulosd.decoding.sampling import SamplingConfig
from mulosd.errors import MulosdError
from mulosd.evaluation.fid import (cached_reference, fid_from_features, kernel_distance, kid_permutation_test,
                                   stratified_kid_ok)
from mulosd.io import atomic_write, cache_dir, atomic_write_json, atomic_write_text, check_writable

PHASES = ("drafting", "upsampling", "verification", "resampling", "downsampling", "prefill")


@dataclass
class Setting:
    label: str
    method: str
    params: dict = field(default_factory=dict)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _label(name: str, params: dict) -> str:
    return name + ("" if not params else "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]")


def parse_settings(methods: str, sweeps: tuple[str, ...] = (), params: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> list[Setting]:
    """``methods`` "ar,sd,mulo"; ``sweeps`` like "mulo.tau=0.05,0.1" (several for one method give the product);
    ``params`` like "mulo.k=16" (fixed); ``extra`` single settings like "mulo:upsampler=pixel,resampling=serial"
    appended as they are. Every method is checked to exist and every key to be a parameter of it."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names and not extra:
        raise MulosdError("--methods is empty; name at least one method (see `mulosd methods`)")
    if len(set(names)) != len(names):
        raise MulosdError(f"--methods names a method twice: {methods!r}")
    fixed: dict[str, dict] = {n: {} for n in names}
    grid: dict[str, dict[str, list]] = {n: {} for n in names}
    for kind, items in (("--param", params), ("--sweep", sweeps)):
        for item in items:
            head, eq, values = item.partition("=")
            method, dot, key = head.partition(".")
            if not eq or not dot or not key or not values:
                raise MulosdError(f"{kind} {item!r} must look like METHOD.KEY=VALUE{'[,VALUE...]' if kind == '--sweep' else ''}")
            if method not in names:
                raise MulosdError(f"{kind} {item!r} is for method {method!r}, which is not in --methods ({', '.join(names)})")
            cls = get_method(method)
            if key not in cls.defaults:
                raise MulosdError(f"{kind} {item!r}: method {method!r} has no parameter {key!r}; "
                                  f"allowed: {', '.join(sorted(cls.defaults)) or 'none'}")
            if kind == "--param":
                fixed[method][key] = _parse_value(values)
            else:
                grid[method][key] = [_parse_value(v) for v in values.split(",")]
    settings = []
    for name in names:
        get_method(name)
        keys = list(grid[name])
        for combo in itertools.product(*(grid[name][k] for k in keys)):
            point = dict(zip(keys, combo))
            p = {**fixed[name], **point}
            settings.append(Setting(_label(name, p), name, p))
    for item in extra:
        method, _, rest = item.partition(":")
        cls = get_method(method.strip())
        p = {}
        for kv in filter(None, rest.split(",")):
            key, eq, value = kv.partition("=")
            if not eq:
                raise MulosdError(f"--setting {item!r} must look like METHOD:KEY=VALUE[,KEY=VALUE...]")
            if key not in cls.defaults:
                raise MulosdError(f"--setting {item!r}: method {method!r} has no parameter {key!r}; "
                                  f"allowed: {', '.join(sorted(cls.defaults)) or 'none'}")
            p[key] = _parse_value(value)
        settings.append(Setting(_label(method.strip(), p), method.strip(), p))
    labels = [x.label for x in settings]
    if len(set(labels)) != len(labels):
        raise MulosdError(f"the same setting appears twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    return settings


@dataclass
class BenchConfig:
    num_images: int = 100
    batch_size: int = 1
    seed: int = 0
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    warmup: bool = True
    inception: bool = False  # also FID with the standard Inception-v3 (about 0.13 s per image on 2 cores)
    reference_images: int = 10000  # test-split images behind the Inception reference statistics

    def validate(self) -> None:
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise MulosdError(f"--num-images must be an integer >= 1, got {self.num_images!r}")
        if self.batch_size < 1:
            raise MulosdError(f"--batch-size must be >= 1, got {self.batch_size}")
        SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if not isinstance(self.reference_images, int) or not 2 <= self.reference_images <= 10000:
            raise MulosdError(f"--reference-images must be an integer in [2, 10000] (the test split), "
                              f"got {self.reference_images!r}")
        if self.inception:
            from mulosd.evaluation.inception import inception_path

            inception_path()  # missing weights: say how to install them before any work starts


def _features(pipe, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        x = images * 2 - 1
        return torch.cat([pipe.classifier.features(x[i : i + 500]) for i in range(0, len(x), 500)]).float()


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
    is None while some class has fewer than 2 images (fewer than 20 in all), where no unbiased estimate exists."""
    if feats is None or len(feats) < 2:
        return {f"fid_{space}": None, f"kid_{space}": None}
    strata = labels[: len(feats)]
    kid = (round(kernel_distance(feats, ref[2], normalise=space == "classifier", strata=strata), 6)
           if stratified_kid_ok(strata) else None)
    return {f"fid_{space}": round(fid_from_features(feats, *ref[:2]), 4), f"kid_{space}": kid}


def machine_description() -> str:
    """Architecture, CPU model (Linux: /proc/cpuinfo), torch threads and version: speed-ups between methods are
    measured in one process, but how they compare across runs depends on the CPU, so every run names it."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = f" ({line.split(':', 1)[1].strip()})"
                break
    except OSError:
        pass
    return f"{platform.machine()}{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _quality_due(done_rounds: int, total_rounds: int, final: bool) -> bool:
    """Whether a write recomputes FID/KID: at the end and at every tenth of the run. Each FID needs the square root
    of a 2048 x 2048 covariance product (seconds on 2 cores per setting), so recomputing it after every round would
    cost more than the decoding it measures; the rows in between carry the last values (config: quality_round)."""
    return final or done_rounds % max(1, total_rounds // 10) == 0


def _qualities(feats: dict, refs: dict, labels: torch.Tensor) -> dict:
    """FID/KID columns of one setting from its features per space."""
    return {**_quality("classifier", feats.get("classifier"), refs["classifier"], labels),
            **(_quality("inception", feats.get("inception"), refs["inception"], labels) if "inception" in refs
               else {"fid_inception": None, "kid_inception": None})}


SPACES = ("classifier", "inception")
# KID (against the test set, and between a setting and its reference) weighs each setting's images as the
# class-balanced sample they are: image i asks for class i mod 10 (fid._pair_weights). Recorded in results.json's
# config; runs written before it carry an i.i.d.-weighted KID, biased low, that the doc tables do not show.
KID_STRATA = "requested class"
PERMUTATIONS = 1000


def _tests_vs_reference(own: dict, base: dict, labels: torch.Tensor) -> dict:
    """Two-sample test of one setting against its family's reference setting (ar / car) per feature space:
    KID between the two sets and the permutation p-value that they come from one distribution (class-stratified:
    image i of both sets asked for class i mod 10). None when there is no reference in the run, for the reference
    itself, or while the two sets differ in size; the KID alone is None while some class has fewer than 2 images
    (the p-value stays exact whatever the statistic)."""
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


def _aggregate(setting: Setting, method_cls, records: list[dict], quality: dict, ar_latency,
               cfg: BenchConfig, error: str | None) -> dict:
    row = {"label": setting.label, "method": setting.method, "params": {**method_cls.defaults, **setting.params},
           "exact": bool(setting.params.get("acceptance") == "exact") or method_cls.exact,
           "batch_size": cfg.batch_size, "num_images": sum(r["images"] for r in records), "error": error}
    if not records:
        return row
    n = row["num_images"]
    lat = [r["wall_s"] / r["images"] for r in records]
    med = statistics.median(lat)
    q = statistics.quantiles(lat, n=10) if len(lat) >= 2 else [lat[0]] * 9
    row.update({
        "latency_s_per_image": round(med, 5),
        "latency_mean_s": round(sum(r["wall_s"] for r in records) / n, 5),
        "latency_p10_p90_s": [round(q[0], 5), round(q[-1], 5)],
        "speedup_vs_ar": round(ar_latency / med, 3) if ar_latency else None,
        "target_forwards_per_image": round(sum(r["active_forwards"] for r in records) / n, 3),
        # drafter forwards are batched passes: each one serves every image of its batch
        "drafter_forwards_per_image": round(sum(r["drafter_forwards"] for r in records) / len(records), 3),
        "step_compression": round(sum(r["tokens"] for r in records) / max(1, sum(r["active_forwards"] for r in records)), 4),
        "mean_accepted_length": round(sum(r["tokens"] for r in records) / max(1, sum(r["active_forwards"] for r in records)), 4),
        "acceptance_rate": (round(sum(r["accepted"] for r in records) / sum(r["drafted"] for r in records), 4)
                            if sum(r["drafted"] for r in records) else None),
        "resampled_per_image": round(sum(r["resampled"] for r in records) / n, 3),
        "class_accuracy": round(sum(r["correct"] for r in records) / n, 4),
        **quality,
        "time_breakdown_s": {k: round(sum(r["time_s"].get(k, 0.0) for r in records) / n, 5) for k in PHASES
                             if any(k in r["time_s"] for r in records)},
        "accepted_length_histogram": _sum_lists(r.get("accept_hist", []) for r in records),
    })
    return row


def _sum_lists(lists) -> list[int]:
    total: list[int] = []
    for lst in lists:
        total.extend([0] * (len(lst) - len(total)))
        for i, v in enumerate(lst):
            total[i] += v
    return total


CSV_FIELDS = ["label", "method", "batch_size", "num_images", "latency_s_per_image", "speedup_vs_ar",
              "target_forwards_per_image", "drafter_forwards_per_image", "step_compression", "mean_accepted_length",
              "acceptance_rate", "resampled_per_image", "class_accuracy", "fid_classifier", "kid_classifier",
              "fid_inception", "kid_inception", "kid_vs_reference_classifier", "p_vs_reference_classifier",
              "kid_vs_reference_inception", "p_vs_reference_inception", "error"]


def _p_cell(row: dict) -> str:
    """The two-sample p-values against the reference setting, '-' where not computed (1000 re-splits: the
    smallest p is 1/1001, shown as 0.001)."""
    ps = [row.get(f"p_vs_reference_{space}") for space in SPACES]
    if all(p is None for p in ps):
        return "-"
    return " / ".join("-" if p is None else f"{p:.3f}" for p in ps)


def measured_phases(rows: list[dict]) -> list[str]:
    """The phases (in PHASES order) that some row's time breakdown measured: the table's and the plot's columns."""
    return [k for k in PHASES if any(k in (r.get("time_breakdown_s") or {}) for r in rows)]


def markdown_table(rows: list[dict], show_kid: bool = True) -> str:
    """The Markdown table of results.md; its time column lists the phases that some row measured, in PHASES order.
    ``show_kid=False`` leaves the KID cells empty ("-"), for runs whose results.json predates the class-stratified
    KID estimator (no ``config.kid_strata``): their stored KID is biased low, by more the smaller the run."""
    phases = measured_phases(rows)
    lines = ["| setting | speedup vs AR | latency s/img (p10-p90) | target fwd/img | step compression | accept rate | "
             "resampled/img | class acc | FID (classifier) | KID x1000 (classifier) | FID (Inception) | "
             "p same as ref (classifier / Inception) | "
             f"time: {' / '.join(phases) or 'per phase'} (s/img) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error") and "latency_s_per_image" not in r:
            lines.append(f"| `{r['label']}` | error: {r['error'].strip().splitlines()[-1]} ||||||||||||")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        tb = r.get("time_breakdown_s") or {}
        times = " / ".join(f(tb.get(k), ".3f") for k in phases) if tb else "-"
        lines.append(
            f"| `{r['label']}` | {f(r['speedup_vs_ar'], '.2f')}x | {r['latency_s_per_image']:.3f} "
            f"({r['latency_p10_p90_s'][0]:.3f}-{r['latency_p10_p90_s'][1]:.3f}) | {r['target_forwards_per_image']:.1f} | "
            f"{r['step_compression']:.2f}x | {f(r['acceptance_rate'], '.3f')} | {f(r['resampled_per_image'], '.1f')} | "
            f"{r['class_accuracy']:.3f} | {f(r['fid_classifier'], '.2f')} | "
            f"{f(None if r.get('kid_classifier') is None or not show_kid else 1000 * r['kid_classifier'], '.2f')} | "
            f"{f(r.get('fid_inception'), '.2f')} | {_p_cell(r)} | {times} |")
    return "\n".join(lines) + "\n"


SAMPLE_IMAGES = 20  # the first images of every setting go into samples/<setting>.png


def _save_sample_grid(pipe, out: Path, label: str, images: torch.Tensor, labels_all: torch.Tensor) -> None:
    from mulosd.evaluation.grids import image_grid

    grid = image_grid(images, labels_all[: len(images)], pipe.class_names)
    safe = "".join(ch if ch.isalnum() or ch in "-_=.," else "_" for ch in label)
    atomic_write(out / "samples" / f"{safe}.png", lambda tmp: grid.save(tmp, format="PNG"))


def run_bench(pipe, settings: list[Setting], cfg: BenchConfig, out_dir: str | Path, resume: bool = False,
              progress: bool = True, data_dir: str | None = None, save_samples: bool = True, plots: bool = True) -> dict:
    cfg.validate()
    out = Path(out_dir)
    if pipe.classifier is None:
        raise MulosdError(f"model set {pipe.name} has no classifier; bench needs it for class accuracy and FID")
    methods = {}
    for s in settings:  # every setting is built (and so validated) before any work starts
        methods[s.label] = get_method(s.method)(pipe, **s.params)
    check_writable(out / "results.json")  # creates --out: only once every setting is known to be valid
    sampling = SamplingConfig(cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    config = {"model": pipe.name, "num_images": cfg.num_images, "batch_size": cfg.batch_size, "seed": cfg.seed,
              "sampling": vars(sampling), "settings": [[s.label, s.method, s.params] for s in settings],
              "inception": cfg.inception, **({"reference_images": cfg.reference_images} if cfg.inception else {})}
    state_path, feats_path = out / "state.json", out / "state.safetensors"
    records = {s.label: [] for s in settings}
    extractors = {"classifier": lambda images: _features(pipe, images)}
    if cfg.inception:
        from mulosd.evaluation.inception import InceptionFeatures

        extractors["inception"] = InceptionFeatures()
    feats = {space: {s.label: [] for s in settings} for space in extractors}
    errors: dict[str, str] = {}
    done_rounds = 0
    if resume:
        if not state_path.exists():
            raise MulosdError(f"--resume: no state.json in {out}; start without --resume")
        state = json.loads(state_path.read_text())
        if state["config"] != json.loads(json.dumps(config)):
            raise MulosdError(f"--resume: {out} holds a run with other settings; use another --out or the same options")
        records, errors, done_rounds = state["records"], state["errors"], state["done_rounds"]
        if feats_path.exists():
            saved = load_file(str(feats_path))
            feats = {space: {s.label: [saved[f"{space}/{s.label}"]] if f"{space}/{s.label}" in saved else []
                             for s in settings} for space in extractors}
    refs = {"classifier": reference_stats(pipe, cache_dir(), data_dir)}
    if cfg.inception:
        refs["inception"] = inception_reference(extractors["inception"], cache_dir(), cfg.reference_images, data_dir,
                                                progress)
    floors = {space: real_floor(extractors[space], refs[space], cfg.num_images, data_dir, cache_dir())
              for space in extractors}
    labels_all = torch.arange(cfg.num_images) % len(pipe.class_names)
    batches = [(b, min(b + cfg.batch_size, cfg.num_images)) for b in range(0, cfg.num_images, cfg.batch_size)]
    samples: dict[str, torch.Tensor] = {}

    def run(label, lo, hi, seed):
        s = next(x for x in settings if x.label == label)
        return pipe(labels_all[lo:hi].tolist(), num_per_class=1, method=s.method, seed=seed, batch_size=cfg.batch_size,
                    cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    first_index=lo, **s.params)

    if cfg.warmup and done_rounds < len(batches):
        for s in settings:
            if s.label not in errors:
                try:
                    run(s.label, 0, min(cfg.batch_size, cfg.num_images), cfg.seed + 7919)
                except Exception:  # noqa: BLE001 - reported in the row, the other settings go on
                    errors[s.label] = traceback.format_exc(limit=3)

    quality: dict[str, dict] = {}  # label -> FID/KID columns as last computed
    quality_round = 0  # the round at which they were
    machine = machine_description()  # read once: every write of this process names the same CPU

    def write(final: bool) -> dict:
        nonlocal quality_round
        # every method is timed against the plain AR decoder of its own model family (Method.baseline: ar for the
        # discrete models, car for the continuous ones), run with default parameters in this same process
        references, ref_lat = {}, {}
        baselines = {type(m).baseline for m in methods.values()}
        for s in settings:
            if s.method in baselines and not s.params and s.method not in references:
                references[s.method] = s.label
                if records[s.label]:
                    ref_lat[s.method] = statistics.median(r["wall_s"] / r["images"] for r in records[s.label])
        ar_label = references.get("ar")
        rows = []
        for s in settings:
            cls = type(methods[s.label])
            if s.label not in quality or _quality_due(done_rounds, len(batches), final):
                own = {space: torch.cat(v[s.label]) for space, v in feats.items() if v[s.label]}
                ref_label = references.get(cls.baseline)
                base = ({space: torch.cat(v[ref_label]) for space, v in feats.items() if v[ref_label]}
                        if ref_label not in (None, s.label) else {})
                quality[s.label] = {**_qualities(own, refs, labels_all), **_tests_vs_reference(own, base, labels_all)}
                quality_round = done_rounds
            rows.append(_aggregate(s, cls, records[s.label], quality[s.label], ref_lat.get(cls.baseline), cfg,
                                   errors.get(s.label)))
        result = {"config": {**config, "date": time.strftime("%Y-%m-%d %H:%M"),
                             "machine": machine,
                             "rounds_done": done_rounds, "rounds_total": len(batches), "complete": final,
                             "quality_round": quality_round, "kid_strata": KID_STRATA,
                             "fid_classifier_real_floor": floors["classifier"],
                             "fid_inception_real_floor": floors.get("inception"), "speedup_reference": ar_label,
                             "speedup_references": references},
                  "methods": rows}
        atomic_write_json(out / "results.json", result)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
        atomic_write_text(out / "results.csv", buf.getvalue())
        atomic_write_text(out / "results.md", markdown_table(rows))
        atomic_write_json(state_path, {"config": config, "records": records, "errors": errors, "done_rounds": done_rounds})
        tensors = {f"{space}/{k}": torch.cat(v).contiguous() for space, d in feats.items() for k, v in d.items() if v}
        atomic_write(feats_path, lambda tmp: save_file(tensors, tmp))
        if plots and (final or done_rounds % max(1, len(batches) // 10) == 0):  # plotting every round would cost
            from mulosd.evaluation.plots import write_plots

            write_plots(result, out)
        return result

    bar = tqdm(total=len(batches) * len(settings), initial=done_rounds * len(settings), desc="bench", disable=not progress)
    result = None
    for b in range(done_rounds, len(batches)):
        lo, hi = batches[b]
        order = settings[b % len(settings):] + settings[: b % len(settings)]
        for s in order:
            bar.update(1)
            if s.label in errors:
                continue
            try:
                o = run(s.label, lo, hi, cfg.seed)
            except Exception:  # noqa: BLE001
                errors[s.label] = traceback.format_exc(limit=3)
                continue
            st, counts = o.stats, o.stats["counts"]
            pred = pipe.classify(o.images)
            records[s.label].append({
                "batch": b, "images": hi - lo, "wall_s": st["wall_time_s"], "drafter_forwards": st["drafter_forwards"],
                **{k: counts[k] for k in ("active_forwards", "tokens", "accepted", "drafted", "resampled")},
                "correct": int((pred == o.labels).sum()), "time_s": st["time_breakdown_s"],
                "accept_hist": st["accepted_length_histogram"],
            })
            for space, extract in extractors.items():
                feats[space][s.label].append(extract(o.images))
            if save_samples and lo < SAMPLE_IMAGES:
                samples[s.label] = torch.cat([samples.get(s.label, o.images[:0]), o.images])[:SAMPLE_IMAGES]
                _save_sample_grid(pipe, out, s.label, samples[s.label], labels_all)
        done_rounds = b + 1
        result = write(final=done_rounds == len(batches))
    bar.close()
    if result is None:
        result = write(final=True)
    return result
