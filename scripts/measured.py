"""Write a model set's ``measured.json`` from the bench runs in docs/bench: each method's measured speed-up and
quality per run, which `mulosd methods` and `mulosd compare` (the demo) quote next to their own numbers.

    python scripts/measured.py                      # fmnist-32 from the runs listed in RUNS
    python scripts/measured.py --check              # exit 1 if the shipped file is not what the runs give

Only rows whose parameters are the method's defaults, plus the named variants in VARIANTS, are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mulosd.io import atomic_write_json  # noqa: E402
from mulosd.zoo import ZOO_DIR  # noqa: E402

# The runs behind docs/RESULTS.md's full tables first (every discrete method at its defaults in one process, mulo
# beside preset=paper and r=4; 2026-12-05), then MuLo-SD's quality runs (quoted only where the full runs lack a
# row), the continuous runs (this set's continuous family: cspd with the distilled drafter, then the drafter trained on
# data at the defaults; the earlier family's runs are fmnist-32-c16's and not quoted), the lossless runs behind
# docs/METHODS.md's (the lossless variants) and the distilled drafter's runs (sd with drafter=distilled). A method
# already measured by an earlier run in this list keeps that run's rows.
RUNS = ["docs/bench/full_b1", "docs/bench/full_b8", "docs/bench/quality_b1", "docs/bench/quality_b8",
        "docs/bench/full_cont8_b1", "docs/bench/full_cont8_b8", "docs/bench/cspd8_small_b1",
        "docs/bench/lossless_b1", "docs/bench/lossless_b8", "docs/bench/distill_b1", "docs/bench/distill_b8"]
# Rows measured under other defaults than today's: run -> labels to leave out.
STALE: dict[str, set] = {}
# Non-default rows worth quoting: label in the run -> what it is called in `mulosd methods`.
VARIANTS = {
    "mulo[preset=paper]": "preset=paper",
    "mulo[r=4]": "r=4",
    "mulo[acceptance=exact]": "acceptance=exact",
    "mcsjd[init=lowres]": "init=lowres",
    "cspd[drafter=distilled]": "drafter=distilled",
    "cspd[drafter=distilled,align=False]": "drafter=distilled, align=false",
    "cspd[drafter=distilled,relax=42,independent=True]": "drafter=distilled, relax=42, independent (the public code's settings)",
    "sd[drafter=distilled]": "drafter=distilled",
}


def rows(run: Path) -> list[dict]:
    result = json.loads((run / "results.json").read_text())
    cfg = result["config"]
    base = {m["label"]: m for m in result["methods"]}
    out = []
    stale = STALE.get(str(run.relative_to(ROOT)), set())
    for m in result["methods"]:
        label = m["label"]
        if ("[" in label and label not in VARIANTS) or label in stale:
            continue
        reference = "car" if m["method"] in ("car", "cspd") else "ar"
        speed = m.get("speedup_vs_ar")  # the column holds the speed-up over the run's reference (car for cspd)
        out.append({
            "method": m["method"],
            "variant": VARIANTS.get(label, "default"),
            "batch_size": cfg["batch_size"],
            "num_images": cfg["num_images"],
            "speedup": speed,
            "latency_s_per_image": m.get("latency_s_per_image"),
            "reference": reference,
            "class_accuracy": m.get("class_accuracy"),
            "reference_class_accuracy": base.get(reference, {}).get("class_accuracy"),
            "p_classifier": m.get("p_vs_reference_classifier"),
            "p_inception": m.get("p_vs_reference_inception"),
            "exact": m.get("exact"),
            "run": str(run.relative_to(ROOT)),
            "date": cfg.get("date"),
        })
    return out


def build() -> dict:
    methods: dict[str, list] = {}
    machines: list[str] = []
    for run in RUNS:
        path = ROOT / run
        if not (path / "results.json").exists() or not json.loads((path / "results.json").read_text())["config"]["complete"]:
            continue  # a run not made yet, or still under way
        earlier = {(m, r["variant"], r["batch_size"]) for m, rs in methods.items() for r in rs}
        kept = [row for row in rows(path) if (row["method"], row["variant"], row["batch_size"]) not in earlier]
        for row in kept:
            methods.setdefault(row["method"], []).append(row)
        here = json.loads((path / "results.json").read_text())["config"].get("machine")
        if kept and here and here not in machines:  # the runs quoted were made on these machines, in this order
            machines.append(here)
    runs = [run for run in RUNS if (ROOT / run / "results.json").exists()
            and json.loads((ROOT / run / "results.json").read_text())["config"]["complete"]]
    return {"model_set": "fmnist-32", "machine": "; ".join(machines) or None, "runs": runs, "methods": methods}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = ap.parse_args()
    path = ZOO_DIR / "fmnist-32" / "measured.json"
    data = build()
    if args.check:
        same = path.exists() and json.loads(path.read_text()) == data
        print(f"{path}: {'up to date' if same else 'differs from the runs'}")
        return 0 if same else 1
    atomic_write_json(path, data)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
