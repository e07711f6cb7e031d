"""Side by side: two `mulosd bench` runs of the same settings (e.g. before and after a change, run back to back).

    .venv/bin/python scripts/compare_runs.py docs/bench/RUN_A docs/bench/RUN_B

Prints a Markdown table per setting: median latency per image and speed-up over the family's AR row in each run,
and the ratio of the latencies (B / A). Speed-ups are within-run ratios, so they are the fairer comparison when
the machine's speed drifted between the runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: str) -> dict:
    result = json.loads((Path(run) / "results.json").read_text())
    return {r["label"]: r for r in result["methods"]}, result["config"]


def main(a: str, b: str) -> None:
    (ra, ca), (rb, cb) = rows(a), rows(b)
    print(f"A: `{a}` ({ca['rounds_done']} rounds, batch {ca['batch_size']}); "
          f"B: `{b}` ({cb['rounds_done']} rounds, batch {cb['batch_size']}); {cb['machine']}\n")
    print("| setting | latency A (s/img) | latency B (s/img) | B / A | speed-up A | speed-up B |")
    print("|---|---|---|---|---|---|")
    for label, x in ra.items():
        y = rb.get(label)
        if y is None or "latency_s_per_image" not in x or "latency_s_per_image" not in y:
            print(f"| `{label}` | missing in one run ||||| ")
            continue
        la, lb = x["latency_s_per_image"], y["latency_s_per_image"]
        print(f"| `{label}` | {la:.3f} | {lb:.3f} | {lb / la:.2f} | {x['speedup_vs_ar']:.2f}x | {y['speedup_vs_ar']:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
