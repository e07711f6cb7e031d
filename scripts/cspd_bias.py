"""The surrogate-ratio bias table of docs/CSPD.md (1-D toy, exact denoisers; see mulosd.evaluation.cspd_toy).

    .venv/bin/python scripts/cspd_bias.py [--n 400000] [--doc docs/CSPD.md]

Replaces the block between <!-- bias:start --> and <!-- bias:end --> in the doc (or prints it)."""

from __future__ import annotations

import argparse
import time

import torch

from mulosd.evaluation.cspd_toy import SCENARIOS, cspd_step, schedule
from mulosd.io import replace_marked_block


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400_000, help="samples per cell")
    ap.add_argument("--steps", type=int, default=10, help="reverse steps (the shipped heads use 10)")
    ap.add_argument("--doc", default=None, help="Markdown file with bias markers to update")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sched = schedule(args.steps)
    t0 = time.time()
    lines = ["| drafter vs target | alignment | ratio | acceptance | TV(CSpD, p) | TV floor (p vs p) | TV(q, p) |",
             "|---|---|---|---|---|---|---|"]
    for name, p, q in SCENARIOS:
        for align in (True, False):
            for relax in (1.0, 42.0):
                r = cspd_step(p, q, args.n, sched, align=align, relax=relax, seed=1)
                lines.append(f"| {name} | {'aligned' if align else 'fresh noises'} | "
                             f"{'paper' if relax == 1 else 'relaxed 42'} | {r['acceptance']:.3f} | {r['tv_cspd']:.4f} | "
                             f"{r['tv_floor']:.4f} | {r['tv_draft']:.4f} |")
    table = "\n".join(lines) + (f"\n\n{args.n} samples per row, {args.steps} reverse steps, "
                                f"`scripts/cspd_bias.py` ({time.time() - t0:.0f} s on 2 cores).\n")
    if args.doc:
        replace_marked_block(args.doc, "bias", table)
        print(f"updated {args.doc}")
    else:
        print(table)


if __name__ == "__main__":
    main()
