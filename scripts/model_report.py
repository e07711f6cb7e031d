"""Measure the shipped model set for docs/MODELS.md: sample grids and class accuracy for every GPT, tokenizer
reconstructions, classifier accuracy, and what fp16 storage changes. Writes docs/images/*.png and
docs/model_report.json.

    .venv/bin/python scripts/model_report.py [--runs runs] [--per-class 50]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mulosd import Pipeline
from mulosd.data import FashionMNIST
from mulosd.evaluation.grids import image_grid
from mulosd.io import atomic_write, atomic_write_json
from mulosd.models.gpt import GPT

torch.set_num_threads(2)
p = argparse.ArgumentParser()
p.add_argument("--runs", default="runs", help="training run directory (fp32 weights, for the fp16 comparison)")
p.add_argument("--per-class", type=int, default=50)
p.add_argument("--out", default="docs")
args = p.parse_args()
out = Path(args.out)
(out / "images").mkdir(parents=True, exist_ok=True)
pipe = Pipeline.from_pretrained("fmnist-32")
report: dict = {"date": time.strftime("%Y-%m-%d"), "per_class": args.per_class}


def save(img, name):
    atomic_write(out / "images" / name, lambda tmp: img.save(tmp, format="PNG"))


# --- samples and class accuracy for every GPT in the set -----------------------------------------------------
classes = list(range(10))
for role in ["target", "r2", "r4", "small"]:
    for cfg in (3.0, 1.0):
        res = pipe(classes, num_per_class=args.per_class, method="ar", model=role, seed=0, batch_size=50, cfg_scale=cfg)
        report[f"{role}_cfg{cfg:g}"] = {k: res.stats[k] for k in ("class_accuracy", "wall_time_s", "tokens_per_image")}
        print(role, cfg, report[f"{role}_cfg{cfg:g}"], flush=True)
        if cfg == 3.0:
            keep = torch.cat([torch.arange(c * args.per_class, c * args.per_class + 8) for c in classes])
            save(image_grid(res.images[keep], res.labels[keep], pipe.class_names, scale=3 * (32 // res.images.shape[-1])),
                 f"samples_{role}.png")

# --- decode-step cost at batch 1 with CFG (2 rows), median of 120 steps, all models in this one process ------
@torch.inference_mode()
def step_ms(model: GPT, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        model.setup_cache(2)
        model.prefill(torch.tensor([0, model.null_class]))
        tok = torch.zeros(2, 1, dtype=torch.long)
        for k in range(min(120, model.config.num_tokens - 1)):
            t0 = time.perf_counter()
            model.decode(tok, torch.full((2, 1), k))
            times.append(time.perf_counter() - t0)
        model.clear_cache()
    return 1000 * sorted(times)[len(times) // 2]


costs = {role: step_ms(pipe.model(role)) for role in ["target", "r2", "r4", "small", "target"]}  # target twice: drift check
report["decode_step_ms_b1_cfg"] = {k: round(v, 3) for k, v in costs.items()}
report["small_over_target_step_cost"] = round(costs["small"] / costs["target"], 3)
print(report["decode_step_ms_b1_cfg"], report["small_over_target_step_cost"])

# --- tokenizer reconstructions ------------------------------------------------------------------------------
test = FashionMNIST.load("test")
recon = {}
for px in (32, 16, 8):
    x = test.at(px)
    rec = torch.cat([pipe.tokenizer.decode(pipe.tokenizer.encode(x[i : i + 500])) for i in range(0, len(x), 500)])
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    recon[f"{px}px"] = {"mse_01": round(mse, 6), "psnr_db": round(10 * math.log10(1 / mse), 2)}
    pair = torch.cat([x[:10], rec[:10]])
    save(image_grid((pair + 1) / 2, torch.tensor([0] * 10 + [1] * 10), ["original", "reconstruction"], scale=3 * 32 // px), f"recon_{px}px.png")
report["tokenizer_test"] = recon
pred = pipe.classify((test.images + 1) / 2)
report["classifier_test_accuracy"] = round((pred == test.labels).float().mean().item(), 4)
# reference for the low-resolution drafters: real test images at 16 / 8 px, resized back up like their samples
for px in (16, 8):
    pred = pipe.classify((test.at(px) + 1) / 2)
    report[f"classifier_test_accuracy_{px}px"] = round((pred == test.labels).float().mean().item(), 4)
print(recon, {k: v for k, v in report.items() if k.startswith("classifier")})

# --- fp16 storage vs the fp32 training weights ----------------------------------------------------------------
fp32 = GPT.from_pretrained(Path(args.runs) / "target" / "model")
res16 = pipe(classes, num_per_class=5, seed=3, batch_size=50)
pipe32 = Pipeline(pipe.tokenizer, fp32, pipe.classifier, pipe.drafters)
res32 = pipe32(classes, num_per_class=5, seed=3, batch_size=50)
labels, toks = torch.arange(10), res32.tokens.view(50, -1)[:10]
with torch.no_grad():
    d = (pipe.target(labels, toks) - fp32(labels, toks)).abs().max().item()
report["fp16_vs_fp32_target"] = {
    "max_abs_logit_diff": round(d, 5),
    "sampled_token_agreement": round((res16.tokens == res32.tokens).float().mean().item(), 4),
    "class_accuracy_fp16": res16.stats["class_accuracy"],
    "class_accuracy_fp32": res32.stats["class_accuracy"],
}
print(report["fp16_vs_fp32_target"])
atomic_write_json(out / "model_report.json", report)
