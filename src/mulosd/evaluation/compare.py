"""A few methods side by side on the same classes and seeds (``mulosd compare``, and ``make demo``): time per
image, speed-up over the first method, class accuracy, one grid per method and one grid with all of them; plus
what the model set's shipped bench runs measured for the same methods (``measured.json``), because a demo's few
images time the speed honestly but cannot resolve a quality difference of a few points."""

from __future__ import annotations

from pathlib import Path

import torch

from mulosd.errors import MulosdError
from mulosd.io import read_json
from mulosd.zoo import resolve


def measured(model: str) -> dict:
    """The model set's ``measured.json`` (method -> rows from its bench runs; ``scripts/measured.py`` writes it),
    or an empty dict when it ships none."""
    try:
        path = resolve(model) / "measured.json"
    except MulosdError:
        return {}
    if not path.exists():
        return {}
    return read_json(path)


def measured_text(data: dict, method: str) -> str | None:
    """One line on what the bench runs measured for ``method`` with its defaults (and its quoted variants):
    speed-up per batch size and class accuracy against the reference's, with the two-sample p-value."""
    rows = data.get("methods", {}).get(method, [])
    if not rows:
        return None
    parts = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        items = []
        for r in sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch_size"]):
            if r["speedup"] is None or r["method"] == r["reference"]:
                latency = r.get("latency_s_per_image")
                items.append(f"batch {r['batch_size']}: " + (f"{latency:.2f} s/image, " if latency else "")
                             + f"class accuracy {r['class_accuracy']:.3f}")
                continue
            p = r.get("p_classifier")
            quality = f"class accuracy {r['class_accuracy']:.3f} vs {r['reference']} {r['reference_class_accuracy']:.3f}"
            if p is not None:
                quality += f", two-sample p {p:.3g}" + (" (a detectable change)" if p < 0.05 else "")
            items.append(f"{r['speedup']:.2f}x at batch {r['batch_size']} ({r['num_images']} images; {quality})")
        parts.append(("" if variant == "default" else f"with {variant}: ") + "; ".join(items))
    return " | ".join(parts)


def run_compare(pipe, methods: list[str], labels: torch.Tensor, sampling, seed: int, batch_size: int,
                warmup: bool = True, progress: bool = False) -> list[dict]:
    """Decode ``labels`` with each method (default parameters) on the same seeds; returns one row per method:
    name, exactness, time per image, speed-up over ``methods[0]``, class accuracy and the GenerationOutput.
    With ``warmup`` each method first decodes one uncounted batch, so the first does not pay start-up costs."""
    from mulosd.decoding.methods import get_method

    decoders = [get_method(m)(pipe) for m in methods]
    rows = []
    for decoder in decoders:
        if warmup:
            pipe.generate(decoder, labels[:batch_size], sampling, seed=seed, batch_size=batch_size, classify=False)
        out = pipe.generate(decoder, labels, sampling, seed=seed, batch_size=batch_size, progress=progress)
        rows.append({"method": decoder.name, "exact": decoder.exact, "output": out,
                     "latency_s_per_image": out.stats["wall_time_s"] / len(labels),
                     "class_accuracy": out.stats.get("class_accuracy")})
    base = rows[0]["latency_s_per_image"]
    for row in rows:
        row["speedup"] = base / row["latency_s_per_image"]
    return rows


def summary_lines(rows: list[dict], data: dict | None = None) -> list[str]:
    """The printed summary: one line per method, then what the shipped bench runs measured for them."""
    n = len(rows[0]["output"].labels)
    lines = [f"{'method':8s} {'exact':6s} {'s/image':>8s} {'speed-up':>9s} {'class accuracy':>15s}"]
    for r in rows:
        acc = "n/a" if r["class_accuracy"] is None else f"{r['class_accuracy']:.2f} ({round(r['class_accuracy'] * n)}/{n})"
        lines.append(f"{r['method']:8s} {'yes' if r['exact'] else 'no':6s} {r['latency_s_per_image']:8.2f} "
                     f"{r['speedup']:8.2f}x {acc:>15s}")
    if data:
        lines.append(f"{n} images time the speed-up but cannot resolve a few points of quality; the shipped bench "
                     f"runs ({data.get('machine', 'CPU')}) measured (speed-ups differ between CPUs; compare the "
                     f"time per AR image):")
        for r in rows:
            text = measured_text(data, r["method"])
            if text:
                lines.append(f"  {r['method']}: {text}")
    return lines


def side_by_side(grids, titles, pad: int = 8, title_height: int = 18):
    """PIL images next to each other with a title above each (the comparison grid)."""
    from PIL import Image, ImageDraw, ImageFont

    width = sum(g.width for g in grids) + pad * (len(grids) - 1)
    height = max(g.height for g in grids) + title_height
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for grid, title in zip(grids, titles):
        draw.text((x + 4, 3), title, fill="black", font=font)
        canvas.paste(grid, (x, title_height))
        x += grid.width + pad
    return canvas


def write_compare(out_dir: str | Path, rows: list[dict], class_names, data: dict | None = None) -> list[Path]:
    """``out_dir/<method>.png`` per method, ``out_dir/compare.png`` with all of them titled by method and
    speed-up, and ``out_dir/summary.json`` (every method's stats and the quoted bench numbers); each atomic."""
    from mulosd.evaluation.grids import image_grid
    from mulosd.io import atomic_write, atomic_write_json

    out_dir = Path(out_dir)
    written, grids = [], []
    for r in rows:
        o = r["output"]
        grid = image_grid(o.images, o.labels, class_names)
        grids.append(grid)
        written.append(atomic_write(out_dir / f"{r['method']}.png", lambda tmp, g=grid: g.save(tmp, format="PNG")))
    titles = [f"{r['method']}: {r['speedup']:.2f}x, accuracy {r['class_accuracy'] if r['class_accuracy'] is not None else 'n/a'}"
              for r in rows]
    both = side_by_side(grids, titles)
    written.append(atomic_write(out_dir / "compare.png", lambda tmp: both.save(tmp, format="PNG")))
    summary = {"methods": [{k: v for k, v in r.items() if k != "output"} | {"stats": r["output"].stats} for r in rows],
               "measured": {r["method"]: measured_text(data or {}, r["method"]) for r in rows}}
    written.append(atomic_write_json(out_dir / "summary.json", summary))
    return written
