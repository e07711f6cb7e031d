"""Plots of a `mulosd bench` result: the speed/quality frontier, accepted-length histograms and where the time
goes. Every function takes the ``results.json`` dict and writes one PNG atomically (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from mulosd.evaluation.bench import PHASES, measured_phases
from mulosd.io import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _ok(rows):
    return [r for r in rows if r.get("latency_s_per_image") is not None]


def frontier_plot(result: dict, path: str | Path) -> Path:
    """Speed-up over AR against FID (classifier features, and Inception when measured): lower right is better.
    Exact (lossless) settings are drawn as squares, lossy ones as dots; the dashed line is the real-data floor."""
    plt = _pyplot()
    rows = [r for r in _ok(result["methods"]) if r.get("speedup_vs_ar") is not None]
    spaces = [s for s in ("classifier", "inception") if any(r.get(f"fid_{s}") is not None for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(spaces)), figsize=(6.2 * max(1, len(spaces)), 4.6), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, space in zip(axes[0], spaces or ["classifier"], strict=False):
        for r in rows:
            fid = r.get(f"fid_{space}")
            if fid is None:
                continue
            ax.scatter(fid, r["speedup_vs_ar"], color=colours[r["method"]], marker="s" if r.get("exact") else "o",
                       s=36, zorder=3)
            ax.annotate(r["label"], (fid, r["speedup_vs_ar"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        floor = result["config"].get(f"fid_{space}_real_floor")
        if floor is not None:
            ax.axvline(floor, color="grey", linestyle="--", linewidth=1, label=f"real vs real at N ({floor:.1f})")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xlabel(f"FID ({space} features), lower is better")
        ax.set_ylabel("latency speed-up over AR (same run)")
        ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], color=colours[m], marker="o", linestyle="", label=m) for m in methods]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc="best")
    c = result["config"]
    fig.suptitle(f"{c['model']}: {c['num_images']} images per setting, batch {c['batch_size']}", fontsize=10)
    return _save(fig, Path(path))


def accepted_length_plot(result: dict, path: str | Path) -> Path:
    """Share of verifications that accepted n drafted tokens, per setting with drafts (n on a log-spaced axis
    when some setting accepts long runs, as MuLo-SD does over whole images)."""
    plt = _pyplot()
    rows = [r for r in _ok(result["methods"]) if sum(r.get("accepted_length_histogram") or []) > 0]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    longest = 1
    for r in rows:
        hist = r["accepted_length_histogram"]
        total = sum(hist)
        xs = [n for n, c in enumerate(hist) if c]
        longest = max(longest, max(xs))
        ax.plot(xs, [hist[n] / total for n in xs], marker="o", markersize=3, linewidth=1,
                label=f"{r['label']} (mean {sum(n * c for n, c in enumerate(hist)) / total:.1f})")
    if longest > 40:
        ax.set_xscale("symlog", linthresh=8)
    ax.set_xlabel("drafted tokens accepted in one verification (per image)")
    ax.set_ylabel("share of verifications")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no setting drafts tokens", ha="center", transform=ax.transAxes)
    return _save(fig, Path(path))


def time_breakdown_plot(result: dict, path: str | Path) -> Path:
    """Latency per image split into the phases a method measures; "other" is the rest (sampling, bookkeeping,
    and for methods that measure no phases, everything)."""
    plt = _pyplot()
    rows = _ok(result["methods"])
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.4))
    colours = plt.get_cmap("Set2")  # indexed by the phase's place in PHASES: one colour per phase in every plot
    measured = measured_phases(rows)
    for i, r in enumerate(rows):
        left = 0.0
        tb = r.get("time_breakdown_s") or {}
        # phases are means per image, so they are stacked against the mean (not the median) latency
        for phase in measured:
            v = tb.get(phase, 0.0)
            ax.barh(i, v, left=left, color=colours(PHASES.index(phase)), label=phase if i == 0 else None)
            left += v
        rest = max(0.0, r.get("latency_mean_s", r["latency_s_per_image"]) - left)
        ax.barh(i, rest, left=left, color="lightgrey", label="other" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean seconds per image")
    ax.legend(fontsize=7, ncol=6, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, Path(path))


def write_plots(result: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir) / "plots"
    return [frontier_plot(result, out / "frontier.png"), accepted_length_plot(result, out / "accepted_length.png"),
            time_breakdown_plot(result, out / "time_breakdown.png")]
