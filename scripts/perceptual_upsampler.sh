#!/usr/bin/env bash
# The perceptual up-sampler lever of docs/MULOSD.md (issue 19): the r = 2 up-sampler retrained with the shipped
# recipe (scripts/train_fmnist32.sh) plus the stage-2 perceptual loss (--perceptual-weight 1, the set's classifier
# as the feature net), packed into a scratch copy of fmnist-32, then MuLo-SD (ours and the paper's rule) benched on
# it at N = 200 beside AR, the same images and seeds as docs/bench/quality_levers (whose rows use the shipped
# up-sampler), and both up-samplers evaluated on 2000 test images. About 15 minutes on 2 cores. Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-/tmp/mulosd-perceptual}
M=${MULOSD_BIN:-.venv/bin/mulosd}
O=docs/bench/upsampler_perceptual
mkdir -p "$W" "$O"
if [ ! -f "$W/up/summary.json" ]; then
  resume=(); [ -f "$W/up/checkpoint.pt" ] && resume=(--resume)
  $M train upsampler --model fmnist-32 --r 2 --dim 64 --blocks 4 --steps 2600 --ce-steps 2000 --batch-size 64 \
    --lr 1e-3 --warmup 100 --checkpoint-every 200 --perceptual-weight 1 --out "$W/up" "${resume[@]}"
fi
[ -f "$W/set/manifest.json" ] || $M pack --from fmnist-32 --out "$W/set" --dtype fp16 --upsampler "$W/up/model"
resume=(); [ -f "$W/screen/state.json" ] && resume=(--resume)
[ -f "$W/screen/results.json" ] && grep -q '"complete": true' "$W/screen/results.json" ||
  $M bench --model "$W/set" --methods ar,mulo --setting mulo:preset=paper --num-images 200 --batch-size 1 \
    --inception --out "$W/screen" --no-progress "${resume[@]}"
cp "$W/screen/results.json" "$W/screen/results.md" "$O/"
.venv/bin/python - "$W/up/model" "$O/upsamplers.json" <<'PY'
import json, sys
from mulosd.io import atomic_write_json
from mulosd.models.upsample import LatentResampler
from mulosd.training.recipes import UpsamplerRecipe
from mulosd.zoo import resolve
recipe = UpsamplerRecipe(model="fmnist-32", r=2, perceptual_weight=1.0)  # evaluation with the perceptual distance
out = {name: recipe.evaluate(LatentResampler.from_pretrained(stem).float().eval())
       for name, stem in (("shipped", resolve("fmnist-32") / "upsampler_r2"), ("perceptual", sys.argv[1]))}
atomic_write_json(sys.argv[2], out)
print(json.dumps(out, indent=1))
PY
