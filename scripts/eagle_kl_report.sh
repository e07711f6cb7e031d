#!/usr/bin/env bash
# Issue 20: an EAGLE head for fmnist-32's target whose token cross-entropy against the target's guided distributions
# (KL(p || q) plus a constant) weighs as much as EAGLE's feature regression (--ce-weight 1 instead of EAGLE's 0.1;
# otherwise the shipped head's recipe: 2000 target samples, 3000 x 16, lr 1e-3), then eagle2 with the shipped and
# with this head against ar, one process per head (the head is a component of its set; a scratch copy holds the new
# one): N images at batch 1. Resumable: run it again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/train_lib.sh   # stage NAME ARGS...: train once, resume if killed ($R: runs/)
. scripts/bench_lib.sh   # bench NAME ARGS...: run once, resume if killed ($O: docs/bench)
N=${N_EAGLE:-200}
SET=${SET:-$R/fmnist-32-eaglekl}

stage eagle_kl eagle --model fmnist-32 --samples 2000 --steps 3000 --batch-size 16 --lr 1e-3 --warmup 100 \
  --checkpoint-every 250 --ce-weight 1.0 --no-add-to-set
[ -f "$SET/manifest.json" ] || $M pack --from fmnist-32 --out "$SET" --dtype fp16 --eagle $R/eagle_kl/model
bench eagle_ref_b1 --methods ar,eagle2 --num-images "$N" --batch-size 1
bench eagle_kl_b1 --model "$SET" --methods ar,eagle2 --num-images "$N" --batch-size 1
