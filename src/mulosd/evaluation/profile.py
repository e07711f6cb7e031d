"""``mulosd profile``: what one target forward costs as a function of batch size and of the number of new tokens.

Every speculative method replaces k decode steps (k forwards of one new token each) by one verification (one
forward of k new tokens against the same KV cache). Its speed-up is therefore bounded by how the cost of a forward
grows with k: when a forward of k tokens costs about as much as one of 1 token (a GPU at small batch, where the
weights' memory traffic dominates), accepting k drafts is worth nearly k steps; when it costs about k times as
much (a CPU, or a large batch, where the arithmetic dominates), drafting saves nothing. :func:`forward_cost`
measures that curve for any mulosd GPT (a model set's target, or random weights of a LlamaGen size from
:func:`size_config`) and :func:`run_profile` writes it as ``profile.json``, ``profile.csv``, ``profile.md`` and
``profile.png``.

What is timed, per (batch size, k): ``model.decode`` of k new tokens at grid cells ``cache_len .. cache_len+k-1``
for every row of the model batch (2 x batch with classifier-free guidance: the conditional and the null-class
rows), with ``cache_len`` image tokens (plus the condition's ``cls_token_num`` slots) already in the KV cache and
visible to every new token. It includes the output projection to float32 logits (what a verification needs),
not sampling. The cache is filled by real forwards before timing (attention cost depends only on how many slots
are attended, but filling them is what a decoder does). On CUDA the device is synchronised before each clock read.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn

import mulosd
from mulosd.errors import MulosdError
from mulosd.io import atomic_write_json, atomic_write_text
from mulosd.models.condition import Captions
from mulosd.models.gpt import GPT, GPTConfig
from mulosd.models.llamagen import LLAMAGEN_SIZES, llamagen_config
from mulosd.resources import MEMORY_SHARE, available_memory, bytes_per_image, device_description, synchronize

__all__ = ["LLAMAGEN_SIZES", "VQ_FACTOR", "DEFAULT_NEW_TOKENS", "DEFAULT_BATCH_SIZES", "size_config",
           "param_count", "forward_cost", "run_profile", "markdown_table", "PROFILE_FILES", "CSV_FIELDS"]

VQ_FACTOR = 16  # LlamaGen's VQ-16 tokenizer: one token per 16 x 16 pixels
DEFAULT_NEW_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_BATCH_SIZES = (1, 4, 16)
PROFILE_FILES = ("profile.json", "profile.csv", "profile.md", "profile.png")
FILL_CHUNK = 64  # cells per forward when filling the cache (bounds the fill's logits memory)
CSV_FIELDS = ("batch", "model_batch", "cfg", "new_tokens", "cache_len", "attended_slots", "status", "reason",
              "median_ms", "p10_ms", "p90_ms", "mean_ms", "ms_per_new_token", "tokens_per_s", "decode_ms",
              "ratio_vs_k1", "ideal_speedup", "repeats")


# ---- LlamaGen sizes ----------------------------------------------------------------------------------------------
def size_config(name: str, image_size: int = 256, vocab_size: int = 16384, num_classes: int = 1000) -> GPTConfig:
    """The GPTConfig of a named LlamaGen size (:data:`LLAMAGEN_SIZES`: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B, ...)
    for class-conditional generation at ``image_size`` pixels with the VQ-16 tokenizer (256 px -> a 16 x 16 token
    grid, 384 -> 24 x 24, 512 -> 32 x 32), exactly as :func:`mulosd.models.llamagen.llamagen_config` builds it
    for loading a checkpoint of that size."""
    if name not in LLAMAGEN_SIZES:
        raise MulosdError(f"unknown LlamaGen size {name!r}; allowed: {', '.join(LLAMAGEN_SIZES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < VQ_FACTOR \
            or image_size % VQ_FACTOR:
        raise MulosdError(f"image size {image_size!r} is not a positive multiple of the VQ factor {VQ_FACTOR}; "
                          f"allowed: 16, 32, ..., e.g. 256, 384 or 512 (grids of 16, 24 or 32 tokens per side)")
    return llamagen_config(name, grid_size=image_size // VQ_FACTOR, vocab_size=vocab_size, num_classes=num_classes)


def param_count(config: GPTConfig) -> int:
    """Parameters of a discrete-token :class:`GPT` with this config, from its shapes alone (nothing allocated):
    token embedding, class embedding (with the null class), per layer wqkv + wo + SwiGLU + two RMSNorms, the final
    norm and the output projection. GPT-B at 256 px gives 110.9 M (LlamaGen: 111 M)."""
    c = config
    qkv = (c.n_head + 2 * c.kv_heads) * c.head_dim * c.dim
    layer = qkv + c.dim * c.dim + 3 * c.dim * c.ffn_hidden + 2 * c.dim
    return c.vocab_size * c.dim + (c.num_classes + 1) * c.dim + c.n_layer * layer + c.dim + c.dim * c.vocab_size


def _condition(model: GPT, batch: int, gen: torch.Generator):
    """Random class ids, or random full-length captions for a text-to-image model, on the model's device."""
    c, device = model.config, next(model.parameters()).device
    if c.condition == "caption":
        features = torch.randn(batch, c.cls_token_num, c.caption_dim, generator=gen)
        return Captions(features, torch.ones(batch, c.cls_token_num, dtype=torch.bool)).to(device)
    return torch.randint(0, c.num_classes, (batch,), generator=gen).to(device)


