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
from mulosd.evaluation.fid import cached_reference, fid_from_features
from mulosd.io import atomic_write, cache_dir, atomic_write_json, atomic_write_text, check_writable

PHASES = ("drafting", "upsampling", "verification", "resampling", "downsampling")


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

    def validate(self) -> None:
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise MulosdError(f"--num-images must be an integer >= 1, got {self.num_images!r}")
        if self.batch_size < 1:
            raise MulosdError(f"--batch-size must be >= 1, got {self.batch_size}")
        SamplingConfig(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def _features(pipe, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        x = images * 2 - 1
        return torch.cat([pipe.classifier.features(x[i : i + 500]) for i in range(0, len(x), 500)]).float()


def reference_stats(pipe, cache_dir: Path, data_dir: str | None = None):
    """Classifier-feature statistics of the 10 000 Fashion-MNIST test images (cached per model set)."""
    test = FashionMNIST.load("test", data_dir)
    h = hashlib.sha256()
    for t in pipe.classifier.state_dict().values():  # keyed by the weights, so a retrained classifier never reuses it
        h.update(t.detach().to(torch.float16).cpu().numpy().tobytes())
    return cached_reference(cache_dir / f"ref_classifier_{pipe.name}_{h.hexdigest()[:12]}.safetensors",
                            lambda: _features(pipe, (test.at(32) + 1) / 2))


def real_floor(pipe, ref, n: int, data_dir: str | None = None) -> float | None:
    """Classifier FID of n real training images against the test reference: the best any sampler can score at n."""
    if n < 2:
        return None
    train = FashionMNIST.load("train", data_dir)
    return round(fid_from_features(_features(pipe, (train.at(32)[:n] + 1) / 2), *ref), 4)


def _aggregate(setting: Setting, method_cls, records: list[dict], feats: torch.Tensor | None, ref, ar_latency,
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
        "fid_classifier": round(fid_from_features(feats, *ref), 4) if feats is not None and len(feats) >= 2 else None,
        "fid_inception": None,
        "time_breakdown_s": {k: round(sum(r["time_s"].get(k, 0.0) for r in records) / n, 5) for k in PHASES
                             if any(k in r["time_s"] for r in records)},
    })
    return row


CSV_FIELDS = ["label", "method", "batch_size", "num_images", "latency_s_per_image", "speedup_vs_ar",
              "target_forwards_per_image", "drafter_forwards_per_image", "step_compression", "mean_accepted_length",
              "acceptance_rate", "resampled_per_image", "class_accuracy", "fid_classifier", "fid_inception", "error"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| setting | speedup vs AR | latency s/img (p10-p90) | target fwd/img | step compression | accept rate | "
             "resampled/img | class acc | FID (classifier) | time: draft / up / verify / resample / down (s/img) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error") and "latency_s_per_image" not in r:
            lines.append(f"| `{r['label']}` | error: {r['error'].splitlines()[0]} |||||||||")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        tb = r.get("time_breakdown_s") or {}
        times = " / ".join(f(tb.get(k), ".3f") for k in PHASES) if tb else "-"
        lines.append(
            f"| `{r['label']}` | {f(r['speedup_vs_ar'], '.2f')}x | {r['latency_s_per_image']:.3f} "
            f"({r['latency_p10_p90_s'][0]:.3f}-{r['latency_p10_p90_s'][1]:.3f}) | {r['target_forwards_per_image']:.1f} | "
            f"{r['step_compression']:.2f}x | {f(r['acceptance_rate'], '.3f')} | {f(r['resampled_per_image'], '.1f')} | "
            f"{r['class_accuracy']:.3f} | {f(r['fid_classifier'], '.2f')} | {times} |")
    return "\n".join(lines) + "\n"


SAMPLE_IMAGES = 20  # the first images of every setting go into samples/<setting>.png


def _save_sample_grid(pipe, out: Path, label: str, images: torch.Tensor, labels_all: torch.Tensor) -> None:
    from mulosd.evaluation.grids import image_grid

    grid = image_grid(images, labels_all[: len(images)], pipe.class_names)
    safe = "".join(ch if ch.isalnum() or ch in "-_=.," else "_" for ch in label)
    atomic_write(out / "samples" / f"{safe}.png", lambda tmp: grid.save(tmp, format="PNG"))


def run_bench(pipe, settings: list[Setting], cfg: BenchConfig, out_dir: str | Path, resume: bool = False,
              progress: bool = True, data_dir: str | None = None, save_samples: bool = True) -> dict:
    cfg.validate()
    out = Path(out_dir)
    check_writable(out / "results.json")
    if pipe.classifier is None:
        raise MulosdError(f"model set {pipe.name} has no classifier; bench needs it for class accuracy and FID")
    methods = {}
    for s in settings:  # every setting is built (and so validated) before any work starts
        methods[s.label] = get_method(s.method)(pipe, **s.params)
    sampling = SamplingConfig(cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    config = {"model": pipe.name, "num_images": cfg.num_images, "batch_size": cfg.batch_size, "seed": cfg.seed,
              "sampling": vars(sampling), "settings": [[s.label, s.method, s.params] for s in settings]}
    state_path, feats_path = out / "state.json", out / "state.safetensors"
    records = {s.label: [] for s in settings}
    feats = {s.label: [] for s in settings}
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
            feats = {s.label: [saved[s.label]] if s.label in saved else [] for s in settings}
    ref = reference_stats(pipe, cache_dir(), data_dir)
    floor = real_floor(pipe, ref, cfg.num_images, data_dir)
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

    def write(final: bool) -> dict:
        ar_label = next((s.label for s in settings if s.method == "ar" and not s.params), None)
        ar_lat = None
        if ar_label and records[ar_label]:
            ar_lat = statistics.median(r["wall_s"] / r["images"] for r in records[ar_label])
        rows = []
        for s in settings:
            f = torch.cat(feats[s.label]) if feats[s.label] else None
            rows.append(_aggregate(s, type(methods[s.label]), records[s.label], f, ref, ar_lat, cfg, errors.get(s.label)))
        result = {"config": {**config, "date": time.strftime("%Y-%m-%d %H:%M"),
                             "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
                             "rounds_done": done_rounds, "rounds_total": len(batches), "complete": final,
                             "fid_classifier_real_floor": floor, "speedup_reference": ar_label},
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
        tensors = {k: torch.cat(v).contiguous() for k, v in feats.items() if v}
        atomic_write(feats_path, lambda tmp: save_file(tensors, tmp))
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
            })
            feats[s.label].append(_features(pipe, o.images))
            if save_samples and lo < SAMPLE_IMAGES:
                samples[s.label] = torch.cat([samples.get(s.label, o.images[:0]), o.images])[:SAMPLE_IMAGES]
                _save_sample_grid(pipe, out, s.label, samples[s.label], labels_all)
        done_rounds = b + 1
        result = write(final=done_rounds == len(batches))
    bar.close()
    if result is None:
        result = write(final=True)
    return result
