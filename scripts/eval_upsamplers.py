"""Evaluate the shipped learned up-/down-samplers of fmnist-32 against the training-free pixel path on the first
2000 Fashion-MNIST test images (``UpsamplerRecipe.evaluate``) and write the numbers to docs/bench/upsamplers.json,
from which scripts/mulo_tables.py builds the table in docs/MULOSD.md.

    .venv/bin/python scripts/eval_upsamplers.py [OUT_JSON]
"""

from __future__ import annotations

import sys

import torch

from mulosd import zoo
from mulosd.io import atomic_write_json
from mulosd.models.upsample import LatentResampler
from mulosd.training.recipes import UpsamplerRecipe

torch.manual_seed(0)
root = zoo.resolve("fmnist-32")
info = zoo.manifest(root)
out = {}
for r, stem in sorted(info["upsamplers"].items()):
    recipe = UpsamplerRecipe(tokenizer=str(root / info["tokenizer"]), r=int(r), limit=2000)
    recipe.vq.float()
    model = LatentResampler.from_pretrained(root / stem).float().eval()
    out[r] = recipe.evaluate(model)
    print(r, out[r])
atomic_write_json(sys.argv[1] if len(sys.argv) > 1 else "docs/bench/upsamplers.json", out)
