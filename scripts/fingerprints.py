"""Token fingerprints: the tokens and work counters of 28 settings in 52 runs (every method, non-default parameters),
to show that a refactor leaves the images alone. Run it on two source trees and compare:

    PYTHONPATH=/path/to/old/src .venv/bin/python scripts/fingerprints.py write old.pt
    .venv/bin/python scripts/fingerprints.py write new.pt
    .venv/bin/python scripts/fingerprints.py compare old.pt new.pt

Classes 0, 5 and 9, seed 11, CFG 3: discrete methods at batch 3 (sampled) and batch 1 (greedy), continuous ones
at batch 3. Only the call `Pipeline.__call__(classes, num_per_class, method, seed, batch_size, cfg_scale,
temperature, **params)` and the stats keys `counts`, `target_forwards`, `drafter_forwards` are used, so older
trees can be fingerprinted too. A few minutes on 2 cores.
"""

from __future__ import annotations

import sys
import time

import torch

SETTINGS = [
    ("ar", {}), ("sd", {}), ("sd", {"gamma": 5}), ("sjd", {}), ("sjd", {"init": "spatial"}), ("mcsjd", {}),
    ("mcsjd", {"coupling": "gumbel"}), ("lantern", {}), ("lantern", {"lam": 2.0}), ("gsd", {}), ("zipar", {}),
    ("zipar", {"window": 2}), ("mulo", {}), ("mulo", {"resampling": "serial"}), ("mulo", {"rows": 2}),
    ("mulo", {"rows": 3, "drafting": "serial"}), ("mulo", {"rows": 2, "downsampler": "pixel"}),
    ("mulo", {"upsampler": "pixel"}), ("mulo", {"acceptance": "exact", "rows": 4}), ("mulo", {"candidates": "sample"}),
    ("mulo", {"rejection": "raster"}), ("mulo", {"r": 4}), ("mulo", {"tau": "inf"}),
    ("mulo", {"rows": 2, "resampling": "serial", "radius": 2}),
    ("car", {}), ("cspd", {}), ("cspd", {"independent": True, "relax": 42.0}), ("cspd", {"align": False, "gamma": 2}),
]


def write(path: str) -> None:
    from mulosd.pipeline import Pipeline

    torch.set_num_threads(2)
    pipe = Pipeline.from_pretrained("fmnist-32")
    out = {}
    for name, params in SETTINGS:
        runs = ((3, 1.0),) if name in ("car", "cspd") else ((3, 1.0), (1, 0.0))
        for batch, temperature in runs:
            t = time.perf_counter()
            o = pipe([0, 5, 9], num_per_class=1, method=name, seed=11, batch_size=batch, cfg_scale=3.0,
                     temperature=temperature, **params)
            key = f"{name}{sorted(params.items())}|batch {batch}|T {temperature}"
            out[key] = {"tokens": o.tokens, "counts": dict(o.stats["counts"]), "target_forwards": o.stats["target_forwards"],
                        "drafter_forwards": o.stats["drafter_forwards"]}
            print(f"{key}: {time.perf_counter() - t:.1f} s", flush=True)
    torch.save(out, path)


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    differ = 0
    for key, x in a.items():
        y = b.get(key)
        if y is None:
            print(f"MISSING {key}")
            differ += 1
            continue
        notes = [] if torch.equal(x["tokens"], y["tokens"]) else ["tokens differ"]
        notes += [f"{k} {x['counts'][k]} -> {y['counts'].get(k)}" for k in x["counts"] if x["counts"][k] != y["counts"].get(k)]
        notes += [f"{k} {x[k]} -> {y[k]}" for k in ("target_forwards", "drafter_forwards") if x[k] != y[k]]
        differ += bool(notes)
        print(("DIFF " if notes else "same ") + key + (": " + ", ".join(notes) if notes else ""))
    print(f"{len(a) - differ} of {len(a)} runs identical")
    return differ


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    else:
        sys.exit(__doc__)
