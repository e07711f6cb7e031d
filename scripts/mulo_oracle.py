"""Oracle bound on MuLo-SD's drafter term (docs/MULOSD.md, "Where the quality goes", term e): decode the same
images as `ar` with MuLo-SD's default settings, once as shipped and once with the low-res drafter's image replaced
by the target's own sample of the same image index (same seed) down-sampled by the learned down-sampler, so that the
drafted structure follows the target's distribution and only the up-sampling, acceptance and local resampling
differ from AR. Writes class accuracy, FID (classifier and Inception) and the KID two-sample test against `ar` per
setting to a JSON file.

    .venv/bin/python scripts/mulo_oracle.py docs/bench/mulo_oracle.json [--num-images 200] [--params preset=paper]

The oracle's images share their low-res structure with the AR images of the same index, so its two-sample p against
AR is biased upwards (the pairs are not independent); read its KID and FID, not its p. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mulosd.decoding.methods import get_method  # noqa: E402
from mulosd.decoding.sampling import SamplingConfig  # noqa: E402
from mulosd.decoding.schedule import ScheduledSampler  # noqa: E402
from mulosd.evaluation.bench import _features, inception_reference, reference_stats  # noqa: E402
from mulosd.evaluation.fid import fid_from_features, kid_permutation_test  # noqa: E402
from mulosd.evaluation.inception import InceptionFeatures  # noqa: E402
from mulosd.io import atomic_write_json, cache_dir  # noqa: E402
from mulosd.pipeline import Pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--num-images", type=int, default=200)
    ap.add_argument("--params", default="", help="MuLo-SD parameters, KEY=VALUE[,KEY=VALUE]")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = Pipeline.from_pretrained("fmnist-32")
    n, cfg = args.num_images, SamplingConfig(cfg_scale=3.0)
    labels = torch.arange(n) % 10
    params = dict(kv.split("=") for kv in args.params.split(",") if kv)
    inception = InceptionFeatures(device="cpu")
    refs = {"classifier": reference_stats(pipe, cache_dir()), "inception": inception_reference(inception, cache_dir(), 10000)}
    rows, feats = {}, {}

    def measure(name, method):
        t = time.perf_counter()
        out = pipe.generate(method, labels, cfg, seed=0, batch_size=1)
        wall = (time.perf_counter() - t) / n
        feats[name] = {"classifier": _features(pipe, out.images), "inception": inception(out.images)}
        rows[name] = {"latency_s_per_image": round(wall, 4), "class_accuracy": out.stats["class_accuracy"],
                      "acceptance_rate": out.stats["acceptance_rate"],
                      "resampled_per_image": out.stats["resampled_per_image"]}
        return out

    ar = measure("ar", get_method("ar")(pipe))
    mulo = get_method("mulo")(pipe, **params)
    measure("mulo", mulo)
    down = pipe.resampler("learned", 2)
    with torch.inference_mode():
        oracle_codes = down.down(ar.tokens.view(-1, 16, 16)).flatten(1)
    sample_rows, counter = ScheduledSampler.sample_rows, iter(range(n))

    def with_oracle(self, tokens, row0, nrows, streams, synced_from=None):
        forwards = sample_rows(self, tokens, row0, nrows, streams, synced_from)  # same work, same streams
        tokens[:] = oracle_codes[next(counter)]
        return forwards

    ScheduledSampler.sample_rows = with_oracle
    try:
        measure("mulo_oracle_drafter", get_method("mulo")(pipe, **params))
    finally:
        ScheduledSampler.sample_rows = sample_rows
    for name, row in rows.items():
        for space, (mu, cov, _) in refs.items():
            row[f"fid_{space}"] = round(fid_from_features(feats[name][space], mu, cov), 3)
            if name != "ar":
                kid, p = kid_permutation_test(feats[name][space], feats["ar"][space], strata=labels,
                                              num_permutations=1000, normalise=space == "classifier")
                row[f"kid_vs_ar_{space}"], row[f"p_vs_ar_{space}"] = round(kid, 6), round(p, 4)
    atomic_write_json(Path(args.out), {"num_images": n, "params": mulo.params(), "rows": rows})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
