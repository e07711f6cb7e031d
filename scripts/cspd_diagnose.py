"""Why the paper's surrogate ratio accepts (almost) nothing on the shipped continuous models: the terms of the ratio,
measured on real drafts, for docs/CSPD.md.

    .venv/bin/python scripts/cspd_diagnose.py [--images 8] [--doc docs/CSPD.md]             # fmnist-32, every drafter
    .venv/bin/python scripts/cspd_diagnose.py --model fmnist-32-c16 --variances learned,fixed_small --drafters small \
        --aligns true --marker diagnose [--doc docs/CSPD.md]                                   # the earlier family

Runs cspd (gamma 4, CFG 3, pre-fill 0.05, paper's ratio) on a few images per drafter and head variance,
records every verified draft's surrogate terms (the std-product term, the last step's stds, the distance between
the two chains' last-step means) and reports their quantiles and the mean acceptance probability min(1, r~) the
same drafts would get with the paper's ratio and with the public code's inner temperatures. Replaces the block
between <!-- MARKER:start --> and <!-- MARKER:end --> in the doc (or prints it)."""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mulosd.decoding.continuous as cont
from mulosd.decoding.cspd_rules import surrogate_log_ratio
from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.io import replace_marked_block
from mulosd.pipeline import Pipeline

RELAXES = (1.0, 42.0, 100.0)


def terms(target, drafter, images: int, align: bool = True) -> dict:
    """Run cspd and collect every verified draft's ratio terms (the decoder's own ratio function, wrapped)."""
    rec = []

    def recording(x0, draft, tgt, relax=1.0):
        rec.append({"x0": x0, "draft": draft, "target": tgt})
        return surrogate_log_ratio(x0, draft, tgt, relax)

    cont.surrogate_log_ratio = recording
    try:
        labels = torch.arange(images) % 10
        cont.generate_cspd(target, drafter, labels, SamplingConfig(cfg_scale=3.0),
                           RandomStreams.from_seed(0, range(images)), gamma=4, prefill=0.05, align=align)
    finally:
        cont.surrogate_log_ratio = surrogate_log_ratio
    cat = lambda f: torch.cat([f(r).flatten(0, 1) for r in rec])  # noqa: E731 - [drafts, ...]
    out = {"prefix": cat(lambda r: r["draft"]["log_std_prefix"] - r["target"]["log_std_prefix"]),
           "last_std": cat(lambda r: r["target"]["last_std"]).flatten(),
           "mean_gap": cat(lambda r: (r["target"]["last_mean"] - r["draft"]["last_mean"]).abs()).flatten()}
    for relax in RELAXES:
        lr = torch.cat([surrogate_log_ratio(r["x0"], r["draft"], r["target"], relax).flatten() for r in rec])
        out[f"accept_{relax:g}"] = float(lr.clamp(max=0).exp().mean())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images per row (drafter x head variance)")
    ap.add_argument("--doc", default=None, help="Markdown file with MARKER markers to update")
    ap.add_argument("--model", default="fmnist-32", help="model set whose continuous family is measured")
    ap.add_argument("--drafters", default=None, help="comma-separated continuous drafter roles (default: all)")
    ap.add_argument("--variances", default="fixed_small", help="comma-separated head variances to run both heads with")
    ap.add_argument("--marker", default="diagnose8", help="block name in the doc")
    ap.add_argument("--aligns", default="true,false",
                    help="comma-separated trajectory alignment settings (true: the target replays the drafter's noises)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    cm = Pipeline.from_pretrained(args.model).continuous_models()
    roles = args.drafters.split(",") if args.drafters else sorted(cm.drafters)
    q = lambda v: " / ".join(f"{x:.3g}" for x in torch.quantile(v.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist())  # noqa: E731
    if not set(args.aligns.split(",")) <= {"true", "false"}:
        ap.error(f"--aligns takes true and/or false, comma-separated; got {args.aligns!r}")
    aligns = [a == "true" for a in args.aligns.split(",")]
    lines = ["| drafter | head variance | aligned | drafts | std-product term, log (p10 / p50 / p90) | last-step σ_p (p10 / p50 / p90) | "
             "\\|μ_p − μ_q\\| last step (p10 / p50 / p90) | "
             + " | ".join(f"mean min(1, r̃), {'paper' if r == 1 else f'relax {r:g}'}" for r in RELAXES) + " |",
             "|---" * (7 + len(RELAXES)) + "|"]
    for role in roles:
        for variance in args.variances.split(","):
            for align in aligns:
                target, drafter = copy.deepcopy(cm.target), copy.deepcopy(cm.model(role))
                target.head.config.variance = drafter.head.config.variance = variance
                t = terms(target, drafter, args.images, align)
                lines.append(f"| `{role}` | `{variance}` | {'yes' if align else 'no'} | {len(t['prefix'])} | {q(t['prefix'])} | {q(t['last_std'])} | {q(t['mean_gap'])} | "
                             + " | ".join(f"{t[f'accept_{r:g}']:.4f}" for r in RELAXES) + " |")
    table = "\n".join(lines) + (f"\n\nVerified drafts of {args.images} images (γ 4, CFG 3, seed 0) per row, {args.model}; "
                                f"`scripts/cspd_diagnose.py`, {time.time() - t0:.0f} s on 2 cores.\n")
    if args.doc:
        replace_marked_block(args.doc, args.marker, table)
        print(f"updated {args.doc}")
    else:
        print(table)


if __name__ == "__main__":
    main()
