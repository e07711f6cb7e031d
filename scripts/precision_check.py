"""How often half precision changes greedy decoding: greedy verification against greedy AR, per dtype.

In float32, every exact method's greedy output equals greedy AR's token for token (tests/test_pipeline.py). In
bfloat16 a verify forward over k tokens and k one-token AR forwards round differently, and where the target's
distribution over image tokens is flat, the argmax flips. This script counts, for each exact method and dtype,
the images whose greedy tokens differ from greedy AR's in the same dtype, and the tokens they share before the
first difference; and AR in bfloat16 against AR in float32.

    python scripts/precision_check.py --num-images 20 --out docs/precision.json [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mulosd.io import atomic_write_json  # noqa: E402
from mulosd.pipeline import Pipeline  # noqa: E402

METHODS = ("sd", "sjd", "mcsjd")


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Images whose tokens differ, and the mean share of each image's tokens before its first difference."""
    a, b = a.flatten(1), b.flatten(1)
    same = a == b
    differ = ~same.all(1)
    first = torch.where(differ, (~same).float().argmax(1), torch.full_like(differ, a.shape[1], dtype=torch.long))
    return {"images_differing": int(differ.sum()), "images": len(a),
            "tokens_before_first_difference": round(float(first.float().mean() / a.shape[1]), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    labels = torch.arange(args.num_images) % 10
    tokens, rows = {}, []
    for dtype in ("float32", "bfloat16"):
        pipe = Pipeline.from_pretrained("fmnist-32", device=args.device, dtype=dtype)
        for method in ("ar", *METHODS):
            from mulosd.decoding.methods import get_method
            from mulosd.decoding.sampling import SamplingConfig

            out = pipe.generate(get_method(method)(pipe), labels, SamplingConfig(cfg_scale=args.cfg_scale, temperature=0.0),
                                seed=0, batch_size=args.batch_size, classify=False)
            tokens[method, dtype] = out.tokens
        for method in METHODS:
            rows.append({"dtype": dtype, "compare": f"{method} vs ar", **agreement(tokens[method, dtype], tokens["ar", dtype])})
    rows.append({"dtype": "bfloat16 vs float32", "compare": "ar vs ar", **agreement(tokens["ar", "bfloat16"], tokens["ar", "float32"])})
    print("| dtype | greedy outputs compared | images differing | tokens before the first difference |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['compare']} | {r['images_differing']} / {r['images']} | "
              f"{100 * r['tokens_before_first_difference']:.1f} % |")
    if args.out:
        atomic_write_json(args.out, {"device": args.device, "batch_size": args.batch_size, "cfg_scale": args.cfg_scale,
                                     "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
