#!/usr/bin/env bash
# Issue 20's distillation runs on 2 CPU cores, resumable (run it again after an interruption): sd's drafter distilled
# from the fmnist-32 target on its own samples, then benched against the shipped drafter in one process (a scratch
# copy of the set holds both, the distilled one as role "distilled", as fmnist-32 ships it), then the tables in
# docs/RESULTS.md. Needs `make fid` once for the Inception features.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/train_lib.sh   # stage NAME ARGS...: train once, resume if killed ($R: runs/)
. scripts/bench_lib.sh   # bench NAME ARGS...: run once, resume if killed ($O: docs/bench)
N=${N_FULL:-1000}
N_B8=${N_B8:-400}
SET=${SET:-$R/fmnist-32-distilled}

stage distill_small distill --model fmnist-32 --drafter small --samples "${SAMPLES:-4000}" \
  --steps "${STEPS:-1000}" --batch-size 32 --lr 1e-3 --warmup 50 --checkpoint-every 100
[ -f "$SET/manifest.json" ] || $M pack --from fmnist-32 --out "$SET" --dtype fp16 \
  --drafter distilled=$R/distill_small/model
bench distill_b8 --preset full --model "$SET" --methods ar,sd --setting sd:drafter=distilled --num-images "$N_B8" \
  --batch-size 8
bench distill_b1 --preset full --model "$SET" --methods ar,sd --setting sd:drafter=distilled --num-images "$N" \
  --batch-size 1
.venv/bin/python scripts/bench_tables.py --marker distill docs/RESULTS.md "$O" distill_b1 \
  "sd with the shipped and the distilled drafter, batch 1" distill_b8 "sd with the shipped and the distilled drafter, batch 8"
