"""Speed and quality of every decoding method against AR on fmnist-32, measured in ONE process with the
methods interleaved (machine drift hits all of them alike), at batch 1 and batch 8. Writes
docs/methods_report.json and the results section of docs/METHODS.md.

    .venv/bin/python scripts/methods_report.py [--reps 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mulosd import Pipeline
from mulosd.decoding.methods import REGISTRY
from mulosd.io import atomic_write_json, atomic_write_text

torch.set_num_threads(2)
p = argparse.ArgumentParser()
p.add_argument("--reps", type=int, default=10, help="interleaved rounds; each round decodes 1 class x batch images per method")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--cfg-scale", type=float, default=3.0)
p.add_argument("--variants", nargs="*", default=[], metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
               help="extra rows with non-default parameters, e.g. sd:gamma=4 lantern:delta=0.05")
p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
args = p.parse_args()


def parse_variant(text: str) -> tuple[str, str, dict]:
    method, _, rest = text.partition(":")
    params = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    return text, method, params


RUNS = [(m, m, {}) for m in ["ar", "sd", "sjd", "mcsjd", "lantern", "gsd", "zipar"]] + [parse_variant(v) for v in args.variants]
METHODS = [name for name, _, _ in RUNS]
SPEC = {name: (method, params) for name, method, params in RUNS}
BATCHES = [int(b) for b in args.batches.split(",")]
pipe = Pipeline.from_pretrained("fmnist-32")
report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", "cfg_scale": args.cfg_scale,
          "reps": args.reps, "seed": args.seed, "results": {}}

for m in METHODS:  # warm-up (allocations, first-call overheads)
    pipe(classes=[0], num_per_class=1, method=SPEC[m][0], seed=999, cfg_scale=args.cfg_scale, **SPEC[m][1])

for batch in BATCHES:
    acc = {m: {"wall": 0.0, "images": 0, "correct": 0.0, "tf": 0, "active": 0, "df": 0, "tok": 0, "acc_d": 0.0,
               "drafted": 0, "lat": []} for m in METHODS}
    for rep in tqdm(range(args.reps), desc=f"batch {batch}"):
        cls = rep % 10
        for m in METHODS:
            out = pipe(classes=[cls], num_per_class=batch, method=SPEC[m][0], batch_size=batch,
                       seed=args.seed * 1000 + rep, cfg_scale=args.cfg_scale, **SPEC[m][1])
            s, a = out.stats, acc[m]
            a["wall"] += s["wall_time_s"]
            a["lat"].append(s["latency_s_per_image"])
            a["images"] += s["num_images"]
            a["correct"] += s["class_accuracy"] * s["num_images"]
            a["tf"] += s["target_forwards"]
            a["active"] += s["target_forwards_per_image"] * s["num_images"]
            a["df"] += s["drafter_forwards"]
            a["tok"] += s["tokens_per_image"] * s["num_images"]
            if s["acceptance_rate"] is not None:  # mean over rounds (each round decodes the same image count)
                a["acc_d"] += s["acceptance_rate"]
                a["drafted"] += 1
    ar_lat = acc["ar"]["wall"] / acc["ar"]["images"]
    rows = {}
    for m in METHODS:
        a = acc[m]
        lat = a["wall"] / a["images"]
        lat_sorted = sorted(a["lat"])
        rows[m] = {
            "params": {**REGISTRY[SPEC[m][0]].defaults, **SPEC[m][1]},
            "exact": REGISTRY[SPEC[m][0]].exact,
            "images": a["images"],
            "latency_s_per_image": round(lat, 4),
            "latency_median_s": round(lat_sorted[len(lat_sorted) // 2], 4),
            "latency_min_max_s": [round(lat_sorted[0], 4), round(lat_sorted[-1], 4)],
            "speedup_vs_ar": round(ar_lat / lat, 3),
            "target_forwards_per_image": round(a["active"] / a["images"], 2),
            "step_compression": round(a["tok"] / a["active"], 3),
            "mean_accepted_length": round(a["tok"] / a["active"], 3),
            "drafter_forwards_per_image": round(a["df"] * batch / a["images"], 2),
            "acceptance_rate": round(a["acc_d"] / a["drafted"], 4) if a["drafted"] else None,
            "ms_per_target_forward": round(1000 * a["wall"] / a["tf"], 3),
            "class_accuracy": round(a["correct"] / a["images"], 4),
        }
    report["results"][f"batch{batch}"] = rows
    print(json.dumps(rows, indent=1))

atomic_write_json("docs/methods_report.json", report)

# ---- the results section of docs/METHODS.md -----------------------------------------------------------------
cmd = " ".join(["--reps", str(args.reps)] + (["--variants", *args.variants] if args.variants else []))
lines = [f"Measured {report['date']} on {report['machine']} by `scripts/methods_report.py {cmd}` "
         f"(one process, methods interleaved per round, CFG {args.cfg_scale}, default parameters unless the row names others; "
         f"{args.reps} rounds of one class x batch images per method; raw numbers in `docs/methods_report.json`).", ""]
for batch in BATCHES:
    rows = report["results"][f"batch{batch}"]
    lines += [f"**Batch {batch}** ({rows['ar']['images']} images per method)", "",
              "| method | exact | latency s/img | speedup vs AR | target fwd/img | step compression | accept rate | drafter fwd/img | ms per target fwd | class acc |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        ar_ = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
        lines.append(f"| `{m}` | {'yes' if r['exact'] else 'no'} | {r['latency_s_per_image']:.3f} | {r['speedup_vs_ar']:.2f}x | "
                     f"{r['target_forwards_per_image']:.1f} | {r['step_compression']:.2f}x | {ar_} | "
                     f"{r['drafter_forwards_per_image']:.1f} | {r['ms_per_target_forward']:.2f} | {r['class_accuracy']:.3f} |")
    lines.append("")
doc = Path("docs/METHODS.md")
text = doc.read_text()
block = "<!-- results:start -->\n" + "\n".join(lines) + "<!-- results:end -->"
text = re.sub(r"<!-- results:start -->.*<!-- results:end -->", lambda _: block, text, flags=re.S)
atomic_write_text(doc, text)