# ---- validation --------------------------------------------------------------------------------------------------
def _int_list(what: str, values, low: int) -> list[int]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    values = list(values)
    if not values:
        raise MulosdError(f"{what}: none given; allowed: one or more integers >= {low}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise MulosdError(f"{what} {v!r} out of range; allowed: integers >= {low}")
    return sorted(set(values))


def _check_int(what: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MulosdError(f"{what} {value!r} out of range; allowed: an integer >= {low}")
    return value


def _check_model(model) -> None:
    if not isinstance(model, GPT):
        raise MulosdError(f"profile measures mulosd GPT models (discrete or continuous tokens); "
                          f"got {type(model).__name__}")


# ---- measuring ---------------------------------------------------------------------------------------------------
def _random_tokens(model: GPT, rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k random tokens per row on the model's device: codes for a discrete GPT, vectors in the model's dtype for a
    continuous one (only the transformer is timed; a continuous model's diffusion head is not)."""
    p = next(model.parameters())
    if isinstance(model.tok_embeddings, nn.Embedding):
        return torch.randint(0, model.config.vocab_size, (rows, k), generator=gen).to(p.device)
    return torch.randn(rows, k, model.config.token_dim, generator=gen).to(device=p.device, dtype=p.dtype)


def _cells(rows: int, start: int, k: int, device) -> torch.Tensor:
    return torch.arange(start, start + k, device=device)[None].expand(rows, k).contiguous()


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default percentile)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _memory_reason(model: GPT, batch: int, cfg: bool, device: torch.device) -> str | None:
    """Why a batch would not fit (mulosd's decoding-batch estimate, resources.bytes_per_image), or None."""
    free = available_memory(device)
    if free is None:
        return None
    need = bytes_per_image([model], 2 if cfg else 1) * batch
    if need <= MEMORY_SHARE * free:
        return None
    return (f"batch {batch} needs about {need / 2**30:.1f} GiB (KV cache, activations, logits) but {device} has "
            f"{free / 2**30:.1f} GiB available")


def _row(batch: int, cfg: bool, k: int, cache_len: int, cls: int, repeats: int) -> dict:
    return {"batch": batch, "model_batch": 2 * batch if cfg else batch, "cfg": cfg, "new_tokens": k,
            "cache_len": cache_len, "attended_slots": cls + cache_len + k, "status": "skipped", "reason": None,
            "median_ms": None, "p10_ms": None, "p90_ms": None, "mean_ms": None, "ms_per_new_token": None,
            "tokens_per_s": None, "decode_ms": None, "ratio_vs_k1": None, "ideal_speedup": None,
            "repeats": repeats, "times_ms": []}


def _time_forward(model: GPT, tokens, cells, repeats: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        model.decode(tokens, cells)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        model.decode(tokens, cells)
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _measure_batch(model: GPT, batch: int, ks: list[int], cache_len: int, repeats: int, warmup: int, cfg: bool,
                   gen: torch.Generator) -> dict[int, list[float]]:
    """Times (ms) per k for one batch size: set up and fill the cache once, then time each k."""
    c = model.config
    device = next(model.parameters()).device
    rows = 2 * batch if cfg else batch
    model.setup_cache(rows)
    cond = _condition(model, batch, gen)
    model.prefill(model.with_null(cond) if cfg else cond)
    for start in range(0, cache_len, FILL_CHUNK):
        n = min(FILL_CHUNK, cache_len - start)
        model.decode(_random_tokens(model, rows, n, gen), _cells(rows, start, n, device))
    out = {}
    for k in ks:
        tokens, cells = _random_tokens(model, rows, k, gen), _cells(rows, cache_len, k, device)
        out[k] = _time_forward(model, tokens, cells, repeats, warmup, device)
    return out


def forward_cost(model: GPT, batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
                 new_tokens: Iterable[int] = DEFAULT_NEW_TOKENS, cache_len: int = 0, repeats: int = 10,
                 warmup: int = 2, cfg: bool = True, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Time one target forward of k new tokens per row for every (batch size, k), with ``cache_len`` image tokens
    already cached. Returns one row per requested point, ordered by batch then k, each with:

    - ``batch`` (images), ``model_batch`` (rows the model runs: 2 x batch with ``cfg``), ``cfg``, ``new_tokens``
      (k), ``cache_len``, ``attended_slots`` (condition + cached + new slots the last new token attends to);
    - ``status`` ``ok`` or ``skipped`` with ``reason`` (cache_len + k beyond the grid, too little memory, CUDA out
      of memory);
    - ``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms`` over ``repeats`` timed forwards (after ``warmup`` untimed
      ones), and the raw ``times_ms``;
    - ``ms_per_new_token`` (median / k), ``tokens_per_s`` (batch x k image tokens per second of forward);
    - ``decode_ms`` (the median forward of k = 1 at the same batch, measured even when 1 was not requested),
      ``ratio_vs_k1`` = median_ms / decode_ms ("a verify of k tokens costs this many decode steps") and
      ``ideal_speedup`` = k / ratio_vs_k1 (the speed-up of a verification that accepts all k tokens over k decode
      steps, drafting free).

    Runs under ``torch.inference_mode`` in eval mode on the model's device and dtype (its first parameter's); the
    model's previous train/eval mode is restored and its KV cache is cleared afterwards. ``progress`` is called with
    each row as it is finished."""
    _check_model(model)
    batch_sizes = _int_list("batch size", batch_sizes, 1)
    ks = _int_list("new tokens", new_tokens, 1)
    cache_len = _check_int("cache_len", cache_len, 0)
    repeats = _check_int("repeats", repeats, 1)
    warmup = _check_int("warmup", warmup, 0)
    c = model.config
    n = c.num_tokens
    if cache_len + ks[0] > n:
        raise MulosdError(f"cache_len {cache_len} + new tokens {ks[0]} = {cache_len + ks[0]} exceeds the model's "
                          f"{n} grid cells (sequence {c.max_seq_len} = {c.cls_token_num} condition + {n} image "
                          f"tokens) for every requested k; allowed: cache_len + k <= {n}, so cache_len <= "
                          f"{n - ks[0]} for k = {ks[0]}")
    device = next(model.parameters()).device
    measured = sorted({1, *(k for k in ks if cache_len + k <= n)})
    gen = torch.Generator().manual_seed(0)
    was_training = model.training
    rows_out = []
    model.eval()
    try:
        for batch in batch_sizes:
            rows = {k: _row(batch, cfg, k, cache_len, c.cls_token_num, repeats) for k in ks}
            reason = _memory_reason(model, batch, cfg, device)
            times = {}
            if reason is None:
                try:
                    with torch.inference_mode():
                        times = _measure_batch(model, batch, measured, cache_len, repeats, warmup, cfg, gen)
                except torch.cuda.OutOfMemoryError:
                    reason = f"CUDA out of memory at batch {batch} (model batch {2 * batch if cfg else batch})"
                    times = {}
                finally:
                    model.clear_cache()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            decode_ms = _quantile(times[1], 0.5) if 1 in times else None
            for k in ks:
                row = rows[k]
                if cache_len + k > n:
                    row["reason"] = f"cache_len {cache_len} + k {k} > {n} grid cells"
                elif reason is not None:
                    row["reason"] = reason
                else:
                    t = times[k]
                    med = _quantile(t, 0.5)
                    ratio = med / decode_ms
                    row.update(status="ok", median_ms=med, p10_ms=_quantile(t, 0.1), p90_ms=_quantile(t, 0.9),
                               mean_ms=sum(t) / len(t), ms_per_new_token=med / k,
                               tokens_per_s=batch * k / (med / 1e3), decode_ms=decode_ms, ratio_vs_k1=ratio,
                               ideal_speedup=k / ratio, times_ms=t)
                rows_out.append(row)
                if progress is not None:
                    progress(row)
    finally:
        model.clear_cache()
        model.train(was_training)
    return rows_out


# ---- writing -----------------------------------------------------------------------------------------------------
def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def markdown_table(result: dict) -> str:
    """Rows = new tokens k, columns = batch sizes; a cell is the median ms of one forward and, in brackets, its
    cost in decode steps (cost(k) / cost(1))."""
    cfg = result["config"]
    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    ks = sorted({r["new_tokens"] for r in rows})
    cell = {(r["batch"], r["new_tokens"]): r for r in rows}
    cfg_note = "with CFG (model batch = 2 x batch)" if cfg["cfg"] else "without CFG"
    lines = [
        f"Forward cost of {cfg['label']} ({_fmt_params(cfg['params'])} parameters, {cfg['model']['grid_size']}^2 "
        f"tokens) on {cfg['device_description']}, {cfg['dtype']}, {cfg_note}, {cfg['cache_len']} image tokens "
        f"cached; median of {cfg['repeats']} forwards.",
        "",
        "Cell: ms per forward of k new tokens per image (x cost(k)/cost(1): a verify of k tokens costs that many "
        "decode steps).",
        "",
        "| new tokens k | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---:|" + "---:|" * len(batches),
    ]
    for k in ks:
        cells = []
        for b in batches:
            r = cell.get((b, k))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append("skipped")
            else:
                cells.append(f"{_fmt_ms(r['median_ms'])} ms (x{r['ratio_vs_k1']:.2f})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    reasons = sorted({r["reason"] for r in rows if r["status"] != "ok"})
    if reasons:
        lines += ["", "Skipped: " + "; ".join(reasons) + "."]
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else round(r[k], 4) if isinstance(r[k], float) else r[k]
                    for k in CSV_FIELDS})
    return buf.getvalue()


def profile_plot(result: dict, path: str | Path) -> Path:
    """Left: ms per forward against new tokens k (log2 x, log y), one line per batch size. Right: cost(k)/cost(1)
    against k with the line y = k (a forward that costs k decode steps: no speed-up possible) for reference."""
    from mulosd.evaluation.plots import _pyplot, _save

    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    cfg = result["config"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, b in enumerate(sorted({r["batch"] for r in ok})):
        pts = sorted((r["new_tokens"], r["median_ms"], r["ratio_vs_k1"]) for r in ok if r["batch"] == b)
        colour = plt.get_cmap("viridis")(i / max(1, len({r["batch"] for r in ok}) - 1))
        label = f"batch {b}" + (f" ({2 * b} rows)" if cfg["cfg"] else "")
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, color=colour, label=label)
        right.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", markersize=3, color=colour, label=label)
    ks = sorted({r["new_tokens"] for r in ok})
    if ks:
        right.plot(ks, ks, color="grey", linestyle="--", linewidth=1, label="cost = k decode steps")
        right.axhline(1.0, color="black", linewidth=0.6)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        if high < 20 * low:  # less than about a decade: label the minor ticks too, else the axis may have none
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("new tokens per image in one forward (k)")
        ax.grid(alpha=0.3, which="both")
        if ok:
            ax.legend(fontsize=7)
    left.set_ylabel("ms per forward (median)")
    right.set_ylabel("cost(k) / cost(1) (decode steps)")
    if not ok:
        left.text(0.5, 0.5, "no point measured", ha="center", transform=left.transAxes)
    fig.suptitle(f"{cfg['label']}: {cfg['device_description']}, {cfg['dtype']}, {cfg['cache_len']} tokens cached"
                 f"{', CFG' if cfg['cfg'] else ''}", fontsize=10)
    return _save(fig, Path(path))


def run_profile(model: GPT, out_dir: str | Path, batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
                new_tokens: Iterable[int] = DEFAULT_NEW_TOKENS, cache_len: int = 0, repeats: int = 10,
                warmup: int = 2, label: str = "model", device_info: dict | None = None, cfg: bool = True,
                progress: Callable[[dict], None] | None = None) -> dict:
    """Measure :func:`forward_cost` and write ``profile.json`` (``{"config", "rows"}``), ``profile.csv``,
    ``profile.md`` (:func:`markdown_table`) and ``profile.png`` (:func:`profile_plot`) into ``out_dir``, each
    atomically. ``config`` records the label, the model config and parameter count, the device, its description
    (GPU name, or CPU architecture and threads), the machine (CPU model, torch threads and version), dtype, torch
    version, threads, the date (UTC) and the settings; ``device_info`` (e.g. how the caller chose the device) is
    stored under ``config["device_info"]``. Returns the written dict."""
    from mulosd.evaluation.bench import machine_description

    _check_model(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MulosdError(f"--out {out} is a file; allowed: a directory (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MulosdError(f"cannot create the directory {out}: {exc.strerror}") from None
    p = next(model.parameters())
    rows = forward_cost(model, batch_sizes, new_tokens, cache_len, repeats, warmup, cfg=cfg, progress=progress)
    result = {
        "config": {
            "label": label,
            "kind": getattr(model, "kind", type(model).__name__),
            "model": dataclasses.asdict(model.config),
            "params": sum(t.numel() for t in model.parameters()),
            "device": str(p.device),
            "device_description": device_description(p.device),
            "machine": machine_description(),
            "dtype": str(p.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(),
            "mulosd": mulosd.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "batch_sizes": sorted({r["batch"] for r in rows}),
            "new_tokens": sorted({r["new_tokens"] for r in rows}),
            "cache_len": cache_len,
            "repeats": repeats,
            "warmup": warmup,
            "cfg": cfg,
            "device_info": device_info or {},
        },
        "rows": rows,
    }
    atomic_write_json(out / "profile.json", result)
    atomic_write_text(out / "profile.csv", _csv_text(rows))
    atomic_write_text(out / "profile.md", markdown_table(result))
    profile_plot(result, out / "profile.png")
    return result
