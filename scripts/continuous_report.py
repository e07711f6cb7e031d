"""Measurements of a continuous-token family for docs/MODELS.md:

    .venv/bin/python scripts/continuous_report.py [--per-class 20] [--doc docs/MODELS.md]            # fmnist-32's
    .venv/bin/python scripts/continuous_report.py --family c16 [--doc docs/MODELS.md]                # fmnist-32-c16's

fmnist-32's family (8x8 tokens of 16 channels; runs/ctok8, runs/ctarget8, runs/cdrafter8 from
scripts/train_continuous8.sh, runs/cdistill8_teacher from scripts/distill_continuous_report.sh) or the earlier one
now shipped as fmnist-32-c16 (16x16 tokens of 4 channels; runs/ctokenizer, runs/ctarget, runs/cdrafter_small from
scripts/train_continuous.sh). Training summaries, class accuracy of CFG-3 samples from the shipped target and each
drafter (car), the decode step cost of each at batch 1 with CFG (transformer forward + one head chain, median of
many), sample grids in docs/images/, and the fp16-vs-fp32 check on the target. Replaces the block between
<!-- MARKER:start --> and <!-- MARKER:end --> in the doc (MARKER: continuous, or continuous16 for c16), or prints it."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mulosd.decoding.state import double
from mulosd.decoding.continuous import generate_car, head_sample
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.evaluation.grids import image_grid
from mulosd.io import atomic_write, replace_marked_block
from mulosd.models.cgpt import ContinuousGPT
from mulosd.pipeline import Pipeline


def step_cost(model, reps: int = 200) -> dict:
    """Median ms of one transformer decode step and of one head chain at batch 1 with CFG (2 rows)."""
    cfg = SamplingConfig(cfg_scale=3.0)
    model.setup_cache(2)
    fwd, head = [], []
    try:
        with torch.inference_mode():
            z = model.prefill(torch.tensor([3, 10]))
            x = torch.zeros(1, 1, model.token_dim)
            for k in range(reps):
                cell = torch.full((2, 1), k % model.config.num_tokens)
                t0 = time.perf_counter()
                z2 = model.decode(double(x, cfg), cell)[:, 0]
                t1 = time.perf_counter()
                head_sample(model, z, cfg, torch.randn(len(model.head.sampling) + 1, 1, model.token_dim))
                t2 = time.perf_counter()
                fwd.append(t1 - t0)
                head.append(t2 - t1)
                z = z2
    finally:
        model.clear_cache()
    return {"forward_ms": 1000 * statistics.median(fwd[10:]), "head_ms": 1000 * statistics.median(head[10:])}


def params(m) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


# family -> (model set, doc marker, grid-file prefix, [(run, role or None for the tokenizer, architecture or None)])
FAMILIES = {
    "c8": ("fmnist-32", "continuous", "samples_continuous",
           [("ctok8", None, "conv KL autoencoder, factor 4, 16-channel tokens"), ("ctarget8", "target", None),
            ("cdrafter8", "small", None), ("cdistill8_teacher", "distilled", None)]),
    "c16": ("fmnist-32-c16", "continuous16", "samples_continuous16",
            [("ctokenizer", None, "conv KL autoencoder, factor 2, 4-channel tokens"), ("ctarget", "target", None),
             ("cdrafter_small", "small", None)]),
}


def held_out(summary: dict, role: str | None) -> str:
    """The held-out column: reconstruction PSNR (tokenizer), test noise MSE (trained on data), or the distillation's
    held-out CSpD acceptance before -> after."""
    ev = summary["eval"]
    if role is None:
        return f"PSNR {ev['test_psnr_db']} dB (32 px)"
    if "test_noise_mse" in ev:
        return f"test noise MSE {ev['test_noise_mse']}"
    a, b = ev["start"], ev["distilled"]
    return (f"from `small` ({summary['recipe_args']['num_samples']} target samples): path KL/token "
            f"{a['path_kl_per_token']:.0f} -> {b['path_kl_per_token']:.0f}, aligned gap {a['median_aligned_gap_sigmas']:.0f} -> "
            f"{b['median_aligned_gap_sigmas']:.0f} last-step stds, CSpD exact expected acceptance "
            f"{a['expected_acceptance']:.4f} -> {b['expected_acceptance']:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--doc", default=None)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="c8")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model_set, marker, prefix, runs_roles = FAMILIES[args.family]
    pipe = Pipeline.from_pretrained(model_set)
    cont = pipe.continuous_models()
    runs = Path(args.runs)
    rows = []
    for name, role, arch in runs_roles:
        s = json.loads((runs / name / "summary.json").read_text())
        m = cont.tokenizer if role is None else cont.model(role)
        if arch is None:
            c = m.config
            arch = (f"GPT {c.n_layer}L d{c.dim} {c.n_head}h + head {c.head_depth}x{c.head_width}, "
                    f"{c.sample_steps} reverse steps")
        t = s["train"]
        held = held_out(s, role)
        rows.append(f"| `{'continuous ' + (role or 'tokenizer')}` | {arch} | {params(m):.2f} M | {t['steps']} x {t['batch_size']} | "
                    f"{s['train_time_s'] / 60:.1f} min | {s['final']['loss']:.4f} | {held} |")
    out = ["| model | architecture | params | steps x batch | train time | final train loss | held-out |",
           "|---|---|---|---|---|---|---|", *rows, ""]
    classes = list(range(10))
    out += ["| samples from (car, CFG 3) | class accuracy | transformer step (ms) | head chain (ms) | step cost (ms) |",
            "|---|---|---|---|---|"]
    costs = {}
    roles = [r for _, r, _ in runs_roles if r is not None]
    for role in roles:
        r = pipe(classes, num_per_class=args.per_class, method="car", model=role, seed=0, batch_size=50, cfg_scale=3.0)
        grid = image_grid(pipe_first(r.images, args.per_class, 8), torch.tensor([c for c in classes for _ in range(8)]),
                          pipe.class_names)
        atomic_write(Path("docs/images") / f"{prefix}_{role}.png", lambda tmp: grid.save(tmp, format="PNG"))
        c = step_cost(cont.model(role))
        costs[role] = c["forward_ms"] + c["head_ms"]
        out.append(f"| `{role}` | {r.stats['class_accuracy']:.3f} | {c['forward_ms']:.2f} | {c['head_ms']:.2f} | {costs[role]:.2f} |")
    out.append("")
    ratios = ", ".join(f"{r} {costs[r] / costs['target']:.3f}" for r in roles[1:])
    out.append(f"Drafter / target step cost at batch 1 with CFG: {ratios} "
               f"({args.per_class * 10} samples per model for the accuracies; step times are medians of 190 steps).")
    # fp16 shipping vs the fp32 training weights
    fp32 = ContinuousGPT.from_pretrained(runs / runs_roles[1][0] / "model")
    labels = torch.arange(10).repeat_interleave(2)
    a, _ = generate_car(fp32, labels, SamplingConfig(cfg_scale=3.0), RandomStreams.from_seed(0, range(20)))
    b, _ = generate_car(cont.target, labels, SamplingConfig(cfg_scale=3.0), RandomStreams.from_seed(0, range(20)))
    out.append(f"\nfp16 storage vs fp32 (target, 20 images, shared seeds): mean |token difference| "
               f"{(a - b).abs().mean():.4f} (tokens have unit variance), max {(a - b).abs().max():.3f}.\n")
    text = "\n".join(out)
    if args.doc:
        replace_marked_block(args.doc, marker, text)
        print(f"updated {args.doc}")
    print(text)


def pipe_first(images, per_class, keep):
    """The first ``keep`` images of every class from a class-major batch."""
    return torch.cat([images[c * per_class : c * per_class + keep] for c in range(len(images) // per_class)])


if __name__ == "__main__":
    main()
